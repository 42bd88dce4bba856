"""Call a served DLRM over gRPC or REST with one interface.

- :func:`connect` / :class:`Client`: ``predict(rows)`` -> float32
  probabilities, chunked and pipelined; ``ping``; model management.
- :class:`Keys`: TorchServe's tokens from code, the environment or
  ``key_file.json``, renewed through the token API when they expire.
- :func:`rolling_update`: replace a served model version with no failed
  requests (``dlrm-serve models update``).
- :func:`predict_file`: stream a Criteo TSV or JSON-lines file of any size
  (``dlrm-serve predict``).

Errors are the :mod:`dlrm_serve.errors` family: :class:`InvalidInput` for a
request the server (or the client's own encoder) rejects, :class:`AuthError`
for token problems, :class:`ServerError` otherwise; each carries the
server's message.

numpy, grpcio/protobuf (gRPC) and requests (REST) are all it needs; no torch.
"""

from dlrm_serve.errors import AuthError, DLRMServeError, InvalidInput, ServerError
from dlrm_serve.client.core import DEFAULT_CONCURRENCY, DEFAULT_ROWS_PER_REQUEST, Client, connect, ordered_map
from dlrm_serve.client.files import PredictStats, predict_file
from dlrm_serve.client.keys import ENV_KEY_FILE, ENV_KEYS, Keys
from dlrm_serve.client.payloads import FORMATS, Payload, parse_predictions
from dlrm_serve.client.rolling import UpdateReport, rolling_update
from dlrm_serve.client.transports import GrpcTransport, RestTransport

__all__ = [
    "Client",
    "connect",
    "ordered_map",
    "Keys",
    "ENV_KEYS",
    "ENV_KEY_FILE",
    "GrpcTransport",
    "RestTransport",
    "Payload",
    "FORMATS",
    "parse_predictions",
    "predict_file",
    "PredictStats",
    "rolling_update",
    "UpdateReport",
    "DEFAULT_ROWS_PER_REQUEST",
    "DEFAULT_CONCURRENCY",
    "DLRMServeError",
    "InvalidInput",
    "AuthError",
    "ServerError",
]
