"""``python -m eigendamage.cli`` (torchrun launches modules): the installed script's CLI."""

import sys

from . import main

sys.exit(main())
