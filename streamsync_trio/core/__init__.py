"""The proxy's decisions, with no HTTP in them: downloads and their subscribers, who owns an
in-flight digest, the store, eviction, manifests, listings and the background tasks.

May import: the top-level modules (``_config``, ``_errors``, ``_reference``, ``_logging``) and
``upstream``.  Never ``edge`` or ``ops``: the core is driven, it does not drive.
"""

from ._eviction import CacheKeeper, collect_garbage
from ._listings import ListingCache
from ._manifests import DEFAULT_ACCEPT, CachedManifest, ManifestService
from ._negative import remembering
from ._negotiation import Accept
from ._scrub import Finding, ScrubReport, content_listing, prune_links, scrub
from ._store import Store
from ._streaming import (
    DownloadRegistry,
    FileRange,
    RetryPolicy,
    SizeBound,
    Subscriber,
    cache_read_failed,
)
from ._tasks import BackgroundTasks

__all__ = [
    "Accept",
    "BackgroundTasks",
    "CacheKeeper",
    "CachedManifest",
    "DEFAULT_ACCEPT",
    "DownloadRegistry",
    "FileRange",
    "Finding",
    "ListingCache",
    "ManifestService",
    "RetryPolicy",
    "ScrubReport",
    "SizeBound",
    "Store",
    "Subscriber",
    "cache_read_failed",
    "collect_garbage",
    "content_listing",
    "prune_links",
    "remembering",
    "scrub",
]
