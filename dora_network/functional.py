"""Pure tensor math of DoRA: low-rank deltas, column/row norms, the DoRA weight and its activation-space form.

Notation (DoRA, Liu et al., ICML 2024, eq. 5), for a base weight W0 of shape (out, in, *k):

    V  = W0 + s * B A                   s = alpha / rank,  B = lora_up (out, r),  A = lora_down (r, in, *k)
    W' = m * V / (||V|| + eps)          m = dora_scale, ||.|| the L2 norm along one axis
    W(mu) = W0 + mu * (W' - W0)         strength applied outside, as every UI does (mu = 0 is the base model)

Two axes are in use (reference/lycoris-dora.md §1):

- ``wd_on_out=False`` (our default, "in-axis"): one magnitude per *input* column, the norm taken over every dim
  except dim 1; ``dora_scale`` has shape (1, in) / (1, in, 1, 1).
- ``wd_on_out=True`` ("out-axis", the paper's code, PEFT): one magnitude per *output* row, the norm over every
  dim except dim 0; ``dora_scale`` has shape (out, 1) / (out, 1, 1, 1).

Because W' only rescales V along one axis, the forward never needs W': with c = m / (||V|| + eps),
in-axis  W' x = V (c * x)  and out-axis  W' x = c * (V x).  ``activation_scales`` returns the factors that
turn the base output and the low-rank output into W(mu) x. Norms are always computed in float32.
"""

from __future__ import annotations

import torch

#: Added to every norm; float32 machine epsilon whatever the weight dtype (LyCORIS uses the dtype's eps,
#: which becomes 7.8e-3 in bf16 and visibly shrinks small magnitudes).
EPS: float = float(torch.finfo(torch.float32).eps)

def _acc(tensor: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for every half/8-bit/fp32 weight, float64 kept for float64 references."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


__all__ = [
    "EPS",
    "activation_scales",
    "adapted_norm",
    "blend",
    "dora_weight",
    "dora_weight_frobenius",
    "lowrank_delta",
    "lowrank_frobenius",
    "norm_dims",
    "weight_norm",
]


def norm_dims(ndim: int, wd_on_out: bool) -> tuple[int, ...]:
    """Dims reduced by the DoRA norm of a weight with ``ndim`` dims.

    Args:
        ndim: 2 for Linear (out, in), 4 for Conv2d (out, in, kh, kw).
        wd_on_out: True for one norm per output row, False for one per input column.

    Returns:
        The dims to reduce, so that ``keepdim=True`` gives the ``dora_scale`` shape.
    """
    kept = 0 if wd_on_out else 1
    return tuple(d for d in range(ndim) if d != kept)


def weight_norm(weight: torch.Tensor, wd_on_out: bool) -> torch.Tensor:
    """L2 norm of ``weight`` along the DoRA axis, in float32, shaped like ``dora_scale``.

    Args:
        weight: (out, in) or (out, in, kh, kw), any floating dtype (float8 included).
        wd_on_out: the axis, see :func:`norm_dims`.

    Returns:
        float32 tensor of shape (out, 1[, 1, 1]) if ``wd_on_out`` else (1, in[, 1, 1]).
    """
    w = weight.to(_acc(weight))
    return torch.linalg.vector_norm(w, dim=norm_dims(w.ndim, wd_on_out), keepdim=True)


def lowrank_delta(
    up: torch.Tensor, down: torch.Tensor, scale: float, mid: torch.Tensor | None = None
) -> torch.Tensor:
    """The low-rank update s * B A in the base weight's layout, in float32.

    Args:
        up: B, (out, r) or (out, r, 1, 1).
        down: A, (r, in) or (r, in, kh, kw); (r, in, 1, 1) with Tucker.
        scale: s = alpha / rank.
        mid: Tucker core (r, r, kh, kw), or None.

    Returns:
        (out, in) for Linear, (out, in, kh, kw) for Conv2d.
    """
    acc = _acc(up)
    b = up.to(acc).flatten(1)  # (out, r)
    if mid is not None:
        # dW[o,i,h,w] = sum_ab B[o,a] T[a,b,h,w] A[b,i]
        return scale * torch.einsum("oa,abhw,bi->oihw", b, mid.to(acc), down.to(acc).flatten(1))
    a = down.to(acc)
    delta = b @ a.flatten(1)  # (out, in * kh * kw)
    return scale * delta.reshape(up.shape[0], *a.shape[1:])


def dora_weight(
    base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, wd_on_out: bool, eps: float = EPS
) -> torch.Tensor:
    """The explicit DoRA weight W' = m * (W0 + dW) / (||W0 + dW|| + eps), in float32.

    Args:
        base: W0, (out, in[, kh, kw]).
        delta: dW from :func:`lowrank_delta`, same shape.
        magnitude: m, the ``dora_scale`` shape of the axis (a 1-D tensor is not accepted).
        wd_on_out: the axis.
        eps: added to the norm.

    Returns:
        W', float32, shaped like ``base``.
    """
    acc = _acc(base)
    v = base.to(acc) + delta.to(acc)
    return magnitude.to(acc) * v / (weight_norm(v, wd_on_out) + eps)


def blend(base: torch.Tensor, adapted: torch.Tensor, multiplier: float) -> torch.Tensor:
    """W(mu) = W0 + mu * (W' - W0): strength applied outside, so mu = 0 is exactly the base weight."""
    acc = _acc(base)
    base_acc = base.to(acc)
    return base_acc + multiplier * (adapted.to(acc) - base_acc)


def activation_scales(
    norm: torch.Tensor, magnitude: torch.Tensor, multiplier: float, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors that give W(mu) x from the base path and the low-rank path without forming W'.

    With c = m / (||W0 + dW|| + eps):

    - in-axis:  W(mu) x = W0 (c_base * x) + mu * s B A (c * x)      (scale the *input* columns)
    - out-axis: W(mu) x = c_base * (W0 x) + mu * c * (s B A x)      (scale the *output* rows)

    where c_base = 1 - mu + mu * c.

    Args:
        norm: ||W0 + dW|| along the axis (:func:`adapted_norm` or :func:`weight_norm`), ``dora_scale``-shaped;
            detached when the norm is treated as a constant in backward (paper section 4.3).
        magnitude: m (``dora_scale`` shape).
        multiplier: mu.
        eps: added to the norm.

    Returns:
        (c_base, c) in the norm's dtype (float32, or float64 for a float64 base), ``dora_scale``-shaped; c_base
        is c itself when mu = 1. Multiply c by ``mu`` yourself for the low-rank path.
    """
    c = magnitude.to(norm.dtype) / (norm + eps)
    c_base = c if multiplier == 1.0 else (1.0 - multiplier) + multiplier * c
    return c_base, c


def _scaled_sum(gram: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """s^2 * gram + 2s * (m1 @ m2): one addmm for a number; tensor arithmetic for a tensor scale (torch.compile
    passes one, and addmm's alpha/beta must be numbers)."""
    if isinstance(scale, torch.Tensor):
        return (scale * scale) * gram + (2.0 * scale) * (m1 @ m2)
    return torch.addmm(gram, m1, m2, beta=scale * scale, alpha=2.0 * scale)


def adapted_norm(
    base: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float | torch.Tensor,
    wd_on_out: bool,
    mid: torch.Tensor | None = None,
    base_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """||W0 + s B A|| along the DoRA axis without forming any weight-sized tensor.

    Expands the square (PEFT PR #3387, "Scaling DoRA", arXiv 2603.22276):

        in-axis  n_i^2 = ||W0[:, i]||^2 + 2s <A[:, i], (B^T W0)[:, i]> + s^2 <A[:, i], (B^T B) A[:, i]>
        out-axis n_o^2 = ||W0[o]||^2    + 2s <B[o], (W0 A^T)[o]>       + s^2 <B[o], B[o] (A A^T)>

    for kxk convs with columns (i, h, w) summed over (h, w), and Tucker's core folded into A. The work is one
    (r x out) @ (out x in*k*k) product, the same as forming B A, but the workspace is O(r * (in + out)) instead of
    three weight-sized temporaries. The expansion cancels only when a column of V is much smaller than the same
    column of W0, which a DoRA update does not do; the result is clamped at 0 before the root.

    Args:
        base: W0 (out, in[, kh, kw]).
        up: B (out, r[, 1, 1]).
        down: A (r, in[, kh, kw]); (r, in, 1, 1) with Tucker.
        scale: s.
        wd_on_out: the axis.
        mid: Tucker core (r, r, kh, kw) or None.
        base_sq: ||W0||^2 along the axis (``dora_scale`` shape), e.g. cached; computed when None.

    Returns:
        The norm, ``dora_scale``-shaped, in float32 (float64 for a float64 base).
    """
    acc = _acc(base)
    out_dim, in_dim = base.shape[0], base.shape[1]
    w0 = base.to(acc).reshape(out_dim, -1)  # (out, in*kh*kw), columns ordered (i, h, w)
    b = up.to(acc).reshape(out_dim, -1)  # (out, r)
    if mid is not None:
        # A_eff[a, i, h, w] = sum_b T[a, b, h, w] A[b, i]
        a = torch.einsum("abhw,bi->aihw", mid.to(acc), down.to(acc).flatten(1)).reshape(b.shape[1], -1)
    else:
        a = down.to(acc).reshape(b.shape[1], -1)  # (r, in*kh*kw)
    if base_sq is None:
        base_sq = weight_norm(base, wd_on_out).to(acc).square()
    # 2s * cross + s^2 * gram in one product per axis: the big contraction and the r x r Gram term are summed by
    # addmm, and one row-wise dot with the other factor finishes it (fewer passes than two products and sums)
    if wd_on_out:
        # (r, out); A W0^T streams W0 row by row, ~2x faster than W0 A^T on CPU
        terms = _scaled_sum((a @ a.T) @ b.T, a, w0.T, scale)
        extra = torch.linalg.vecdot(b.T, terms, dim=0)  # (out,)
    else:
        terms = _scaled_sum((b.T @ b) @ a, b.T, w0, scale)  # (r, in*kh*kw)
        extra = torch.linalg.vecdot(a, terms, dim=0)
        if extra.numel() != in_dim:
            extra = extra.reshape(in_dim, -1).sum(1)  # kxk convs: a column is (i, h, w) summed over (h, w)
    squared = base_sq.reshape(-1) + extra
    return squared.clamp_min(0.0).sqrt().reshape(base_sq.shape)


def lowrank_frobenius(up: torch.Tensor, down: torch.Tensor, scale: float | torch.Tensor,
                      mid: torch.Tensor | None = None) -> torch.Tensor:
    """||s B A||_F (Tucker: ||s B T A||_F) from r x r Gram matrices, without forming the product.

    ||B A||_F^2 = tr((B^T B)(A A^T)); with Tucker, sum over kernel taps (h, w) of <T_hw, (B^T B) T_hw (A A^T)>.
    Work O(r^2 (in*k*k + out)) (+ 2 r^3 k*k for Tucker), workspace r x r: this runs for every layer on every
    training step (sd-scripts' norm logging and ``--scale_weight_norms``), where forming B A would cost r*in*out.

    Args:
        up: B, (out, r[, 1, 1]).
        down: A, (r, in[, kh, kw]); (r, in, 1, 1) with Tucker.
        scale: s.
        mid: Tucker core (r, r, kh, kw), or None.

    Returns:
        A 0-dim float32 tensor (float64 for float64 factors).
    """
    acc = _acc(up)
    b = up.to(acc).reshape(up.shape[0], -1)  # (out, r)
    a = down.to(acc).reshape(down.shape[0], -1)  # (r, in*kh*kw), or (r, in) with Tucker
    gram_b, gram_a = b.T @ b, a @ a.T
    if mid is None:
        squared = (gram_b * gram_a).sum()
    else:
        core = mid.to(acc).flatten(2).permute(2, 0, 1)  # (kh*kw, r, r): T_hw
        squared = (core * (gram_b @ core @ gram_a)).sum()
    return squared.clamp_min(0.0).sqrt() * abs(scale)


def dora_weight_frobenius(norm: torch.Tensor, magnitude: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """||W'||_F of the DoRA weight W' = m * V / (||V|| + eps), from the axis norms ||V|| alone.

    Each column (in-axis) or row (out-axis) of W' has norm m * ||V|| / (||V|| + eps), so no weight-sized tensor
    and no product with W0 is needed once the forward has computed ||V||.

    Args:
        norm: ||V|| along the axis, ``dora_scale``-shaped (e.g. what the forward computed).
        magnitude: m, ``dora_scale``-shaped.
        eps: the epsilon the forward adds to the norm.

    Returns:
        A 0-dim tensor in the norm's dtype.
    """
    acc = norm.dtype
    per_axis = magnitude.to(acc) * norm / (norm + eps)
    return torch.linalg.vector_norm(per_axis)
