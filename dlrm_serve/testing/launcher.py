"""The test TorchServe, from one import: :class:`TorchServe` and its helpers.

The parts live in :mod:`dlrm_serve.testing.server` (the class),
:mod:`~dlrm_serve.testing.properties` (ports, ``config.properties``),
:mod:`~dlrm_serve.testing.process` (find, stop, logs) and
:mod:`~dlrm_serve.testing.http` (raw calls); :class:`LaunchError` is in
:mod:`dlrm_serve.errors`.
"""

from __future__ import annotations

from dlrm_serve.errors import LaunchError
from dlrm_serve.testing.http import Response, http_request
from dlrm_serve.testing.process import find_torchserve
from dlrm_serve.testing.properties import LOOPBACK, Ports, free_ports, load_properties, render_properties
from dlrm_serve.testing.server import TorchServe

__all__ = [
    "LOOPBACK",
    "LaunchError",
    "Ports",
    "Response",
    "TorchServe",
    "free_ports",
    "load_properties",
    "render_properties",
    "find_torchserve",
    "http_request",
]
