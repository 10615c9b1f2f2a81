"""`python -m worker.top`: the fleet's live view (see `worker/observability/top.py`)."""

import sys

from worker.observability.top import main

if __name__ == "__main__":
    sys.exit(main())
