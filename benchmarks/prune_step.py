"""One whole EigenDamage pruning round (K-FAC factors on N batches, eigendecomposition,
scoring, surgery), timed per stage.

Same as ``eigendamage bench prune-step`` (arguments are passed through), e.g.::

    python benchmarks/prune_step.py -w vgg19-cifar --batches 20 --batch-size 128 --batch-size 32
"""

import sys

from eigendamage.cli import app

if __name__ == "__main__":
    app(["bench", "prune-step", *sys.argv[1:]])
