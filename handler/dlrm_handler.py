"""TorchServe handler for dlrm-serve: a thin adapter over ``dlrm_serve.serve.serving``.

It finds the artifacts in the unpacked archive, reads the free-form ``dlrm:``
section of model-config.yaml (:func:`dlrm_serve.serve.serving.read_settings` lists
the keys), and per dynamic batch maps TorchServe's request items to library
requests, lets the :class:`~dlrm_serve.serve.serving.Predictor` answer them, and
maps each reply back (per-request HTTP status, headers, JSON body).
Decoding, validation and the model live in the library, which ships inside
the archive.

Metrics (dimensions ModelName, Level, Backend, Provider) are described in
:class:`dlrm_serve.serve.serving.MetricsWindow`.
"""

from __future__ import annotations

import json
import logging
import os
import time

from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

import dlrm_serve
from dlrm_serve.runtime.backends import load_backend
from dlrm_serve.errors import DLRMServeError
from dlrm_serve.runtime.memory import touch_backend_tables
from dlrm_serve.runtime.placement import backend_options, place_worker
from dlrm_serve.serve.serving import MetricsWindow, Predictor, hang_if_marked, read_settings, request_of

__all__ = ["DLRMHandler"]

logger = logging.getLogger(__name__)


def _drop_per_batch_log(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Backend received inference")


class DLRMHandler(BaseHandler):
    """Loads the DLRM of the archive and answers each request of a dynamic batch."""

    def initialize(self, context):
        self.context = context
        self.manifest = context.manifest
        model_dir = context.system_properties["model_dir"]
        self.settings = read_settings(getattr(context, "model_yaml_config", None))
        placement = place_worker(self.settings, context)  # cuda:<gpu_id> for GPU archives, else the CPU, and why
        logger.info("dlrm worker placed on %s: %s", placement.device, placement.reason)
        self.backend = load_backend(
            model_dir, self.settings["backend"], threads=self.settings["threads"], **backend_options(self.settings, placement)
        )
        model = self.manifest.get("model", {})
        self.predictor = Predictor(
            self.backend, self.settings["max_rows"], model.get("modelName", "dlrm"), model.get("modelVersion", "1.0"),
            explain_max_rows=self.settings["explain_max_rows"],
        )
        if self.settings["touch_tables"]:
            start = time.perf_counter()
            touched = touch_backend_tables(self.backend)
            logger.info("dlrm touched %d table bytes in %.2f s", touched, time.perf_counter() - start)
        # The provider (CPU or CUDA for onnxruntime, the device for torch) tells comparisons apart.
        described = self.backend.describe()
        provider = described.get("provider") or described.get("device", "cpu")
        self.dimensions = [Dimension("Backend", self.backend.name), Dimension("Provider", str(provider))]
        self.window = MetricsWindow(self.settings["metrics_interval"])
        # TorchServe's worker logs "Backend received inference at" for every batch (4% of a worker's time).
        for h in logging.getLogger().handlers:
            h.addFilter(_drop_per_batch_log)
        self.initialized = True
        # Logged so a test (or a person) can see which copy of the library runs.
        logger.info(
            "dlrm handler ready: dlrm_serve from %s, %s",
            os.path.dirname(dlrm_serve.__file__),
            json.dumps({**described, **self.settings}, sort_keys=True),
        )

    def handle(self, data, context):
        requests = []
        for idx, item in enumerate(data):
            try:
                requests.append(request_of(item, context, idx))
            except DLRMServeError as e:
                requests.append(e)
        hang_if_marked(requests, self.settings["fault_hang_on"])  # test-only; off unless the archive sets it
        try:
            replies, stats = self.predictor.handle(requests)
        except DLRMServeError as e:
            raise PredictionException(e.message, e.status) from e
        except Exception as e:  # a backend failure: fail this batch, keep the worker
            logger.exception("dlrm forward pass failed")
            raise PredictionException(f"prediction failed ({type(e).__name__}); see the worker log", 500) from e
        out = []
        for idx, reply in enumerate(replies):
            if not reply.ok:
                context.set_response_status(reply.status, reply.body.get("type", "Error"), idx)
            context.set_response_content_type(idx, reply.content_type)
            for name, value in reply.headers.items():
                context.set_response_header(idx, name, value)
            out.append(reply.text())
        metrics = getattr(context, "metrics", None)
        if self.window.add(stats) and metrics is not None:
            self.window.report(metrics, self.dimensions)
        return out
