"""K-FAC collection time vs. a plain forward+backward over the same batches.

Prints one row per (model, conv mode): seconds for ``loss.backward()`` passes (the cost
of an ordinary gradient step without the optimizer), seconds for ``collect_kfac`` on the
same batches, and their ratio.  Run: ``python benchmarks/kfac_overhead.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.models import create_model

WORKLOADS = {
    # name: (model, kwargs, input shape without batch, batch size, classes)
    "digits-vgg": ("digits-vgg", {}, (1, 8, 8), 128, 10),
    "vgg19-cifar": ("vgg19", {}, (3, 32, 32), 128, 10),
    "resnet32-wide": ("resnet32-wide", {}, (3, 32, 32), 64, 10),
    "resnet18-32px": ("torchvision:resnet18", {}, (3, 32, 32), 512, 10),
}


def batches(shape, batch_size, classes, count, device):
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch_size, *shape, generator=g).to(device),
            torch.randint(0, classes, (batch_size,), generator=g).to(device),
        )
        for _ in range(count)
    ]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_plain(model, data, device):
    model.eval()
    sync(device)
    start = time.perf_counter()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    sync(device)
    return time.perf_counter() - start


def time_kfac(model, data, device, conv_mode):
    sync(device)
    start = time.perf_counter()
    factors = collect_kfac(model, data, conv_mode=conv_mode, device=device)
    sync(device)
    return time.perf_counter() - start, factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(
        f"# torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print("| workload | batch | conv A | plain fwd+bwd s | K-FAC s | ratio | eigh s |")
    print("|---|---|---|---|---|---|---|")
    for key in args.workloads:
        name, kwargs, shape, bs, classes = WORKLOADS[key]
        model = create_model(name, num_classes=classes, **kwargs).to(args.device)
        data = batches(shape, bs, classes, args.batches, args.device)
        time_plain(model, data[:1], args.device)  # warm-up
        for mode in ("channel", "patch"):
            plain = min(time_plain(model, data, args.device) for _ in range(args.repeats))
            runs = [time_kfac(model, data, args.device, mode) for _ in range(args.repeats)]
            kfac = min(t for t, _ in runs)
            start = time.perf_counter()
            eigendecompose(runs[0][1], drop_bias=True)
            eig = time.perf_counter() - start
            print(
                f"| {key} | {bs} | {mode} | {plain:.3f} | {kfac:.3f} | {kfac / plain:.2f}x "
                f"| {eig:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
