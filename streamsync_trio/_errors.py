"""The one error type every layer raises, and its OCI wire form.

The distribution spec gives every failure a status *and* a machine-readable code
(``BLOB_UNKNOWN``, ``NAME_INVALID``, ...).  Raising a single exception type that already
carries both lets the core, the upstream client and the HTTP layer agree on what a client
will see without the core importing anything HTTP-shaped: the Quart layer only serialises.
"""

from __future__ import annotations

import json
from typing import Any


class RegistryError(Exception):
    """A failure with the HTTP status and OCI error code a client should receive."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    def to_json(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()

    def __repr__(self) -> str:
        return f"RegistryError({self.status}, {self.code!r}, {self.message!r})"


def name_invalid(name: str, why: str) -> RegistryError:
    return RegistryError(
        400, "NAME_INVALID", f"invalid repository name: {why}", detail={"name": name}
    )


def digest_invalid(digest: str, why: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", f"invalid digest: {why}", detail={"digest": digest})


def manifest_invalid(why: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_INVALID", why)


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", detail={"digest": digest})


def manifest_unknown(reference: str) -> RegistryError:
    return RegistryError(
        404, "MANIFEST_UNKNOWN", "manifest unknown", detail={"reference": reference}
    )


def name_unknown(name: str, why: str = "repository name not known to registry") -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", why, detail={"name": name})


def unsupported(why: str) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", why)


def range_not_satisfiable(size: int) -> RegistryError:
    return RegistryError(
        416,
        "UNSUPPORTED",
        "requested range not satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )


def upstream_unavailable(upstream: str, why: str) -> RegistryError:
    return RegistryError(502, "UNAVAILABLE", f"upstream {upstream}: {why}")


def upstream_timeout(upstream: str, why: str) -> RegistryError:
    return RegistryError(504, "UNAVAILABLE", f"upstream {upstream} timed out: {why}")
