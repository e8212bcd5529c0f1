"""Eigendecompositions of all K-FAC factors of a network (ResNet-50 by default): the
sequential float64 loop against stacked, threaded and float32 variants, with accuracy.

Same as ``eigendamage bench eigh`` (arguments are passed through), e.g.::

    python benchmarks/eigh_bench.py -w resnet50-224 --conv-mode channel
"""

import sys

from eigendamage.cli import app

if __name__ == "__main__":
    app(["bench", "eigh", *sys.argv[1:]])
