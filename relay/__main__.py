"""``python -m relay``: the same command line as ``retm-relay``."""

import sys

from relay.cli import main

sys.exit(main())
