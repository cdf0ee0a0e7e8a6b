"""When a dropped or stalled upstream body is asked for again, and how long to wait first.

The producer (``_producer``) resumes a download with ``Range: bytes=<available>-`` after a
transient failure: the upstream faltered (502/503/504) or asked us to wait (429, maybe with
``Retry-After``).  Wrong content is not transient, nor is a refusal on policy (``_limits``):
asking again would only hammer the upstream for the same answer.  Retries are bounded, with
exponential backoff and full jitter, so clients hear a down upstream promptly and retries
from many proxies never synchronise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .._errors import RegistryError
from ._limits import Refused

# Errors about the content itself: the upstream sent the wrong bytes.
_CONTENT_ERRORS = ("DIGEST_INVALID", "SIZE_INVALID")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded resumption of a dropped or stalled upstream body."""

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    # Honour an upstream Retry-After, but never wait longer than this for one attempt.
    retry_after_cap: float = 60.0

    def budget(self, size: int | None, error: RegistryError) -> int:
        """How many retries this failure may use.

        Resuming a transfer that started (we know the blob's size) is worth the whole budget,
        and so is an upstream that asked us to wait.  But an upstream that never answered is
        most likely down: one quick retry for a blip, then the clients hear it promptly
        instead of waiting through every backoff.
        """
        if size is not None or "Retry-After" in error.headers:
            return self.max_retries
        return min(self.max_retries, 1)

    def delay(self, attempt: int, error: RegistryError) -> float:
        retry_after = error.headers.get("Retry-After", "")
        if retry_after.isdigit():
            # Honour the upstream's wait (our own 429s carry the remaining cool-down).
            return min(float(retry_after), self.retry_after_cap)
        # Exponential backoff with full jitter: retries from many proxies never synchronise.
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))


def is_transient(error: RegistryError) -> bool:
    """Worth another attempt: the upstream faltered or asked us to wait.  Wrong content is
    not transient: asking again for what the upstream sent wrong would only hammer it."""
    return (
        error.status in (429, 502, 503, 504)
        and error.code not in _CONTENT_ERRORS
        and not isinstance(error, Refused)
    )
