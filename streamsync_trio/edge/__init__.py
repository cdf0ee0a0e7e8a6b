"""The HTTP edge: assembles the ASGI app and translates OCI distribution requests to the core
and back (routes, zero-copy bodies, client auth, the access log, metrics, the status page).

May import: the top-level modules, ``core`` and ``upstream``.  Never ``ops``.
"""

from ._app import create_app

__all__ = ["create_app"]
