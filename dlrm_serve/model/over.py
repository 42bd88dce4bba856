"""The over stage: the top MLP.

Shapes: interaction ``[B, I]`` -> click logits ``[B]``; ReLU between
layers, none after the final linear.
"""

from __future__ import annotations

import torch
from torch import nn

from dlrm_serve.model.mlp import mlp_layers, run_mlp

__all__ = ["OverArch"]


class OverArch(nn.Module):
    """Top MLP: ``[B, I]`` -> click logits ``[B]`` (ReLU between layers, none after the last)."""

    def __init__(self, in_width: int, widths: tuple[int, ...]):
        super().__init__()
        if widths[-1] != 1:
            raise ValueError(f"the top MLP must end with width 1, got {list(widths)}")
        self.mlp = mlp_layers(widths, in_width, last_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_mlp(self.mlp, x).squeeze(1)
