"""``python -m nlref``: the ``nlref`` command."""

import sys

from nlref.cli import main

sys.exit(main())
