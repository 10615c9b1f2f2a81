"""`python -m producer.bulk`: the bulk jobs CLI (the same as the console script `llm-bulk`)."""

import sys

from producer.bulk import main

sys.exit(main())
