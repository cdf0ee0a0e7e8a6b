"""The one question the registry asks before it fetches a blob: who owns digest D, and how
do I read its bytes?

Inside one process the :class:`~._registry.DownloadRegistry` dict answers "is this digest
in flight here".  When it is not, the registry asks an :class:`Owners` implementation, and
gets one of two answers:

* a :class:`Claim`: this process owns the download.  The registry's producer writes the
  claim's ``partial`` file from the source the claim chooses (:meth:`Claim.source`),
  publishes the size through the claim as soon as it is known, commits the verified partial
  if the claim keeps it (:meth:`Claim.keeps`) or removes it, and releases the claim last.
* an :class:`Elsewhere`: another owner has it.  The registry registers a
  :class:`~._downloads.Download` marked ``followed``, whose subscribers read the owner's
  bytes through :meth:`Elsewhere.open_reader`, and runs :meth:`Elsewhere.follow`, which
  mirrors the owner's progress (size, bytes available, "the upstream answered") into that
  download until the owner ends.

The answers today (design.md §8):

1. This process: a :class:`Claim`, from whichever implementation.
2. Another process on this machine: the lease files in the cache directory
   (:class:`~._lease.LeaseFiles`, the default), ``flock`` held by the owner, its partial
   tailed from a held descriptor.
3. Another machine (cluster mode, ``streamsync_trio.cluster``): wraps the lease files.  A
   local :class:`Claim` chooses its bytes' source per attempt: a Redis lease per digest
   decides which node fetches from the upstream, and the others read that node's bytes
   over HTTP into a download of their own (so their clients join it as usual).  With
   ``placement = "shard"`` a node keeps only the digests it is the home of
   (:meth:`Claim.keeps`); the others it streams through to their clients.

What the registry relies on, whatever the implementation:

* :meth:`Owners.claim` is synchronous and never blocks, so looking up, claiming and joining
  happen in one scheduling step: two requests in this process can never both start a
  producer for one digest.
* ``None`` from :meth:`Owners.claim` means an owner elsewhere ended while we looked (no
  checkpoint since): its blob is in the store if it committed; the registry looks there,
  then claims again.
* When :meth:`Elsewhere.follow` returns, the owner verified the bytes the subscribers read,
  and the registry marks the download verified in the same step.  It returns True when the
  owner committed them (``download.path`` is the stored blob, the very file read), False when
  the owner did not keep them (:meth:`Claim.keeps`: the subscribers' descriptors hold the
  only copy, and nothing is stored).  Any other end raises ``RegistryError`` (or ``OSError``,
  for local disk trouble).  Correctness never rests on the owners: a wrong
  answer can only cost duplicate upstream bytes, since every blob is verified by digest and
  committed by atomic rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .._reference import Digest

if TYPE_CHECKING:
    from ._downloads import BlobSource, Download


class Claim(Protocol):
    """This process owns the download of a digest until it releases the claim."""

    @property
    def partial(self) -> Path:
        """The file the producer writes (created, empty, by the claim)."""
        ...

    def source(self, upstream: BlobSource, download: Download, *, forwardable: bool) -> BlobSource:
        """Where the producer reads the blob's bytes: ``upstream`` (one machine), or a source
        that re-decides on every attempt (cluster mode: the node that owns the download, or
        the upstream under a lease).  The producer calls the source once per attempt, so a
        resume may read from somewhere else than the attempt before it.

        ``forwardable`` is False when the request came from another node: its bytes then
        never come from a third node (one hop, no loops).
        """
        ...

    def publish_size(self, size: int) -> None:
        """Tell followers elsewhere the blob's size.  May raise ``OSError``."""
        ...

    async def keeps(self, download: Download) -> bool:
        """Asked once the download is verified, before the commit: whether this node keeps
        the blob (True: committed into the store) or only streamed it through to the
        subscribers that joined (False: the partial is removed; they read on from their
        descriptors).  One machine always keeps; cluster mode with ``placement = "shard"``
        keeps only the digests this node is the home of.  Never raises.
        """
        ...

    def abandon(self) -> None:
        """Give up before any download started: the partial goes, then the claim."""
        ...

    def release(self) -> None:
        """Let go, after the partial was committed or removed: followers elsewhere look for
        the result from this moment on."""
        ...


@runtime_checkable
class Elsewhere(Protocol):
    """Another owner has the download; this process mirrors its progress."""

    @property
    def path(self) -> Path:
        """Where the owner's bytes are while in flight (for messages: reads go through
        :meth:`open_reader`)."""
        ...

    def open_reader(self) -> int:
        """A new descriptor (the caller closes it) that reads the bytes written so far, valid
        even if the owner renames or removes its file meanwhile."""
        ...

    async def follow(self, download: Download) -> bool:
        """Mirror the owner's progress into ``download`` until the owner ends with verified
        bytes: True when it committed them (``download.path`` is now the stored blob), False
        when it did not keep them (reads go on through :meth:`open_reader`'s descriptors).
        Raises ``RegistryError`` when the owner failed, ``OSError`` when its bytes cannot be
        read here."""
        ...

    def close(self) -> None:
        """Let go of whatever the follower holds.  Called once, after :meth:`follow`."""
        ...


class Owners(Protocol):
    """Who owns the download of a digest (see the module's docstring)."""

    def claim(self, digest: Digest) -> Claim | Elsewhere | None:
        """Own the download of ``digest``, or learn who does; None when an owner elsewhere
        ended while we looked.  Synchronous and never blocks.

        Raises ``RegistryError`` (503 with Retry-After) when ownership cannot be settled
        now, ``OSError`` for local disk trouble (the registry answers 500).
        """
        ...
