"""``python -m fedkn`` is the same as the ``fedkn`` command."""

import sys

from fedkn.cli import main

sys.exit(main())
