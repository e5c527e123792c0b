"""`python -m zimage_split.cli` is `zsplit`."""

import sys

from zimage_split.cli import main

sys.exit(main())
