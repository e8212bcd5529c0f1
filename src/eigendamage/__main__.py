"""``python -m eigendamage``: the same CLI as the installed ``eigendamage`` script."""

import sys

from .cli import main

sys.exit(main())
