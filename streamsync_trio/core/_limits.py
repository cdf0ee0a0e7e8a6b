"""What a download may take: how large its blob may be, and how much of the cache's disk.

Every download is bounded (:class:`SizeBound`): by the size a stored manifest declares for
the blob, which the upstream's length must match, or else by a maximum size; a length above
the bound, or a body growing past it, fails the download before the disk fills.  A known
length must also fit in the cache's free space, with what the other downloads in flight still
need, before the first byte is written (:func:`check_room`).

A refusal on these grounds is :class:`Refused`: final, never retried (see ``_retry``), since
asking again would get the same answer.  The checks are made by the producer (``_producer``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .._errors import RegistryError

# Free space a download of known size must leave on the cache's file system: room for what
# is written besides blobs (manifests, tag records and links, the workers' metrics files,
# the file system's own metadata).  Small, so a small cache disk can still take its blobs.
FREE_SPACE_MARGIN = 32 * 1024 * 1024

# What a client hears when the cache has no room for a blob: come back later (eviction or
# finishing downloads change the picture), no sooner than this.
_NO_ROOM_RETRY_AFTER = "30"


class Refused(RegistryError):
    """A download refused on policy (size bound, free space): final, never retried, since
    asking again would get the same answer."""


@dataclass(frozen=True, slots=True)
class SizeBound:
    """How large a blob may be, decided before its download starts.

    ``declared``: the size the repository's stored manifests give the blob's descriptor.  The
    digest of a manifest was verified, so this is the publisher's word: an upstream that
    announces another length is wrong (502, nothing cached), and an upstream that announces
    none is held to it.  ``maximum``: the bound for a blob no manifest we hold describes
    (``max_blob_size``).  None: unbounded (the core's own tests).
    """

    declared: int | None = None
    maximum: int | None = None

    def refusal(self, announced: int) -> RegistryError | None:
        """Why a blob the upstream announces as ``announced`` bytes is refused; None if not."""
        if self.declared is not None:
            if announced != self.declared:
                return size_invalid(
                    f"the upstream announces {announced} bytes, "
                    f"its manifest declares {self.declared}"
                )
            return None
        if self.maximum is not None and announced > self.maximum:
            return too_large(f"the upstream announces {announced} bytes", self.maximum)
        return None


# The bound of a download nothing bounds (the default; the core's own tests).
UNBOUNDED = SizeBound()


def too_large(what: str, maximum: int) -> RegistryError:
    return Refused(
        502,
        "SIZE_INVALID",
        f"upstream blob too large: {what}, above the limit of {maximum} (max_blob_size)",
    )


def refuse_growth(total: int, size: int | None, maximum: int | None) -> None:
    """Refuse a body that has grown to ``total`` bytes past the blob's ``size``, or past
    ``maximum`` when it has no size (whichever reader, async or pump, is reading it)."""
    if size is not None and total > size:
        raise size_invalid(f"the upstream sent more than its {size} bytes")
    if size is None and maximum is not None and total > maximum:
        raise too_large("the upstream sent more without a length", maximum)


def size_invalid(why: str) -> RegistryError:
    """The upstream's body disagrees with its own length or the declared size: wrong
    content, not a refusal on policy (yet not worth asking again either, see ``_retry``)."""
    return RegistryError(502, "SIZE_INVALID", f"upstream blob has the wrong size: {why}")


def check_room(size: int, written: int, others: int, free: int) -> None:
    """Refuse a blob of ``size`` bytes (``written`` of them already here) that the cache's
    disk cannot hold: what it still needs, plus what the other downloads here still need
    (``others``), plus a margin, must be ``free`` now.

    A check, not a reservation of blocks: another program (or another worker process) may
    still fill the disk, and then the write fails with ENOSPC (the producer answers that
    with :func:`no_room` too).
    """
    if free < size - written + others + FREE_SPACE_MARGIN:
        raise no_room(
            f"the blob has {size} bytes, {free} bytes are free "
            f"and downloads in flight still need {others}"
        )


def no_room(why: str) -> RegistryError:
    """No room in the cache.  503 UNAVAILABLE with Retry-After: the distribution spec has no
    code for it, 507 is WebDAV's and clients treat it as final, while a 503 is what registry
    clients retry (and eviction or downloads finishing may make room by then)."""
    return Refused(
        503,
        "UNAVAILABLE",
        f"not enough room in the cache: {why}",
        headers={"Retry-After": _NO_ROOM_RETRY_AFTER},
    )


def disk_free(root: Path) -> int:
    """Bytes an unprivileged writer may still put on the file system holding ``root``."""
    stat = os.statvfs(root)
    return stat.f_bavail * stat.f_frsize
