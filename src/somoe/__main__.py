"""``python -m somoe``: the CLI without the console script (e.g. from a source checkout on PYTHONPATH)."""

import sys

from .cli import main

sys.exit(main())
