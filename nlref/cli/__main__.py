"""``python -m nlref.cli``: the ``nlref`` command."""

import sys

from nlref.cli import main

sys.exit(main())
