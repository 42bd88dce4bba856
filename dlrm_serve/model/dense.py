"""The dense stage: the bottom MLP.

Shapes: dense ``[B, num_dense]`` -> ``[B, D]``, ReLU after every layer,
the last included (as in the reference and TorchRec's ``DenseArch``).
"""

from __future__ import annotations

import torch
from torch import nn

from dlrm_serve.model.mlp import mlp_layers, run_mlp

__all__ = ["DenseArch"]


class DenseArch(nn.Module):
    """Bottom MLP: dense ``[B, num_dense]`` -> ``[B, D]`` (ReLU after every layer)."""

    def __init__(self, num_dense: int, widths: tuple[int, ...]):
        super().__init__()
        if num_dense <= 0:
            raise ValueError(f"num_dense must be positive, got {num_dense}")
        self.mlp = mlp_layers(widths, num_dense, last_relu=True)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return run_mlp(self.mlp, dense)
