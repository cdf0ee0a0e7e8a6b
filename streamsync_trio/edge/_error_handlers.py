"""Every error a client sees is an OCI error document, with the registry API version header.

Registry clients understand nothing else: not Quart's HTML pages, not a traceback.  A
:class:`RegistryError` keeps its status, code and headers; Werkzeug's routing errors (404,
405) get the nearest OCI code; anything unexpected is logged and becomes a 500 ``UNKNOWN``.
"""

from __future__ import annotations

import logging

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from .._errors import RegistryError

log = logging.getLogger("streamsync_trio.http")

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


def error_response(error: RegistryError) -> Response:
    headers = {"Content-Type": "application/json", **API_VERSION_HEADER, **error.headers}
    return Response(error.to_json(), status=error.status, headers=headers)


def install_error_handlers(app: Quart, auth_realm: str) -> None:
    """Answer every error on ``app`` as an OCI error; every response carries the API version.

    ``auth_realm`` names the realm of the challenge a 401 without one gets."""

    @app.after_request
    async def api_version(response: Response) -> Response:
        response.headers.update(API_VERSION_HEADER)
        return response

    @app.errorhandler(RegistryError)
    async def registry_error(error: RegistryError) -> Response:
        if error.status == 401 and "WWW-Authenticate" not in error.headers:
            # RFC 7235: every 401 carries a challenge.  When the upstream refused us, the
            # client can do nothing with it but show it; that is still the honest answer.
            error.headers["WWW-Authenticate"] = f'Basic realm="{auth_realm}"'
        return error_response(error)

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        # Never an HTML traceback page: a registry client only understands OCI errors.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(RegistryError(500, "UNKNOWN", "internal error"))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "NOT_FOUND", 405: "UNSUPPORTED"}.get(status, "UNKNOWN")
        return error_response(RegistryError(status, code, error.description or error.name))
