"""Three autograd Functions that make DoRA keep for backward no more than LoRA keeps, and allocate no more.

Plain autograd of DoRA's activation-space forward keeps one extra activation per layer:

- out-axis, ``y = c_b * base(x) + (1 - c_b) * b + U h`` (U = the folded ``lora_up`` weight, h = the rank-r
  activations): ``mul`` keeps the pre-scale output ``base(x)`` for the magnitude's gradient. :class:`OutAxisCombine`
  keeps the layer's output ``y`` instead, which its consumer (attention, GEGLU, norms) usually keeps anyway, and
  recovers what it needs in backward: sum_t g * (base(x) - b) = (sum_t g * y - b * sum_t g - rowsum(U * dU)) / c_b,
  with dU = g^T h the gradient of U it computes anyway (c_b is one number per output channel, ~1).
- in-axis convolution, ``y = conv(x * c_b, W0) + conv(x, A * c)``: the base convolution keeps its input
  ``x * c_b``, a second copy of ``x``, and the ``lora_down`` one keeps the folded weight ``A * c``.
  :class:`ScaledInputBase` and :class:`FoldedScaleConv` keep ``x``, ``c`` and the unscaled weight and re-form the
  rest in backward. An in-axis Linear keeps nothing more (``linear`` keeps no input when its weight is frozen, and
  ``A * c`` is r x in), but goes through :class:`ScaledInputBase` too: one activation-sized allocation fewer in
  backward, and each allocation costs page faults on CPU (glibc hands large blocks back to the OS).

Each computes in the dtype the plain forward runs in (bf16/fp16 under autocast, as autocast would), accumulates the
per-channel sums in float32, gives the plain forward's numbers bit for bit (gradient checkpointing runs the plain
forward first) and gradients equal to autograd of the explicit formula (tests/test_gradients.py, float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FoldedScaleConv", "OutAxisCombine", "ScaledInputBase", "folded_weight", "out_axis_combine", "per_channel"]


def per_channel(t: torch.Tensor, conv: bool, dtype: torch.dtype) -> torch.Tensor:
    """A (C,) factor shaped to broadcast over activations: channels last for Linear, (1, C, 1, 1) for conv."""
    flat = t.reshape(-1).to(dtype)
    return flat.reshape(1, -1, 1, 1) if conv else flat


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half/single precision, float64 kept (float64 references in the tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _channel_sum(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """Sum over every dim but the channel one, accumulated in float32 (float64 for float64)."""
    dims = [d for d in range(t.dim()) if d != (1 if conv else t.dim() - 1)]
    return t.sum(dim=dims, dtype=_acc(t))


def out_axis_combine(out: torch.Tensor, c_base: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """y = c_b * out + (1 - c_b) * bias + U h, computed in ``out``'s dtype (the forward of :class:`OutAxisCombine`).

    Args:
        out: the base layer's output (bias included), (..., out) or (N, out, H, W).
        c_base: (out,) per-channel factor, any float dtype.
        hidden: h, (..., r) or (N, r, H, W).
        up: U, (out, r) or (out, r, 1, 1), every other scale already folded in.
        bias: the base layer's bias (out,), or None.
    """
    conv = out.dim() == 4 and up.dim() == 4
    dtype = out.dtype
    with torch.autocast(out.device.type, enabled=False):  # every operand is cast to the output's dtype already
        acc = _acc(out)
        shift = None if bias is None else (bias.to(acc) * (1.0 - c_base.reshape(-1).to(acc)))
        shift = None if shift is None else shift.to(dtype)
        hidden, up = hidden.to(dtype), up.to(dtype)
        lowrank = F.conv2d(hidden, up, shift) if conv else F.linear(hidden, up, shift)
        return torch.addcmul(lowrank, out, per_channel(c_base, conv, dtype))


class OutAxisCombine(torch.autograd.Function):
    """:func:`out_axis_combine` that keeps (y, h, U, c_b) for backward instead of the pre-scale output."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, c_base: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        y = out_axis_combine(out, c_base, hidden, up, bias)
        ctx.conv = out.dim() == 4 and up.dim() == 4
        ctx.dtypes = (out.dtype, c_base.dtype, hidden.dtype, up.dtype)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(y, c_base, hidden, up, bias if bias is not None else y.new_empty(0))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, c_base, hidden, up, bias = ctx.saved_tensors
        conv = ctx.conv
        out_dtype, c_dtype, hidden_dtype, up_dtype = ctx.dtypes
        dtype = y.dtype
        grad = grad.to(dtype)
        need_out, need_c, need_hidden, need_up, need_bias = ctx.needs_input_grad
        u = up.to(dtype)
        h = hidden.to(dtype)
        grad_out = grad_c = grad_hidden = grad_up = grad_bias = None
        if need_hidden:
            grad_hidden = (F.conv2d(grad, u.transpose(0, 1)) if conv else grad @ u).to(hidden_dtype)
        gu = None
        if need_up or need_c:
            if conv:
                gu = torch.einsum("nohw,nrhw->or", grad, h).reshape(u.shape)
            else:
                gu = grad.reshape(-1, grad.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        if need_up:
            grad_up = gu.to(up_dtype)
        if need_c or need_bias:
            grad_sum = _channel_sum(grad, conv)
        buffer = None  # one activation-sized temporary, reused for grad_out (each allocation costs page faults)
        if need_c:
            # sum_t g * (out - b) = (sum_t g * y - b * sum_t g - sum_t g * (U h)) / c_b
            acc = _acc(y)
            lowrank_term = (u.to(acc) * gu.to(acc)).reshape(u.shape[0], -1).sum(1)
            buffer = torch.mul(grad, y)
            numerator = _channel_sum(buffer, conv) - lowrank_term
            if ctx.has_bias:
                numerator = numerator - bias.to(acc) * grad_sum
            c = c_base.reshape(-1).to(acc)
            safe = torch.where(c == 0, torch.ones_like(c), c)
            # a zero factor leaves nothing of the base output in y: its gradient is taken as 0 there
            grad_c = torch.where(c == 0, torch.zeros_like(c), numerator / safe).reshape(c_base.shape).to(c_dtype)
        if need_out:
            factor = per_channel(c_base, conv, dtype)
            grad_out = torch.mul(grad, factor, out=buffer) if buffer is not None else grad * factor
            grad_out = grad_out.to(out_dtype)
        if need_bias and ctx.has_bias:
            grad_bias = (grad_sum * (1.0 - c_base.reshape(-1).to(grad_sum.dtype))).to(bias.dtype)
        return grad_out, grad_c, grad_hidden, grad_up, grad_bias


class ScaledInputBase(torch.autograd.Function):
    """``linear(x * c, W0, b)`` or ``conv2d(x * c, W0, b, ...)`` for a frozen base, keeping only ``x``, ``c``, ``W0``.

    For an in-axis adapter's base layer (``c`` = c_b): folding c into W0 would form a weight-sized tensor, so the
    input is scaled. A convolution would keep ``x * c`` (a second copy of ``x``); a Linear keeps nothing, but plain
    autograd's backward of ``x * c`` allocates two activation-sized products where this needs one: the input
    gradient is scaled in place after the magnitude's reduction. ``geometry`` is None for Linear, else
    (stride, padding, dilation, groups) of a zero-padded convolution.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                geometry: tuple | None) -> torch.Tensor:
        conv = geometry is not None
        scaled = x * per_channel(c, conv, x.dtype)
        # autocast applies as it does to the base layer's own forward
        out = F.conv2d(scaled, weight, bias, *geometry) if conv else F.linear(scaled, weight, bias)
        ctx.geometry = geometry
        ctx.save_for_backward(x, c, weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, c, weight = ctx.saved_tensors
        conv = ctx.geometry is not None
        need_x, need_c = ctx.needs_input_grad[:2]
        grad_x = grad_c = None
        # the gradient of the base layer's input (x * c), in the dtype the forward ran in
        w = weight.to(grad.dtype)
        grad_scaled = torch.nn.grad.conv2d_input(x.shape, w, grad, *ctx.geometry) if conv else grad @ w
        if need_c:
            dims = (0, 2, 3) if conv else tuple(range(grad_scaled.dim() - 1))
            grad_c = (grad_scaled * x.to(grad_scaled.dtype)).sum(dim=dims, dtype=_acc(grad_scaled))
            grad_c = grad_c.reshape(c.shape).to(c.dtype)
        if need_x:
            grad_x = grad_scaled.mul_(per_channel(c, conv, grad_scaled.dtype)).to(x.dtype)
        return grad_x, grad_c, None, None, None


def folded_weight(weight: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``weight * c`` with one factor per input channel (dim 1): the folded ``lora_down`` weight (r, in[, kh, kw])."""
    return weight * c.reshape((1, -1) + (1,) * (weight.dim() - 2)).to(weight.dtype)


class FoldedScaleConv(torch.autograd.Function):
    """``conv2d(x, A * c)`` (zero padding, no bias) keeping ``x``, ``c`` and ``A``; ``A * c`` is re-formed in backward.

    For an in-axis adapter's ``lora_down`` convolution: the scale is folded into the small (r, in, kh, kw) weight, as
    the no-grad path does (same numbers), and the folded weight, which plain autograd would keep, is not kept.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, stride: Any, padding: Any,
                dilation: Any, groups: int) -> torch.Tensor:
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.save_for_backward(x, c, weight)
        return F.conv2d(x, folded_weight(weight, c), None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, c, weight = ctx.saved_tensors
        need_x, need_c, need_weight = ctx.needs_input_grad[:3]
        folded = folded_weight(weight, c)
        grad_x = grad_c = grad_weight = None
        if need_x:
            grad_x = torch.nn.grad.conv2d_input(x.shape, folded.to(grad.dtype), grad, *ctx.geometry).to(x.dtype)
        if need_c or need_weight:
            grad_folded = torch.nn.grad.conv2d_weight(x.to(grad.dtype), folded.shape, grad, *ctx.geometry)
            grad_folded = grad_folded.to(_acc(grad_folded))
            if need_weight:
                grad_weight = folded_weight(grad_folded, c).to(weight.dtype)
            if need_c:
                grad_c = (grad_folded * weight.to(grad_folded.dtype)).sum(dim=(0, 2, 3)).reshape(c.shape).to(c.dtype)
        return grad_x, grad_c, grad_weight, None, None, None, None
