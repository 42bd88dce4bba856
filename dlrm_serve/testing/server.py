"""Start, drive and stop a local TorchServe: for tests, benchmarks and clients.

The parts: :mod:`.properties` (ports, config.properties), :mod:`.process`
(find, stop, logs), :mod:`.http` (raw calls) and this module's class.

:class:`TorchServe` starts TorchServe from a start folder of its own, with a
generated ``config.properties`` on free loopback ports (REST inference,
management and metrics, gRPC inference and management), waits until
``/ping`` answers with the token, reads ``key_file.json`` and exposes the
URLs, ports and keys, plus small helpers for the management API.

Each instance is isolated: TorchServe keeps its pid file in the temp folder
and unpacks archives there, so the start folder gets its own ``TMPDIR``;
two instances (or an instance and ``make serve``) never see each other.
:meth:`TorchServe.stop` ends the whole process group (the Java frontend and
its Python workers) and is also registered with :mod:`atexit`, so a failing
test run does not leave a server behind.

Management calls (register, scale, describe, unregister) go through the
client (:class:`~dlrm_serve.client.Client` over REST), so there is
one REST management client in the package.  Raw calls (``get``, ``call``,
``predict``) use :func:`http_request`, which sends exactly the headers given.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from dlrm_serve.client.core import Client
from dlrm_serve.client.keys import Keys, read_key_file
from dlrm_serve.client.transports import RestTransport, _bearer
from dlrm_serve.errors import AuthError, DLRMServeError, LaunchError
from dlrm_serve.testing.http import Response, http_request
from dlrm_serve.testing.process import find_torchserve, output_tail, stop_process_group
from dlrm_serve.testing.properties import LOOPBACK, Ports, free_ports, render_properties, server_properties

__all__ = ["TorchServe"]


# Started servers, kept (strongly) until stopped, so that exit stops them all.
_LIVE: "set[TorchServe]" = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class TorchServe:
    """One TorchServe on free loopback ports, started from ``start_dir``.

    - ``model_store``: folder of archives (made absolute).
    - ``base_config``: a config.properties to start from (e.g. the shipped
      one); addresses, ports and the model store are always overridden.
    - ``load_models``: the ``load_models`` value, or None to start with no model.
    - ``properties``: more keys to set (a value of None removes the key).
    - ``env``: extra environment for the server and its workers.
    - ``log_config``: a log4j2 XML file for the frontend (e.g. the shipped
      ``log4j2.xml``); TorchServe's built-in one logs every request several times.
    """

    def __init__(
        self,
        start_dir: str | os.PathLike,
        model_store: str | os.PathLike,
        *,
        base_config: str | os.PathLike | None = None,
        load_models: str | None = None,
        properties: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 120.0,
        torchserve: str | None = None,
        log_config: str | os.PathLike | None = None,
    ):
        self.start_dir = Path(start_dir).resolve()
        self.model_store = Path(model_store).resolve()
        self.base_config = Path(base_config) if base_config is not None else None
        self.load_models = load_models
        self.properties = dict(properties or {})
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.torchserve = torchserve
        self.log_config = Path(log_config).resolve() if log_config is not None else None
        self.ports: Ports | None = None
        self.process: subprocess.Popen | None = None
        self.keys: dict[str, str] = {}

    # ----- addresses and keys --------------------------------------------------
    def _need_ports(self) -> Ports:
        if self.ports is None:
            raise LaunchError("TorchServe is not started")
        return self.ports

    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK}:{self._need_ports().inference}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self._need_ports().management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self._need_ports().metrics}"

    @property
    def grpc_inference_target(self) -> str:
        return f"{LOOPBACK}:{self._need_ports().grpc_inference}"

    @property
    def grpc_management_target(self) -> str:
        return f"{LOOPBACK}:{self._need_ports().grpc_management}"

    @property
    def inference_key(self) -> str:
        return self.keys["inference"]

    @property
    def management_key(self) -> str:
        return self.keys["management"]

    @property
    def api_key(self) -> str:
        return self.keys["API"]

    @property
    def config_path(self) -> Path:
        return self.start_dir / "config.properties"

    @property
    def log_dir(self) -> Path:
        return self.start_dir / "logs"

    # ----- lifecycle -----------------------------------------------------------
    def config(self, ports: Ports) -> dict[str, Any]:
        """The properties this instance starts with."""
        return server_properties(ports, self.model_store, self.load_models, self.base_config, self.properties)

    def start(self) -> "TorchServe":
        """Start and wait until ``/ping`` is healthy; retried once on a port clash."""
        if self.process is not None:
            raise LaunchError("this TorchServe is already started")
        if not self.model_store.is_dir():
            raise LaunchError(f"model store {self.model_store} is not a folder")
        for attempt in range(2):
            try:
                self._start_once()
                return self
            except LaunchError as e:
                clash = "Address already in use" in e.message or "BindException" in e.message
                self.stop()
                if not clash or attempt == 1:
                    raise
        return self

    def _start_once(self) -> None:
        self.start_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.start_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        (self.start_dir / "key_file.json").unlink(missing_ok=True)
        self.keys = {}
        self.ports = Ports(*free_ports(5))
        self.config_path.write_text(render_properties(self.config(self.ports)), encoding="utf-8")
        env = dict(os.environ)
        # TorchServe's pid file and unpacked archives live in the temp folder.
        env.update(TMPDIR=str(tmp), TEMP=str(tmp))
        env.update(self.env)
        cmd = [
            self.torchserve or find_torchserve(),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(self.config_path),
            "--model-store",
            str(self.model_store),
        ]
        if self.log_config is not None:
            cmd += ["--log-config", str(self.log_config)]
        self._out = open(self.start_dir / "torchserve.out", "ab")
        try:
            self.process = subprocess.Popen(
                cmd,
                cwd=self.start_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            self._out.close()
            self._out = None
            raise LaunchError(f"cannot run {cmd[0]}: {e}") from None
        _LIVE.add(self)
        self._wait_healthy(time.monotonic() + self.startup_timeout)

    def _wait_healthy(self, deadline: float) -> None:
        key_file = self.start_dir / "key_file.json"
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(
                    f"TorchServe exited with status {self.process.returncode} while starting:\n{self.output_tail()}"
                )
            if not self.keys and key_file.is_file():
                try:
                    # Named as in key_file.json ("API", not "api"), as tests send them.
                    self.keys = {("API" if k == "api" else k): t.key for k, t in read_key_file(key_file).items()}
                except AuthError:
                    self.keys = {}  # half-written; read it again
            if self.keys:
                try:
                    r = self.get(self.inference_url + "/ping", key="inference", timeout=5)
                    last = f"{r.status} {r.text.strip()}"
                    if r.status == 200 and '"Healthy"' in r.text:
                        return
                except OSError as e:
                    last = str(e)
            time.sleep(0.25)
        raise LaunchError(
            f"TorchServe did not become healthy within {self.startup_timeout:.0f} s "
            f"(last /ping: {last}):\n{self.output_tail()}"
        )

    def output_tail(self, lines: int = 40) -> str:
        """The end of the server's own output and of its logs, for error messages."""
        return output_tail([self.start_dir / "torchserve.out", self.log_dir / "ts_log.log", self.log_dir / "model_log.log"], lines)

    def log_text(self, name: str = "model_log.log") -> str:
        path = self.log_dir / name
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and its workers (:func:`~dlrm_serve.testing.process.stop_process_group`); safe to call twice."""
        proc, self.process = self.process, None
        _LIVE.discard(self)
        if proc is not None:
            stop_process_group(proc, timeout)
        out = getattr(self, "_out", None)
        if out is not None:
            out.close()
            self._out = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- HTTP ----------------------------------------------------------------
    def _key(self, key: str | None) -> str | None:
        """``key`` is 'inference', 'management', 'API', a literal key, or None."""
        if key is None:
            return None
        return self.keys.get(key, key)

    def get(self, url: str, *, key: str | None = None, timeout: float = 30.0) -> Response:
        return http_request("GET", url, headers=_bearer(self._key(key)), timeout=timeout)

    def call(
        self,
        method: str,
        url: str,
        *,
        key: str | None = None,
        data: bytes | str | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> Response:
        headers = _bearer(self._key(key))
        if content_type is not None:
            headers["Content-Type"] = content_type
        return http_request(method, url, data=data, headers=headers, timeout=timeout)

    def predict(
        self, model: str, body: bytes | str, content_type: str | None = "application/json", *, key: str | None = "inference", timeout: float = 60.0
    ) -> Response:
        return self.call(
            "POST", f"{self.inference_url}/predictions/{model}", key=key, data=body, content_type=content_type, timeout=timeout
        )

    def metrics_text(self) -> str:
        r = self.get(self.metrics_url + "/metrics", key="inference")
        if r.status != 200:
            raise LaunchError(f"GET /metrics answered {r.status}: {r.text[:300]}")
        return r.text

    # ----- management API --------------------------------------------------------
    def management_client(self, timeout: float = 60.0) -> Client:
        """A REST :class:`~dlrm_serve.client.Client` for this server's management
        API, holding its keys (the package's one management client)."""
        keys = Keys(management=self.keys.get("management"))
        transport = RestTransport(self.inference_url, self.management_url, management_timeout=timeout, pool_size=1)
        # No retries and no key renewal (which would replace the key this
        # launcher holds): a failing management call is reported at once.
        return Client(transport, keys=keys, retries=0)

    def _manage(self, op: str, what: str, *args, timeout: float = 60.0, **kwargs) -> Any:
        """``Client.<op>(...)``; the client's errors become :class:`LaunchError`."""
        with self.management_client(timeout) as client:
            try:
                return getattr(client, op)(*args, **kwargs)
            except DLRMServeError as e:
                raise LaunchError(f"{what}: {e.message}", status=e.status) from None

    def register(self, url: str, model_name: str | None = None, *, timeout: float = 180.0, **params: Any) -> Any:
        """Register an archive (a name in the model store) and wait for its workers.

        ``params``: those of :meth:`Client.register_model <dlrm_serve.client.Client.register_model>`
        (``batch_size``, ``max_batch_delay``, ``initial_workers``, ...).
        """
        return self._manage("register_model", f"registering {url}", url, model_name, timeout=timeout, **params)

    def unregister(self, model_name: str, version: str | None = None, timeout: float = 60.0) -> Any:
        return self._manage("unregister_model", f"unregistering {model_name}", model_name, version, timeout=timeout)

    def scale(self, model_name: str, min_worker: int, max_worker: int | None = None, timeout: float = 120.0) -> Any:
        return self._manage("scale_workers", f"scaling {model_name}", model_name, min_worker, max_worker, timeout=timeout)

    def describe(self, model_name: str) -> list[dict]:
        return self._manage("describe_model", f"describing {model_name}", model_name)

    def models(self) -> list[str]:
        return [m["modelName"] for m in self._manage("list_models", "listing models", 1000)]

    def worker_pids(self, model_name: str) -> list[int]:
        return sorted(int(w["pid"]) for d in self.describe(model_name) for w in d.get("workers", []) if w.get("pid"))

    def wait_ready(self, model_name: str, workers: int = 1, timeout: float = 120.0) -> None:
        """Wait until ``workers`` workers of ``model_name`` are READY."""
        deadline = time.monotonic() + timeout
        seen: Any = None
        while time.monotonic() < deadline:
            try:
                seen = self.describe(model_name)
                ready = [w for d in seen for w in d.get("workers", []) if w.get("status") == "READY"]
                if len(ready) >= workers:
                    return
            except LaunchError as e:
                seen = e.message
            time.sleep(0.25)
        raise LaunchError(f"{model_name} has no {workers} READY workers after {timeout:.0f} s: {seen}")
