"""A KServe predictor for DLRM: ``dlrm-serve kserve --artifacts DIR``.

Runs :class:`DLRMModel`, a ``kserve.Model``, in ``kserve.ModelServer``
(kserve 0.21), which serves:

- KServe v1 ``POST /v1/models/{name}:predict`` with ``{"instances": [...]}``;
- the Open Inference Protocol (v2) ``POST /v2/models/{name}/infer`` over REST
  (JSON or binary tensor data) and over gRPC as the standard
  ``inference.GRPCInferenceService``, so stock ``tritonclient.http`` and
  ``tritonclient.grpc`` work unchanged;
- liveness and readiness (``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}/ready``, ``/v1/models/{name}``) and Prometheus
  ``/metrics``.

Decoding is the library's: v1 bodies go through
:func:`dlrm_serve.io.codecs.decode_request`, v2 tensors through
:func:`dlrm_serve.serve.oip.raw_batch`, both ending in the same
:class:`~dlrm_serve.io.features.FeatureEncoder` and backend as TorchServe's
handler, with the same error messages (HTTP 400 ``{"error": ...}``, gRPC
INVALID_ARGUMENT).

kserve is imported only here, when this module is imported (``pip install
'dlrm-serve[kserve]'``); the TorchServe path never imports this module and the
model archive leaves it out.  The servers bind to
``--host`` (default 127.0.0.1): kserve 0.21 itself always binds every
interface, so :func:`serve` narrows its REST and gRPC servers to the host.
It also reads an infer body sent without Content-Type as JSON, as
tritonclient.http sends it (see :class:`_JSONByDefault`).
"""

from __future__ import annotations

import sys
import threading
from concurrent import futures
from typing import Any

from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.io.codecs import MAX_ROWS, decode_request, predictions_body
from dlrm_serve.errors import DLRMServeError, NotReady, ToolchainError
from dlrm_serve.io.features import FeatureEncoder

__all__ = ["DLRMModel", "serve", "main_args"]

LOOPBACK = "127.0.0.1"


def _import_kserve():
    """Import kserve with a bare argv: kserve.model_server parses sys.argv when imported."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kserve
        import kserve.model_server  # noqa: F401
    except ImportError:
        raise ToolchainError(
            "the KServe predictor needs kserve: pip install 'dlrm-serve[kserve]' (kserve==0.21.0)"
        ) from None
    finally:
        sys.argv = saved
    return kserve


kserve = _import_kserve()

import kserve.model_server as _model_server  # noqa: E402
import kserve.protocol.rest.multiprocess.server as _multiprocess  # noqa: E402
from grpc import aio  # noqa: E402
from kserve.errors import InvalidInput as KServeInvalidInput  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: E402
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor  # noqa: E402
from kserve.protocol.grpc.server import GRPCServer  # noqa: E402
from kserve.protocol.grpc.servicer import InferenceServicer  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402
from kserve.protocol.rest.server import RESTServer  # noqa: E402

from dlrm_serve.serve import oip  # noqa: E402


class DLRMModel(kserve.Model):
    """DLRM behind kserve: v1 instances and v2 tensors, one backend.

    Pickled (kserve's REST worker processes are spawned with the model
    registry), it carries only its settings and loads the artifacts again in
    the worker.
    """

    def __init__(self, name: str, artifacts: str, backend: str = "torch", threads: int = 0, max_rows: int = MAX_ROWS):
        super().__init__(name)
        self.artifacts = artifacts
        self.backend_kind = backend
        self.threads = threads
        self.max_rows = max_rows
        self.version = "1"
        self.backend = None
        self.encoder: FeatureEncoder | None = None

    def load(self) -> bool:
        self.backend = load_backend(self.artifacts, self.backend_kind, threads=self.threads or None)
        self.encoder = FeatureEncoder(self.backend.config)
        self.ready = True
        return self.ready

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(backend=None, encoder=None)
        state.pop("_loading", None)
        return state

    def __setstate__(self, state: dict) -> None:
        # In a spawned REST worker.  kserve kills a worker that does not answer
        # its parent's ping within 5 s, so the artifacts load in the background
        # and the first requests wait for them.
        self.__dict__.update(state)
        self._loading = threading.Thread(target=self.load, name="dlrm-load", daemon=True)
        self._loading.start()

    def _loaded(self) -> None:
        loading = getattr(self, "_loading", None)
        if self.backend is None and loading is not None:
            loading.join()
        if self.backend is None:
            raise NotReady(f"the model could not be loaded from {self.artifacts}")

    def get_input_types(self) -> list:
        self._loaded()
        return oip.metadata(self.encoder, self.name)["inputs"]

    def get_output_types(self) -> list:
        self._loaded()
        return oip.metadata(self.encoder, self.name)["outputs"]

    def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        self._loaded()
        try:
            if isinstance(payload, InferRequest):
                return self._infer(payload)
            batch = decode_request(payload, "application/json", self.encoder, self.max_rows)
            return predictions_body(self.backend.predict(batch))
        except DLRMServeError as e:
            if e.status >= 500:
                raise
            # kserve answers its InvalidInput with 400 {"error": ...} (gRPC: INVALID_ARGUMENT).
            raise KServeInvalidInput(e.message) from None

    def _infer(self, request: InferRequest) -> InferResponse:
        for out in request.request_outputs or []:
            if out.name != oip.OUTPUT:
                raise KServeInvalidInput(f"unknown output {out.name!r}: this model has one output, '{oip.OUTPUT}'")
        raw = oip.raw_batch(oip.tensors_of_kserve(request.inputs), self.encoder, self.max_rows)
        probs = self.backend.predict(self.encoder.finish(raw))
        # A list, not an array: kserve 0.21's to_grpc tests the data's truth value.
        output = InferOutput(name=oip.OUTPUT, shape=[int(probs.shape[0])], datatype="FP32", data=probs.tolist())
        return InferResponse(
            response_id=request.id or "",
            model_name=self.name,
            model_version=self.version,
            infer_outputs=[output],
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )


# ----- kserve 0.21's servers, on one host ---------------------------------------------------
class _JSONByDefault:
    """ASGI middleware: a POST without Content-Type is JSON.

    tritonclient.http sends its JSON requests without a Content-Type; kserve
    0.21's FastAPI route then takes the body as bytes and asks for the binary
    extension's Inference-Header-Content-Length.  A body that carries that
    header is left alone.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("method") == "POST":
            names = {k.lower() for k, _ in scope.get("headers", [])}
            if b"content-type" not in names and b"inference-header-content-length" not in names:
                scope = dict(scope, headers=[*scope.get("headers", []), (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class HostRESTServer(RESTServer):
    """kserve's REST server on ``host`` (kserve binds 0.0.0.0), JSON by default.

    Also the server of each spawned worker process (``--workers N``): it is
    pickled there, so it lives at module level and keeps the host itself.
    """

    host = LOOPBACK

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = type(self).host  # an instance attribute travels with the pickle
        self.config.host = self.host  # uvicorn reads it when it binds

    def create_application(self):
        super().create_application()
        app = _model_server.app
        if not getattr(app, "_dlrm_json_default", False):
            app.add_middleware(_JSONByDefault)
            app._dlrm_json_default = True


class HostGRPCServer(GRPCServer):
    """kserve's gRPC server (the standard inference.GRPCInferenceService) on ``host``."""

    host = LOOPBACK

    async def start(self, max_workers):
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
        )
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = self.host
        self._server.add_insecure_port(f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


def _bind(host: str) -> None:
    """Make kserve.ModelServer build its servers from the classes above, on ``host``."""
    HostRESTServer.host = host
    HostGRPCServer.host = host
    _model_server.RESTServer = HostRESTServer
    _multiprocess.RESTServer = HostRESTServer
    _model_server.GRPCServer = HostGRPCServer


def serve(
    artifacts: str,
    *,
    model_name: str = "dlrm",
    http_port: int = 8080,
    grpc_port: int = 8081,
    workers: int = 1,
    host: str = LOOPBACK,
    backend: str = "torch",
    threads: int = 0,
    max_rows: int = MAX_ROWS,
) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (blocks)."""
    model = DLRMModel(model_name, artifacts, backend=backend, threads=threads, max_rows=max_rows)
    model.load()
    _bind(host)
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port, workers=workers).start([model])


def main_args(args) -> None:
    """``dlrm-serve kserve``: the parsed command line -> :func:`serve`."""
    serve(
        args.artifacts,
        model_name=args.model_name,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        host=args.host,
        backend=args.backend,
        threads=args.threads,
        max_rows=args.max_rows,
    )
