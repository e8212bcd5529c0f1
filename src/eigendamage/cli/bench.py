"""`eigendamage bench ...` commands: the `bench` group, shared by the benchmark modules.

``bench kfac``, ``bench eigh`` and ``bench prune-step`` print a header line (machine, torch,
settings) and a markdown table, ready to paste into ``docs/benchmarks.md``; the
measurements live in :mod:`eigendamage.benchmarking`.
"""

import typer

from .app import app, friendly_errors

bench_app = typer.Typer(
    help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


THREADS_HELP = (
    "torch intra-op threads (0: torch's default); 1 is far steadier on a shared machine, "
    "where a multi-threaded kernel waits for its slowest, descheduled thread"
)


def _header(device: str, settings: str, threads: int) -> None:
    import torch

    from ..benchmarking.workloads import machine

    if threads:
        torch.set_num_threads(threads)
    typer.echo(f"# {machine(device)}")
    typer.echo(f"# settings: {settings}")


@bench_app.command("kfac")
@friendly_errors
def kfac_cmd(
    workload: list[str] = typer.Option(
        ["digits-vgg", "vgg19-cifar", "resnet18-32px"],
        "--workload",
        "-w",
        help="digits-vgg, vgg19-cifar, resnet18-32px, resnet50-224, vit-s (repeatable)",
    ),
    batches: int = typer.Option(3, help="batches per pass (the same ones for every variant)"),
    repeats: int = typer.Option(3, help="interleaved rounds; the minimum is reported"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    memory: bool = typer.Option(False, help="also peak memory (fresh process per pass)"),
    channels_last: bool = typer.Option(False, help="model and inputs in channels_last"),
    threads: int = typer.Option(0, help=THREADS_HELP),
) -> None:
    """K-FAC collection (channel and patch mode) vs a plain forward+backward."""
    from ..benchmarking.kfac import bench_kfac
    from ..benchmarking.memory import bench_memory
    from ..benchmarking.workloads import markdown

    _header(
        device,
        f"true Fisher, 1 draw, fp32; {batches} batches, min of {repeats} interleaved rounds"
        + (", channels_last" if channels_last else ""),
        threads,
    )
    typer.echo(
        markdown(
            bench_kfac(
                workload,
                batches=batches,
                repeats=repeats,
                device=device,
                channels_last=channels_last,
            )
        )
    )
    if memory:
        typer.echo("\n# peak memory above model + data (MiB)")
        typer.echo(markdown(bench_memory(workload, device=device)))


@bench_app.command("eigh")
@friendly_errors
def eigh_cmd(
    workload: str = typer.Option("resnet50-224", "--workload", "-w"),
    conv_mode: str = typer.Option("channel", help="channel (EigenDamage) | patch"),
    batches: int = typer.Option(1, help="batches for the factors"),
    batch_size: int = typer.Option(0, help="examples per batch (0: the workload's own)"),
    repeats: int = typer.Option(2),
    device: str = typer.Option("cpu"),
    calibrate: bool = typer.Option(False, help="also the fp32 factors' own error vs fp64 sums"),
    threads: int = typer.Option(0, help=THREADS_HELP),
) -> None:
    """Eigendecomposition of all factors: sequential fp64 loop vs stacked/threaded, fp32."""
    from ..benchmarking.eigh import bench_eigh
    from ..benchmarking.workloads import markdown

    size = f" of {batch_size}" if batch_size else ""
    settings = f"{conv_mode}-mode factors of {workload} from {batches} batch(es){size}"
    _header(device, settings, threads)
    rows, info = bench_eigh(
        workload,
        conv_mode=conv_mode,
        batches=batches,
        repeats=repeats,
        device=device,
        calibrate=calibrate,
        batch_size=batch_size or None,
    )
    typer.echo(f"# {info}")
    typer.echo(markdown(rows))


@bench_app.command("prune-step")
@friendly_errors
def prune_step_cmd(
    workload: str = typer.Option("vgg19-cifar", "--workload", "-w"),
    batches: int = typer.Option(20, help="K-FAC batches"),
    batch_size: list[int] = typer.Option([128], "--batch-size", help="repeatable"),
    ratio: float = typer.Option(0.5, help="fraction of eigen-directions removed"),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(0, help=THREADS_HELP),
) -> None:
    """One whole EigenDamage round (factors + eigh + scoring + surgery), per stage."""
    from ..benchmarking.prune_step import bench_prune_step
    from ..benchmarking.workloads import markdown

    _header(device, f"eigendamage, ratio {ratio}, {batches} batches, true Fisher 1 draw", threads)
    typer.echo(
        markdown(
            bench_prune_step(
                workload, batches=batches, batch_sizes=batch_size, ratio=ratio, device=device
            )
        )
    )
