"""`python -m worker.acl`: the Redis ACL lines of the workers and of each tenant (see `worker/tools/acl.py`)."""

import sys

from worker.tools.acl import main

if __name__ == "__main__":
    sys.exit(main())
