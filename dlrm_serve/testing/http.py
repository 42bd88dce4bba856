"""One raw HTTP call that sends exactly the headers given (tests of the wire)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

from dlrm_serve.errors import UsageError

__all__ = ["Response", "http_request"]


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict

    def header(self, name: str) -> str | None:
        """A response header, by case-insensitive name."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    method: str,
    url: str,
    *,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One HTTP call; any status comes back as a :class:`Response` (no raise on 4xx/5xx).

    Sends exactly the headers given: unlike urllib, no form content type is
    added to a body sent without one.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"only http:// URLs are supported, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=dict(headers or {}))
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), dict(resp.getheaders()))
    finally:
        conn.close()
