"""dlrm-serve: serve Facebook's DLRM click-through-rate model on TorchServe.

The package root imports nothing heavy; ``dlrm_serve.io.features``,
``dlrm_serve.io.codecs`` and ``dlrm_serve.client`` need numpy only.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
