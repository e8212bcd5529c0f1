"""`eigendamage bench latency`: pruned vs original model latency."""

from .cli import friendly_errors  # noqa: F401
from .cli_bench import bench_app  # noqa: F401
