"""``python -m relay``: the same command line as ``retm-relay``."""

import sys

from relay.cli.main import main

sys.exit(main())
