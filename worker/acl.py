"""`python -m worker.acl`: the workers' and each tenant's Redis ACL lines (`worker/tools/acl.py`)."""

import sys

from worker.tools.acl import main

if __name__ == "__main__":
    sys.exit(main())
