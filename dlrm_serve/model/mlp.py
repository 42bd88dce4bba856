"""MLP stacks and their fast forward, shared by the bottom and top MLPs.

An MLP is an ``nn.Sequential`` with Linear layers at even indices and ReLU
at odd ones (the reference's layout); :func:`run_mlp` runs it as one fused
``addmm`` (or oneDNN linear + ReLU in bfloat16) per layer.
Shapes: ``[B, in_width]`` -> ``[B, widths[-1]]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["mlp_layers", "run_mlp", "pack_for_inference", "LINEAR_POINTWISE", "PACK_BATCH_HINT"]


def mlp_layers(widths: list[int] | tuple[int, ...], in_width: int, last_relu: bool) -> nn.Sequential:
    """Linear layers at even indices, ReLU at odd ones (the reference's layout)."""
    layers: list[nn.Module] = []
    prev = in_width
    for i, w in enumerate(widths):
        lin = nn.Linear(prev, w)
        # The reference's initialisation: N(0, sqrt(2/(fan_in+fan_out))), bias N(0, sqrt(1/fan_out)).
        # Skipped on the meta device (shape checks): meta tensors hold no values, and
        # normal_ there imports torch's compiler stack, seconds in every serving worker.
        if not lin.weight.is_meta:
            with torch.no_grad():
                lin.weight.normal_(0.0, math.sqrt(2.0 / (prev + w)))
                lin.bias.normal_(0.0, math.sqrt(1.0 / w))
        layers.append(lin)
        if i < len(widths) - 1 or last_relu:
            layers.append(nn.ReLU())
        prev = w
    return nn.Sequential(*layers)


def _onednn_ops():
    """oneDNN's fused linear (+ bias, + ReLU) kernel and its weight packer, or Nones.

    None where this torch build lacks them or its oneDNN has no bfloat16
    (then bfloat16 layers fall back to ``addmm``).
    """
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        pass
    return None, None


# For bfloat16 weights only (inference: the op has no autograd).  Measured
# against addmm + relu_ in bfloat16: the bias and the ReLU ride in the GEMM
# instead of a bias copy before it and a pass after it; weights packed once
# into oneDNN's layout save a reorder per call, 2x at one row
# (docs/precision.md).  Packed or not, the results are the same bits.
LINEAR_POINTWISE, _REORDER_WEIGHT = _onednn_ops()
# The batch size oneDNN packs the weights for; any batch size runs on them.
PACK_BATCH_HINT = 64


def linear(layer: nn.Linear, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then ReLU in place with ``relu``) as one GEMM: ``[B, in]`` -> ``[B, out]``."""
    # The fused op has no backward: explanations (gradients) take addmm in bfloat16.
    fused = LINEAR_POINTWISE is not None and not (torch.is_grad_enabled() and x.requires_grad)
    if layer.weight.dtype == torch.bfloat16 and fused:
        weight = layer.__dict__.get("packed_weight", layer.weight)  # see pack_for_inference
        return LINEAR_POINTWISE(x, weight, layer.bias, "relu" if relu else "none", [], "")
    x = torch.addmm(layer.bias, x, layer.weight.t())
    return x.relu_() if relu else x


def run_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for a :func:`mlp_layers` stack, minus the per-layer overheads.

    Each Linear is one ``addmm`` (the bias fused into the GEMM) and each
    ReLU runs in place on the fresh ``addmm`` output, which saves a
    full-size allocation and pass per layer.  Autograd-safe, so training
    shares this path: ``addmm`` saves its inputs, never its output.
    bfloat16 layers (inference only) run oneDNN's fused linear + ReLU.
    """
    layers = list(mlp)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            x = linear(layer, x, relu)
            i += 2 if relu else 1
            continue
        x = x.relu_() if isinstance(layer, nn.ReLU) else layer(x)
        i += 1
    return x


def pack_for_inference(layer: nn.Linear) -> None:
    """Pack a bfloat16 ``layer``'s weight once into oneDNN's layout (a no-op elsewhere).

    A plain attribute, not a parameter: state_dict and the weights stay as they were.
    """
    if layer.weight.dtype == torch.bfloat16 and _REORDER_WEIGHT is not None:
        layer.__dict__["packed_weight"] = _REORDER_WEIGHT(layer.weight, PACK_BATCH_HINT)
