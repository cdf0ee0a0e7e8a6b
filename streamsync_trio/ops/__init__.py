"""Running and operating the proxy: the command line, the ``serve --workers`` supervisor,
``prefetch``, and process-wide tuning.

May import: everything else in the package (it is the top of the stack); nothing imports it
except the entry points (``__main__``, ``app``).
"""

from ._cli import main
from ._process import tune_malloc

__all__ = ["main", "tune_malloc"]
