"""``python -m cellseg`` = the ``cellseg`` command."""

import sys

from cellseg.cli import main

sys.exit(main())
