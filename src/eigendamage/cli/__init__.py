"""The ``eigendamage`` command line (typer + rich): ``app`` and ``main`` (:mod:`.app`), and
the commands, which register themselves on ``app`` when their modules are imported here:
``run`` (train, prune, demo), ``listing`` (models, methods), ``bench`` (the bench group),
``compare``, ``export`` and ``latency`` (bench latency)."""

# The import order is the order of the commands in --help.
# isort: off
from .app import app, main
from .run import demo_cmd, prune_cmd, train_cmd
from .listing import methods_cmd, models_cmd
from .bench import bench_app
from .compare import compare_cmd
from .export import export_cmd
from .latency import latency_cmd

# isort: on

__all__ = [
    "app",
    "bench_app",
    "compare_cmd",
    "demo_cmd",
    "export_cmd",
    "latency_cmd",
    "main",
    "methods_cmd",
    "models_cmd",
    "prune_cmd",
    "train_cmd",
]
