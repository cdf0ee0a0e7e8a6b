"""``python -m streamsync_trio``: the same as the ``streamsync-trio`` command."""

import sys

from .ops import main

if __name__ == "__main__":
    sys.exit(main())
