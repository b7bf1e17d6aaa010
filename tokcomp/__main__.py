"""`python -m tokcomp` runs the command line."""

import sys

from tokcomp.cli import main

sys.exit(main())
