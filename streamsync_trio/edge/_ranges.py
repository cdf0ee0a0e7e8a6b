"""HTTP ``Range`` for blobs: one ``bytes=`` range, or none."""

from __future__ import annotations

import re

from .._errors import range_not_satisfiable

_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return ``(start, end_exclusive)``, ``None`` to send the whole blob, or raise 416.

    Only single ``bytes=`` ranges are served (that is what docker and containerd send to
    resume a layer).  A malformed or multi-part ``bytes=`` range is answered 416 rather than
    silently ignored, so a client that sent one learns it at once; other units are ignored,
    as RFC 9110 allows.
    """
    if header is None:
        return None
    header = header.strip()
    if not header.lower().startswith("bytes="):
        return None
    match = _RANGE_RE.fullmatch(header.replace(" ", "").lower())
    if match is None:
        raise range_not_satisfiable(size)
    first, last = match.groups()
    if first == "" and last == "":
        raise range_not_satisfiable(size)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise range_not_satisfiable(size)
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or (last != "" and int(last) < start):
        raise range_not_satisfiable(size)
    return start, end
