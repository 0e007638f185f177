"""`python -m kvlib.report run|index|check`: see kvlib.report.index."""

import sys

from kvlib.report.index import main

sys.exit(main())
