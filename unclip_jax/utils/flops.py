"""Model FLOPs of a jitted step, counted the same way on every backend.

MFU needs the FLOPs the *model* asks for. XLA's ``compiled.cost_analysis()`` counts what the
backend's optimised HLO does itself: on GPUs, convolutions (and often matmuls) become calls into
cuDNN / cuBLAS (``custom-call`` ops) that it does not count, so for a convolutional UNet it
reports a small fraction of the real work (the Karlo decoder's train step: 7.5 TFLOP counted by
XLA GPU vs 112 TFLOP of convolutions and matmuls). ``lowered.cost_analysis()`` counts the HLO
*before* any backend rewrites it: every ``convolution`` and ``dot`` is still there, so the count
is the model's, the same on CPU, GPU and TPU (and equal to what the CPU and TPU compilers report,
which keep convolutions as HLO ops). Rematerialisation, when on, is in the lowered HLO too.
"""
from __future__ import annotations

from typing import Any


def cost_dict(cost: Any) -> dict:
    """A ``cost_analysis()`` result as one dict (JAX versions return a dict, a one-element list
    of dicts, or None)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _flops_of(cost: Any) -> float:
    return float(cost_dict(cost).get("flops", 0.0))


def lowered_flops(lowered) -> float:
    """FLOPs of one call of a lowered jitted function (``jax.jit(f).lower(*args)``), from the
    backend-independent HLO (see the module docstring); 0.0 when the count is unavailable."""
    return _flops_of(lowered.cost_analysis())


def compiled_flops(compiled) -> float:
    """XLA's count for the compiled executable (``compiled.cost_analysis()``): what the backend
    runs as HLO ops. Undercounts on GPUs (library calls are not counted); kept for comparison."""
    return _flops_of(compiled.cost_analysis())


def conv_flops(batch: int, out_hw: tuple[int, int], kernel_hw: tuple[int, int], c_in: int,
               c_out: int, groups: int = 1) -> int:
    """Closed form of one 2-D convolution's forward FLOPs (a multiply-add is 2 FLOPs):
    ``2 * B * H_out * W_out * C_out * (C_in / groups) * k_h * k_w`` (no padding; XLA counts only
    the taps that land inside the input, so a "SAME" convolution counts a little less)."""
    return 2 * batch * out_hw[0] * out_hw[1] * c_out * (c_in // groups) * kernel_hw[0] * \
        kernel_hw[1]
