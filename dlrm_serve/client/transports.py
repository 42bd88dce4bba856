"""One call to TorchServe over gRPC or REST, with errors mapped to the library's.

A transport sends exactly one request and either returns the answer or
raises an error of the :mod:`dlrm_serve.errors` family; retries, tokens and
concurrency live in :class:`~dlrm_serve.client.core.Client`.

gRPC status codes are mapped back to the HTTP statuses TorchServe derived
them from (its ``GRPCUtils.getGRPCStatusCode`` table), so both transports
raise the same errors for the same problem.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from dlrm_serve.errors import AuthError, DLRMServeError, ServerError
from dlrm_serve.client.payloads import Payload, error_for, error_from_body
from dlrm_serve.io.replies import ACCEPT_INPUT, BINARY_REPLY_TYPE

BINARY_REPLY_BYTES = BINARY_REPLY_TYPE.encode()

__all__ = [
    "GRPC_TO_HTTP",
    "WORKER_DIED",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GrpcTransport",
    "RestTransport",
    "error_from_grpc",
    "error_from_http",
    "fetch_token",
    "parse_management",
]

# 256 MiB each way: gRPC's 4 MiB receive default is too small for big batches.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# gRPC status name -> the HTTP status TorchServe maps to it.
GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 413,
    "OUT_OF_RANGE": 416,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "FAILED_PRECONDITION": 500,
    "INTERNAL": 500,
    "UNKNOWN": 500,
}


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def parse_management(text: str | bytes) -> Any:
    """A management answer: its JSON value, or ``{"status": text}`` for plain text."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return {"status": text.strip()}


# ----- errors -------------------------------------------------------------------
# TorchServe's message for the requests of a batch whose worker died (killed,
# crashed, or restarted after responseTimeout): REST 507, gRPC RESOURCE_EXHAUSTED.
WORKER_DIED = "worker died"

def error_from_http(status: int, body: bytes, what: str = "the server") -> DLRMServeError:
    """The library's error for a REST answer that is not 200."""
    try:
        obj = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("message"), str):
        err = error_from_body({**obj, "code": status})
        if err is not None:
            return err
    text = body[:300].decode("utf-8", errors="replace").strip() if body else ""
    return error_for(status, f"{what} answered HTTP {status}" + (f": {text}" if text else ""))


# TorchServe's Java exceptions whose HTTP status its gRPC side does not keep
# (they arrive as INTERNAL with the class name on the last line of the details).
_JAVA_EXCEPTIONS = {
    "ModelNotFoundException": 404,
    "ModelVersionNotFoundException": 404,
    "BadRequestException": 400,
    "ConflictStatusException": 409,
    "ServiceUnavailableException": 503,
    "RequestTimeoutException": 408,
    "InvalidKeyException": 400,
}
_JAVA_CLASS = re.compile(r"^(?:[a-z_][a-z0-9_]*\.)*([A-Z][A-Za-z0-9_$]*Exception)(?:\.\(\))?$")


def _split_java_class(details: str) -> tuple[str, str | None]:
    """``"Model not found: m\norg.pytorch...ModelNotFoundException"`` -> message, class name."""
    lines = details.strip().splitlines()
    if len(lines) >= 2:
        m = _JAVA_CLASS.match(lines[-1].strip())
        if m:
            return "\n".join(lines[:-1]).strip(), m.group(1)
    return details.strip(), None


def error_from_grpc(err: Any, what: str = "the server") -> DLRMServeError:
    """The library's error for a ``grpc.RpcError``, with the server's message."""
    code = err.code() if hasattr(err, "code") else None
    name = getattr(code, "name", str(code))
    details, java_type = _split_java_class((err.details() if hasattr(err, "details") else None) or "")
    status = GRPC_TO_HTTP.get(name, 500)
    if java_type in _JAVA_EXCEPTIONS and name in ("INTERNAL", "UNKNOWN"):
        status = _JAVA_EXCEPTIONS[java_type]
    if WORKER_DIED in details.lower():
        # REST answers 507 "Worker died."; gRPC turns that into RESOURCE_EXHAUSTED,
        # which must not read as a request that is too large.
        return ServerError(details, status=507)
    if status == 503:
        message = f"{what} is unavailable: {details}" if details else f"{what} is unavailable"
        return ServerError(message, status=503)
    if name == "DEADLINE_EXCEEDED":
        return ServerError(f"{what} did not answer in time ({details or 'deadline exceeded'})", status=504)
    if name == "RESOURCE_EXHAUSTED" and "larger than max" in details:
        # The client's own limit: the request or answer is too big for one message.
        return error_for(413, f"gRPC message too large: {details}; send fewer rows per request")
    if name in ("PERMISSION_DENIED", "UNAUTHENTICATED") and "token" in details.lower():
        return AuthError(details, status=status)
    return error_for(status, details or f"{what} failed with gRPC status {name}", java_type)


# ----- gRPC ---------------------------------------------------------------------
class GrpcTransport:
    """TorchServe's gRPC inference and management services (stubs from :mod:`dlrm_serve.client.protos`).

    ``inference_target`` / ``management_target``: ``host:port``.
    ``credentials``: ``grpc.ChannelCredentials`` for TLS, else plaintext.
    """

    name = "grpc"

    def __init__(
        self,
        inference_target: str,
        management_target: str | None = None,
        *,
        timeout: float = 60.0,
        management_timeout: float = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: Any = None,
        options: list[tuple[str, Any]] | None = None,
    ):
        import grpc

        from dlrm_serve.client import protos

        self._grpc = grpc
        self._pb = protos.load()
        self.inference_target = inference_target
        self.management_target = management_target
        self.timeout = timeout
        self.management_timeout = management_timeout
        opts = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            *(options or []),
        ]

        def channel(target: str):
            if credentials is not None:
                return grpc.secure_channel(target, credentials, options=opts)
            return grpc.insecure_channel(target, options=opts)

        self._channels = [channel(inference_target)]
        self._inference = self._pb.inference_pb2_grpc.InferenceAPIsServiceStub(self._channels[0])
        self._management = None
        if management_target is not None:
            self._channels.append(channel(management_target))
            self._management = self._pb.management_pb2_grpc.ManagementAPIsServiceStub(self._channels[-1])

    @staticmethod
    def _metadata(key: str | None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {key}")] if key else []

    def _call(self, method, request, key: str | None, timeout: float, what: str):
        try:
            return method(request, metadata=self._metadata(key), timeout=timeout)
        except self._grpc.RpcError as e:
            raise error_from_grpc(e, what) from None

    def predict(
        self, model: str, version: str | None, payload: Payload, key: str | None, timeout: float | None = None
    ) -> bytes:
        """One prediction; ``timeout`` seconds (default: the transport's)."""
        # Ask for float32 bytes (dlrm_serve.io.replies); an older server ignores the input.
        return self.predict_inputs(model, version, {"data": payload.body, ACCEPT_INPUT: BINARY_REPLY_BYTES}, key, timeout)

    def predict_inputs(
        self, model: str, version: str | None, inputs: dict[str, bytes], key: str | None, timeout: float | None = None
    ) -> bytes:
        """``Predictions`` with a free-form input map (TorchServe's own client sends ``data``)."""
        req = self._pb.inference_pb2.PredictionsRequest(model_name=model, model_version=version or "", input=inputs)
        t = self.timeout if timeout is None else timeout
        resp = self._call(self._inference.Predictions, req, key, t, f"gRPC {self.inference_target}")
        return resp.prediction

    def explain(self, model: str, version: str | None, payload: Payload, key: str | None, method: str | None = None) -> bytes:
        """Explanations over gRPC: the inputs ``explain`` (and ``method``) next to ``data``."""
        inputs = {"data": payload.body, "explain": b"true"}
        if method:
            inputs["method"] = method.encode()
        return self.predict_inputs(model, version, inputs, key)

    def ping(self, key: str | None) -> str:
        resp = self._call(self._inference.Ping, self._pb.empty_pb2.Empty(), key, self.timeout, f"gRPC {self.inference_target}")
        value = parse_management(resp.health)
        return value.get("status", resp.health) if isinstance(value, dict) else str(value)

    def _manage(self, rpc: str, request_type: str, key: str | None, **fields) -> Any:
        if self._management is None:
            raise ServerError("no gRPC management address was given to this client")
        req = getattr(self._pb.management_pb2, request_type)(**{k: v for k, v in fields.items() if v is not None})
        resp = self._call(
            getattr(self._management, rpc), req, key, self.management_timeout, f"gRPC {self.management_target}"
        )
        return parse_management(resp.msg)

    def list_models(self, key: str | None, limit: int, next_page_token: int | None) -> Any:
        return self._manage("ListModels", "ListModelsRequest", key, limit=limit, next_page_token=next_page_token)

    def describe_model(self, key: str | None, name: str, version: str | None, customized: bool) -> Any:
        return self._manage(
            "DescribeModel", "DescribeModelRequest", key, model_name=name, model_version=version, customized=customized
        )

    def register_model(self, key: str | None, **params) -> Any:
        return self._manage("RegisterModel", "RegisterModelRequest", key, **params)

    def scale_workers(self, key: str | None, **params) -> Any:
        return self._manage("ScaleWorker", "ScaleWorkerRequest", key, **params)

    def set_default(self, key: str | None, name: str, version: str) -> Any:
        return self._manage("SetDefault", "SetDefaultRequest", key, model_name=name, model_version=version)

    def unregister_model(self, key: str | None, name: str, version: str | None) -> Any:
        return self._manage("UnregisterModel", "UnregisterModelRequest", key, model_name=name, model_version=version)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


# ----- REST ---------------------------------------------------------------------
def _requests_error(e: Exception, url: str) -> DLRMServeError:
    import requests

    if isinstance(e, requests.exceptions.ConnectTimeout):
        # Like gRPC's UNAVAILABLE: nothing reached the server, so a retry is safe.
        return ServerError(f"cannot reach {url}: {type(e).__name__}", status=503)
    if isinstance(e, requests.exceptions.ConnectionError) and _reset(e):
        # The request may have been sent; predictions are idempotent, so the client retries it.
        return ServerError(f"the connection to {url} was lost (reset by the server)", status=503)
    if isinstance(e, requests.exceptions.ConnectionError):
        return ServerError(f"cannot reach {url}: {type(e).__name__}", status=503)
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return ServerError(f"the connection to {url} was lost mid-answer", status=503)
    if isinstance(e, requests.exceptions.Timeout):
        return ServerError(f"{url} did not answer in time", status=504)
    return ServerError(f"request to {url} failed: {e}")


def _reset(e: BaseException) -> bool:
    """Whether a requests error was caused by a reset or dropped connection."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return True
        if "RemoteDisconnected" in type(e).__name__ or "Connection aborted" in str(e):
            return True
        args = getattr(e, "args", ())
        inner = args[0] if args and isinstance(args[0], BaseException) else None
        e = getattr(e, "reason", None) or inner or e.__cause__ or e.__context__
        seen += 1
    return False


class RestTransport:
    """TorchServe's REST inference and management APIs (``requests``, pooled connections)."""

    name = "rest"

    def __init__(
        self,
        inference_url: str,
        management_url: str | None = None,
        *,
        timeout: float = 60.0,
        management_timeout: float = 300.0,
        pool_size: int = 16,
        verify: Any = True,
    ):
        import requests
        from requests.adapters import HTTPAdapter

        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/") if management_url else None
        self.timeout = timeout
        self.management_timeout = management_timeout
        self._session = requests.Session()
        self._session.verify = verify
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size), max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def _send(self, method: str, url: str, key: str | None, timeout: float, **kwargs):
        headers = {**_bearer(key), **kwargs.pop("headers", {})}
        try:
            r = self._session.request(method, url, headers=headers, timeout=timeout, **kwargs)
        except Exception as e:  # requests' exceptions, mapped once here
            import requests

            if isinstance(e, requests.exceptions.RequestException):
                raise _requests_error(e, url) from None
            raise
        if r.status_code != 200:
            raise error_from_http(r.status_code, r.content, f"{method} {url}")
        return r

    def predict(
        self, model: str, version: str | None, payload: Payload, key: str | None, timeout: float | None = None
    ) -> bytes:
        """One prediction; ``timeout`` seconds (default: the transport's)."""
        url = f"{self.inference_url}/predictions/{_q(model)}" + (f"/{_q(version)}" if version else "")
        t = self.timeout if timeout is None else timeout
        headers = {"Content-Type": payload.content_type, "Accept": f"{BINARY_REPLY_TYPE}, application/json;q=0.5"}
        r = self._send("POST", url, key, t, data=payload.body, headers=headers)
        return r.content

    def explain(self, model: str, version: str | None, payload: Payload, key: str | None, method: str | None = None) -> bytes:
        """``POST /explanations/{model}``, with the header ``X-Explain-Method`` when a method is asked for."""
        url = f"{self.inference_url}/explanations/{_q(model)}" + (f"/{_q(version)}" if version else "")
        headers = {"Content-Type": payload.content_type, **({"X-Explain-Method": method} if method else {})}
        r = self._send("POST", url, key, self.timeout, data=payload.body, headers=headers)
        return r.content

    def ping(self, key: str | None) -> str:
        r = self._send("GET", f"{self.inference_url}/ping", key, self.timeout)
        value = parse_management(r.content)
        return value.get("status", r.text) if isinstance(value, dict) else str(value)

    def _manage(self, method: str, path: str, key: str | None, query: dict | None = None) -> Any:
        if self.management_url is None:
            raise ServerError("no REST management address was given to this client")
        q = {k: _qv(v) for k, v in (query or {}).items() if v is not None}
        url = f"{self.management_url}{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        r = self._send(method, url, key, self.management_timeout)
        return parse_management(r.content)

    def list_models(self, key: str | None, limit: int, next_page_token: int | None) -> Any:
        return self._manage("GET", "/models", key, {"limit": limit, "next_page_token": next_page_token})

    def describe_model(self, key: str | None, name: str, version: str | None, customized: bool) -> Any:
        path = f"/models/{_q(name)}" + (f"/{_q(version)}" if version else "")
        return self._manage("GET", path, key, {"customized": True} if customized else None)

    def register_model(self, key: str | None, **params) -> Any:
        return self._manage("POST", "/models", key, params)

    def scale_workers(self, key: str | None, *, model_name: str, model_version: str | None = None, **params) -> Any:
        path = f"/models/{_q(model_name)}" + (f"/{_q(model_version)}" if model_version else "")
        return self._manage("PUT", path, key, params)

    def set_default(self, key: str | None, name: str, version: str) -> Any:
        return self._manage("PUT", f"/models/{_q(name)}/{_q(version)}/set-default", key)

    def unregister_model(self, key: str | None, name: str, version: str | None) -> Any:
        path = f"/models/{_q(name)}" + (f"/{_q(version)}" if version else "")
        return self._manage("DELETE", path, key)

    def close(self) -> None:
        self._session.close()


def _q(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _qv(v: Any) -> Any:
    return ("true" if v else "false") if isinstance(v, bool) else v


def fetch_token(management_url: str, api_key: str, kind: str, timeout: float = 30.0) -> dict | None:
    """Ask TorchServe for a new ``kind`` key (``GET /token?type=kind`` with the API key).

    Returns the answer's JSON object when it has one.  TorchServe 0.12.0
    answers with an empty body and writes the new key to ``key_file.json``;
    the caller then reads that file.
    """
    import requests

    url = f"{management_url.rstrip('/')}/token?type={_q(kind)}"
    try:
        r = requests.get(url, headers=_bearer(api_key), timeout=timeout)
    except requests.exceptions.RequestException as e:
        raise _requests_error(e, url) from None
    if r.status_code != 200:
        err = error_from_http(r.status_code, r.content, f"GET {url}")
        if isinstance(err, AuthError):
            raise AuthError(f"the API key was refused while renewing the {kind} key: {err.message}")
        raise err
    if not r.content.strip():
        return None
    try:
        value = json.loads(r.content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
