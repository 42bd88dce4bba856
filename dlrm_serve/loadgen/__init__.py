"""MLPerf LoadGen harness for dlrm-serve (``dlrm-serve loadgen``, docs/loadgen.md).

- :mod:`~dlrm_serve.loadgen.samples`: the query set: one query sample is one
  user, 100-700 rows (mean about 270), sent as one binary request.
- :mod:`~dlrm_serve.loadgen.suts`: systems under test: in process (the
  :class:`~dlrm_serve.serve.serving.Predictor` over ``load_backend``) and
  through TorchServe (REST or gRPC, the project's client library).
- :mod:`~dlrm_serve.loadgen.runner`: LoadGen settings, one run, the peak
  search of the Server scenario, progress.
- :mod:`~dlrm_serve.loadgen.accuracy`: AUC from LoadGen's accuracy log.

Importing this package loads neither LoadGen nor torch.
"""
