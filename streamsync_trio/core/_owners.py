"""The one question the registry asks before it fetches a blob: who owns digest D, and how
do I read its bytes?

Inside one process the :class:`~._registry.DownloadRegistry` dict answers "is this digest
in flight here".  When it is not, the registry asks an :class:`Owners` implementation, and
gets one of two answers:

* a :class:`Claim`: this process owns the download.  The registry's producer writes the
  claim's ``partial`` file, publishes the size through the claim as soon as it is known, and
  releases the claim last, after the partial was committed or removed.
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
3. Cluster mode (another machine) is a third implementation of this same interface: a
   Redis lease per digest decides the owner, and its :class:`Elsewhere` streams the owner
   node's bytes over HTTP into a local file.  The registry does not change.

What the registry relies on, whatever the implementation:

* :meth:`Owners.claim` is synchronous and never blocks, so looking up, claiming and joining
  happen in one scheduling step: two requests in this process can never both start a
  producer for one digest.
* ``None`` from :meth:`Owners.claim` means an owner elsewhere ended while we looked (no
  checkpoint since): its blob is in the store if it committed; the registry looks there,
  then claims again.
* When :meth:`Elsewhere.follow` returns, the owner committed and ``download.path`` is the
  stored blob that holds exactly the bytes the subscribers read; the registry then marks the
  download verified in the same step.  Any other end raises ``RegistryError`` (or
  ``OSError``, for local disk trouble).  Correctness never rests on the owners: a wrong
  answer can only cost duplicate upstream bytes, since every blob is verified by digest and
  committed by atomic rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .._reference import Digest

if TYPE_CHECKING:
    from ._downloads import Download


class Claim(Protocol):
    """This process owns the download of a digest until it releases the claim."""

    @property
    def partial(self) -> Path:
        """The file the producer writes (created, empty, by the claim)."""
        ...

    def publish_size(self, size: int) -> None:
        """Tell followers elsewhere the blob's size.  May raise ``OSError``."""
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

    async def follow(self, download: Download) -> None:
        """Mirror the owner's progress into ``download`` until the owner ends; on return
        ``download.path`` is the committed blob.  Raises ``RegistryError`` when the owner
        failed, ``OSError`` when its bytes cannot be read here."""
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
