"""`python -m weights ...`: the weights commands without the rest of the server."""

import sys

from .cli import main

sys.exit(main())
