"""The proxy's decisions, with no HTTP in them: downloads and their subscribers, who owns an
in-flight digest, the store, eviction, manifests, listings and the background tasks.

May import: the top-level modules (``_config``, ``_errors``, ``_reference``, ``_logging``) and
``upstream``.  Never ``edge`` or ``ops``: the core is driven, it does not drive.
"""

from ._blobs import BlobHead, BlobRead, BlobService
from ._downloads import BlobBody, BlobSource, Download, Subscriber
from ._eviction import CacheKeeper, collect_garbage
from ._lease import LeaseFiles
from ._limits import SizeBound
from ._listings import (
    INDEX_MEDIA_TYPE,
    TAGS_CONTENT_TYPE,
    ListingCache,
    fetch_all,
    paginate,
    parse_referrers,
    parse_tag_query,
    parse_tags,
    referrers_size,
    render_referrers,
    render_tags,
    sorted_tags,
    tags_link,
    tags_size,
    upstream_not_found,
)
from ._manifests import DEFAULT_ACCEPT, CachedManifest, ManifestService
from ._negative import remembering
from ._negotiation import Accept
from ._owners import Claim, Elsewhere, Owners
from ._pagecache import FileRange, cache_read_failed
from ._registry import DownloadRegistry
from ._retry import RetryPolicy
from ._scrub import Finding, ScrubReport, content_listing, prune_links, scrub
from ._store import Store, Usage
from ._tag_sharing import SharedTag, SharedTags, TagKey
from ._tasks import BackgroundTasks

__all__ = [
    "Accept",
    "BackgroundTasks",
    "BlobBody",
    "BlobHead",
    "BlobRead",
    "BlobService",
    "BlobSource",
    "CacheKeeper",
    "CachedManifest",
    "Claim",
    "DEFAULT_ACCEPT",
    "Download",
    "DownloadRegistry",
    "Elsewhere",
    "FileRange",
    "Finding",
    "INDEX_MEDIA_TYPE",
    "LeaseFiles",
    "ListingCache",
    "ManifestService",
    "Owners",
    "RetryPolicy",
    "ScrubReport",
    "SharedTag",
    "SharedTags",
    "SizeBound",
    "Store",
    "Subscriber",
    "TAGS_CONTENT_TYPE",
    "TagKey",
    "Usage",
    "cache_read_failed",
    "collect_garbage",
    "content_listing",
    "fetch_all",
    "paginate",
    "parse_referrers",
    "parse_tag_query",
    "parse_tags",
    "prune_links",
    "referrers_size",
    "remembering",
    "render_referrers",
    "render_tags",
    "scrub",
    "sorted_tags",
    "tags_link",
    "tags_size",
    "upstream_not_found",
]
