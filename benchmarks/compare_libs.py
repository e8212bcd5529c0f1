"""Our K-FAC factors beside curvlinops (``KFACLinearOperator``) and BackPACK (``KFAC``).

Two parts, both on the same model and the same batches:

1. **Agreement** (float64) where the conventions coincide, with the scale factors that
   relate them:

   * curvlinops, ``reduction="mean"``, ``separate_weight_and_bias=False``, KFAC-expand:
     input covariance = our ``A`` (bias column included) and gradient covariance = our
     ``S``, for Linear and Conv2d (patch mode), empirical Fisher: equal to round-off.
   * BackPACK: Linear ``A`` = ours without the bias coordinate; Conv2d ``A`` =
     ``T * A`` (BackPACK divides the unfolded-input Gram by ``N`` only, ``T`` = output
     locations).  BackPACK has no empirical-Fisher K-FAC; its exact ``KFLR`` factor ``G``
     equals curvlinops' ``type-2`` ``S`` for Linear (and KFAC-reduce's for Conv2d: BackPACK
     sums gradients over locations before the outer product, our KFC ``S`` sums outer
     products over locations -- a different approximation, so not compared to ours).
   * Our true Fisher (``samples`` label draws) vs the exact type-2 ``S``: Monte-Carlo error.

2. **Speed**, side by side (min of interleaved rounds, float32, Monte-Carlo Fisher with one
   draw per example): plain forward+backward, ours (patch and channel mode), curvlinops,
   BackPACK.  BackPACK needs ``extend``-able modules only: no BatchNorm, no residual adds,
   so it runs on a BN-free VGG19 (``vgg19-plain``) and the MLP.

Run: ``python benchmarks/compare_libs.py [--batches 2] [--repeats 3]`` (needs the
``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import copy

import torch
from backpack import backpack, extend
from backpack.extensions import KFAC, KFLR
from curvlinops import KFACLinearOperator
from torch import nn

from eigendamage.benchmarking.workloads import (
    WORKLOADS,
    Workload,
    best_of,
    build,
    machine,
    markdown,
    plain_step,
    synthetic_batches,
)
from eigendamage.curvature import collect_kfac


def vgg19_plain(classes: int = 10) -> nn.Sequential:
    """VGG19-CIFAR without BatchNorm, built from modules BackPACK can extend."""
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M")
    cfg += (512, 512, 512, 512)
    layers: list[nn.Module] = []
    width = 3
    for c in cfg:
        if c == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU()]
            width = c
    return nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(width, classes))


def mlp(classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
        nn.Linear(64, classes),
    )  # fmt: skip


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def kfac_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in layers_of(model).values() for p in m.parameters()]


def curvlinops_factors(model, data, fisher_type, approx="expand", mc_samples=1):
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        kfac_params(model),
        data,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        kfac_approx=approx,
        check_deterministic=False,
        separate_weight_and_bias=False,
        num_data=sum(len(y) for _, y in data),
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


def backpack_factors(model, data, extension):
    """Average over batches of BackPACK's per-batch factors ``{layer: (G, A)}``."""
    model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
    sums: dict[str, list[torch.Tensor]] = {}
    for x, y in data:
        with backpack(extension):
            loss_fn(model(x), y).backward()
        for name, m in layers_of(model).items():
            g, a = m.weight.kfac if isinstance(extension, KFAC) else m.weight.kflr
            prev = sums.get(name)
            sums[name] = [g, a] if prev is None else [prev[0] + g, prev[1] + a]
        model.zero_grad()
    return {n: (g / len(data), a / len(data)) for n, (g, a) in sums.items()}


def output_locations(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``T`` per layer: output locations of a conv (``H*W``), 1 for a Linear."""
    found: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, n=n: found.__setitem__(
                n, out[0, 0].numel() if out.dim() == 4 else 1
            )
        )
        for n, m in layers_of(model).items()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return found


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def agreement() -> list[dict]:
    torch.set_default_dtype(torch.float64)
    try:
        rows = []
        g = torch.Generator().manual_seed(0)
        cases = {
            "MLP 64-128-64-10": (mlp(), (1, 8, 8)),
            "small CNN (conv-relu-pool x2, linear)": (
                nn.Sequential(
                    nn.Conv2d(3, 8, 3, padding=1),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                    nn.Conv2d(8, 16, 3, padding=1),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                    nn.Flatten(),
                    nn.Linear(16 * 4 * 4, 10),
                ),  # fmt: skip
                (3, 16, 16),
            ),
        }
        for case, (model, shape) in cases.items():
            data = [
                (torch.randn(32, *shape, generator=g), torch.randint(0, 10, (32,), generator=g))
            ]
            ours = collect_kfac(model, data, fisher="empirical", dtype=torch.float64)
            true = collect_kfac(
                model, data, fisher="true", samples=256, seed=1, dtype=torch.float64
            )
            cl_a, cl_s = curvlinops_factors(model, data, "empirical")
            _, cl_s2 = curvlinops_factors(model, data, "type-2")
            _, cl_s2_reduce = curvlinops_factors(model, data, "type-2", approx="reduce")
            bp = backpack_factors(model, data, KFLR())
            locations = output_locations(model, data[0][0])
            for name, m in layers_of(model).items():
                f, t = ours[name], locations[name]
                conv = isinstance(m, nn.Conv2d)
                bp_g, bp_a = bp[name]
                exact_s = (cl_s2_reduce if conv else cl_s2)[name]
                rows.append(
                    {
                        "model": case,
                        "layer": f"{name} ({type(m).__name__})",
                        "A vs curvlinops": f"{rel(f.A, cl_a[name]):.1e}",
                        "S vs curvlinops (empirical)": f"{rel(f.S, cl_s[name]):.1e}",
                        "T*A vs BackPACK A": f"{rel(f.A_no_bias * t, bp_a):.1e}",
                        "BackPACK KFLR G vs curvlinops type-2 S": f"{rel(bp_g, exact_s):.1e}"
                        + (" (reduce)" if conv else ""),
                        "our true S (256 draws) vs type-2 S": (
                            f"{rel(true[name].S, cl_s2[name]):.1e}"
                        ),
                    }
                )
        return rows
    finally:
        torch.set_default_dtype(torch.float32)


def speed(batches: int, repeats: int, device: str = "cpu") -> list[dict]:
    rows = []
    specs = {
        "mlp (digits 8x8)": (mlp, Workload("mlp", (1, 8, 8), 128, 10), True),
        "vgg19-plain (no BN)": (vgg19_plain, Workload("vgg19-plain", (3, 32, 32), 128, 10), True),
        "vgg19-cifar": (None, WORKLOADS["vgg19-cifar"], False),
        "resnet18-32px": (None, WORKLOADS["resnet18-32px"], False),
    }
    for label, (make, w, bp_ok) in specs.items():
        torch.manual_seed(0)
        if make is None:
            model, _ = build(label, device)
        else:
            model = make().to(device).eval()
        data = synthetic_batches(w, batches, device)
        plain_step(model, data[:1])
        variants = {
            "plain": lambda model=model, data=data: plain_step(model, data),
            "ours patch": lambda model=model, data=data: collect_kfac(model, data),
            "ours channel": lambda model=model, data=data: collect_kfac(
                model, data, conv_mode="channel"
            ),
            "curvlinops": lambda model=model, data=data: curvlinops_factors(model, data, "mc"),
        }
        if bp_ok:
            bp_model = extend(copy.deepcopy(model))
            variants["BackPACK"] = lambda m=bp_model, data=data: backpack_factors(
                m, data, KFAC(mc_samples=1)
            )
        t = best_of(variants, repeats, device)
        row = {"workload": label, "batch": w.batch_size, "plain s": f"{t['plain']:.3g}"}
        for k in ("ours patch", "ours channel", "curvlinops", "BackPACK"):
            row[k] = f"{t[k]:.3g} s ({t[k] / t['plain']:.2f}x)" if k in t else "n/a"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="device of the speed runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from importlib.metadata import version

    print(f"# {machine(args.device)}")
    print(
        f"# curvlinops-for-pytorch {version('curvlinops-for-pytorch')}, "
        f"backpack-for-pytorch {version('backpack-for-pytorch')}"
    )
    print("# agreement: float64, one batch of 32, relative Frobenius differences")
    print(markdown(agreement()))
    if not args.skip_speed:
        print(
            f"\n# speed: float32, MC Fisher 1 draw, {args.batches} batches, "
            f"min of {args.repeats} interleaved rounds; (x) = / plain fwd+bwd"
        )
        print(markdown(speed(args.batches, args.repeats, args.device)))


if __name__ == "__main__":
    main()
