"""``python -m lastlayer``."""

import sys

from lastlayer.cli import main

sys.exit(main())
