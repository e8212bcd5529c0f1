"""K-FAC collection time vs. a plain forward+backward over the same batches.

Same as ``eigendamage bench kfac`` (arguments are passed through), e.g.::

    python benchmarks/kfac_overhead.py -w vgg19-cifar -w resnet18-32px --batches 2 --memory

Both passes run interleaved in one process and the minimum over rounds is reported; see
:mod:`eigendamage.benchmarking.workloads` for the protocol and ``docs/benchmarks.md`` for results.
"""

import sys

from eigendamage.cli import app

if __name__ == "__main__":
    app(["bench", "kfac", *sys.argv[1:]])
