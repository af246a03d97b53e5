"""DoRAModule: one DoRA (or plain LoRA) adapter on one base ``nn.Linear`` / ``nn.Conv2d``, by forward patching.

The adapter owns ``lora_down``, ``lora_up``, optional ``lora_mid``, the ``alpha`` buffer and ``dora_scale``, so its
``state_dict()`` is the LyCORIS file layout. The base module is held in an unregistered reference: it is never
moved, cast, saved or handed to an optimizer by the network, and its weights are only written by an explicit merge.

Forward (see functional.py for the derivation), with c = m / (||W0 + sBA|| + eps), c_b = 1 - mu + mu*c:

    in-axis : y = base(x * c_b) + mu*s * up(down(x * c))
    out-axis: y = c_b * base(x) + (1 - c_b) * bias + mu*s * c * up(down(x))

No second weight-sized matmul runs, and no weight-sized tensor is formed: the norm is factored
(functional.adapted_norm); W' itself is only built for merges.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as DF
from .autograd_ops import (FoldedScaleConv, OutAxisCombine, ScaledInputBase, folded_weight, out_axis_combine,
                           per_channel)
from .keys import ModuleSpec

__all__ = ["DoRAModule", "layer_kind"]


def _graph_task_id() -> int:
    """-1 outside backward; the running backward's id inside it (e.g. during checkpoint recomputation)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else current()


def _compiling() -> bool:
    """True while torch.compile (dynamo) traces: the eager memos use identity checks a graph cannot hold."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def layer_kind(module: nn.Module) -> str:
    """'linear', 'conv1x1' or 'conv' (kxk) for a base layer; ValueError for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped Conv2d (groups={module.groups}) is not supported")
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    raise ValueError(f"DoRA adapters wrap nn.Linear or nn.Conv2d, not {type(module).__name__}")


def _save_block_diagonal(module: "DoRAModule", state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Split parts are saved exactly as the math reads them (off-block zeros), whatever an optimizer did."""
    key = prefix + "lora_up.weight"
    if key in state_dict and module._up_mask is not None:
        state_dict[key] = module.up_weight if state_dict[key].requires_grad else module.up_weight.detach()


class DoRAModule(nn.Module):
    """A DoRA / LoRA adapter for one base layer.

    Args:
        lora_name: the adapter's name in files (``lora_unet_..._to_q``).
        base: the ``nn.Linear`` or ``nn.Conv2d`` to adapt (kept by reference, never registered).
        rank: r.
        alpha: alpha; 0 or None means alpha = r. With ``rs_lora`` the stored alpha is alpha*sqrt(r), so that
            every loader's alpha/r gives the rs-LoRA scale alpha/sqrt(r).
        dora: False gives a plain LoRA (no ``dora_scale``).
        wd_on_out: the DoRA axis (False: per input column).
        use_tucker: Tucker core ``lora_mid`` for kxk convs (ignored for Linear and 1x1).
        detach_norm: the norm is a constant in backward (paper section 4.3).
        dropout: dropout on the rank-r activations, training only.
        rank_dropout: drop rank channels with this probability, training only.
        module_dropout: skip the adapter with this probability, training only.
        multiplier: strength mu; W(mu) = W0 + mu * (W' - W0).
        rs_lora: see ``alpha``.
        parts: output rows of each part of a fused Linear (FLUX ``split_qkv``: q, k, v[, MLP]). Each part gets
            its own rank-r factors: ``lora_down`` stacks them (P*r, in) and ``lora_up`` is block-diagonal
            (out, P*r), kept so by a mask in every read (off-block entries get no gradient and are saved as zeros).
            The stored alpha is P*alpha, so alpha/rank in the file is the trained alpha/r for every loader. One
            magnitude covers the fused weight.
    """

    def __init__(
        self,
        lora_name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None,
        *,
        dora: bool = True,
        wd_on_out: bool = False,
        use_tucker: bool = False,
        detach_norm: bool = True,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        multiplier: float = 1.0,
        rs_lora: bool = False,
        parts: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.kind = layer_kind(base)
        if parts is not None:
            if self.kind != "linear" or sum(parts) != base.weight.shape[0] or rs_lora:
                raise ValueError(f"{lora_name}: split parts {parts} need a Linear with {sum(parts)} output rows "
                                 f"(and no rs_lora)")
            rank, alpha = rank * len(parts), (float(alpha) if alpha else float(rank)) * len(parts)
        object.__setattr__(self, "base_layer", base)  # unregistered on purpose
        weight = base.weight
        out_dim, in_dim = weight.shape[0], weight.shape[1]
        if self.kind == "linear":
            self.lora_down = nn.Linear(in_dim, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_dim, bias=False)
        else:
            conv: nn.Conv2d = base  # type: ignore[assignment]
            self.use_tucker = use_tucker and self.kind == "conv"
            if self.use_tucker:
                self.lora_down = nn.Conv2d(in_dim, rank, 1, bias=False)
                self.lora_mid = nn.Conv2d(
                    rank, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                    padding_mode=conv.padding_mode,
                )
            else:
                self.lora_down = nn.Conv2d(
                    in_dim, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                    padding_mode=conv.padding_mode,
                )
            self.lora_up = nn.Conv2d(rank, out_dim, 1, bias=False)
        self.use_tucker = getattr(self, "lora_mid", None) is not None
        for layer in (self.lora_down, getattr(self, "lora_mid", None), self.lora_up):
            if layer is not None:
                layer.to(device=weight.device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.use_tucker:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        alpha = float(rank) if not alpha else float(alpha)
        stored_alpha = alpha * math.sqrt(rank) if rs_lora else alpha
        self.register_buffer("alpha", torch.tensor(stored_alpha, dtype=torch.float32, device=weight.device))
        self.rank = rank
        self.dora = dora
        self.wd_on_out = wd_on_out
        self.detach_norm = detach_norm
        if dora:
            with torch.no_grad():
                magnitude = DF.weight_norm(weight, wd_on_out)
            self.dora_scale = nn.Parameter(magnitude)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = float(multiplier)
        self.org_forward: Callable[..., torch.Tensor] | None = None
        self._norm_memo: tuple[tuple, torch.Tensor] | None = None  # (inputs' identity, detached norm)
        self._base_sq_memo: tuple[tuple, torch.Tensor] | None = None  # (W0's identity, ||W0||^2 along the axis)
        self._base_sq_value: torch.Tensor | None = None  # the memo's tensor, for compiled forwards
        self._scale_memo: tuple[tuple, float] | None = None  # (alpha's identity, alpha / rank)
        self._had_instance_forward = False
        self.precalculated = False  # True while the blended weight is baked into the base (network_pre_calc)
        mask = None if parts is None else torch.block_diag(*(torch.ones(rows, rank // len(parts)) for rows in parts))
        self.register_buffer("_up_mask", None if mask is None else mask.to(weight.device), persistent=False)
        if parts is not None:
            self._register_state_dict_hook(_save_block_diagonal)
            self._register_load_state_dict_pre_hook(self._refuse_dense_up)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def up_weight(self) -> torch.Tensor:
        """``lora_up``'s weight as the math reads it: block-diagonal for split parts, as stored otherwise."""
        up = self.lora_up.weight
        return up if self._up_mask is None else up * self._up_mask.to(up.dtype)

    def _refuse_dense_up(self, state_dict: dict, prefix: str, *args: Any) -> None:
        up = state_dict.get(prefix + "lora_up.weight")
        if up is not None and up.shape == self._up_mask.shape and bool((up * (1 - self._up_mask.to(up.dtype))).any()):
            raise ValueError(
                f"{self.lora_name}: the file's lora_up is not block-diagonal, so it was not trained with split_qkv; "
                f"load it without split_qkv=True (its q, k and v share one low-rank factor)"
            )

    @property
    def scale(self) -> float:
        """s = alpha / rank, read from the buffer so a loaded alpha takes effect.

        Memoised on the buffer's identity (storage, version counter, dtype, device), which every write, load or
        move changes: reading a GPU buffer with ``float()`` would stall the host on every forward of every layer.
        """
        key = self._identity(self.alpha)
        if self._scale_memo is None or self._scale_memo[0] != key:
            self._scale_memo = (key, float(self.alpha) / self.rank)
        return self._scale_memo[1]

    def _scale_value(self) -> float | torch.Tensor:
        """s for the forward: the memoised float eagerly; under torch.compile a tensor expression of the buffer
        (the memo's identity checks would break the graph, and a float read would specialise on its value)."""
        if _compiling():
            return self.alpha.to(torch.float32) / self.rank
        return self.scale

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def apply_to(self) -> None:
        """Route the base layer's forward through this adapter (idempotent)."""
        if self.org_forward is not None:
            return
        base = self.base_layer
        self._had_instance_forward = "forward" in base.__dict__
        self.org_forward = base.forward
        base.forward = self.forward

    def restore(self) -> None:
        """Undo :meth:`apply_to` exactly: the base layer's forward is what it was before."""
        if self.org_forward is None:
            return
        base = self.base_layer
        if self._had_instance_forward:
            base.forward = self.org_forward
        else:
            del base.forward
        self.org_forward = None

    def conform(self, spec: ModuleSpec) -> None:
        """Make this adapter able to take a file's tensors for it (``load_weights``).

        The DoRA axis follows the file (its ``dora_scale`` shape is the record of how it was trained); rank,
        Tucker and DoRA-versus-LoRA must already agree.

        Raises:
            ValueError: the file's rank, Tucker core or DoRA-ness differs from this adapter's.
        """
        mine = (self.rank, self.use_tucker, self.dora)
        theirs = (spec.rank, spec.tucker, spec.dora)
        if mine != theirs:
            raise ValueError(
                f"module '{self.lora_name}': the file has rank={spec.rank}, tucker={spec.tucker}, dora={spec.dora} "
                f"but this network has rank={self.rank}, tucker={self.use_tucker}, dora={self.dora}. Build the "
                f"network from the file instead (sd-scripts: --dim_from_weights)"
            )
        if self.dora and spec.wd_on_out is not None and spec.wd_on_out != self.wd_on_out:
            self.wd_on_out = spec.wd_on_out
            with torch.no_grad():
                magnitude = DF.weight_norm(self.base_weight, self.wd_on_out).to(self.dora_scale.dtype)
            self.dora_scale = nn.Parameter(magnitude.to(self.dora_scale.device))
            self._base_sq_value = None  # the other axis: recomputed on the next eager forward or refresh
        self.alpha.fill_(spec.alpha)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.org_forward is not None:
            return self.org_forward(x)
        return self.base_layer.__class__.forward(self.base_layer, x)

    # -- math --------------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """s * B A (Tucker: s * B T A) in float32, shaped like the base weight."""
        mid = self.lora_mid.weight if self.use_tucker else None
        return DF.lowrank_delta(self.up_weight, self.lora_down.weight, self.scale, mid)

    @staticmethod
    def _identity(*tensors: torch.Tensor | None) -> tuple:
        """Storage, version counter and dtype of each tensor: changes when any of them is replaced or written."""
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)

    def _base_sq(self) -> torch.Tensor:
        """||W0||^2 along the axis, memoised while the base weight is unchanged (it is frozen while training).

        Under torch.compile the memo is read without its identity check (the base is frozen while a compiled model
        trains; :meth:`refresh_base_norm` runs eagerly from ``prepare_grad_etc``), or computed in the graph.
        """
        if _compiling():
            cached = self._base_sq_value
            if cached is not None:
                return cached
            return DF.weight_norm(self.base_weight, self.wd_on_out).square()
        key = self._identity(self.base_weight) + (self.wd_on_out,)
        if self._base_sq_memo is None or self._base_sq_memo[0] != key:
            with torch.no_grad():
                self._base_sq_memo = (key, DF.weight_norm(self.base_weight, self.wd_on_out).square())
            self._base_sq_value = self._base_sq_memo[1]
        return self._base_sq_memo[1]

    def refresh_base_norm(self) -> None:
        """Compute (or re-validate) the memoised ||W0||^2 now, eagerly, where the base weight finally lives."""
        self._base_sq()

    def adapted_norm(self) -> torch.Tensor:
        """||W0 + s B A|| along the axis (float32), factored: no weight-sized tensor is formed.

        Detached by default (paper section 4.3). A detached norm is computed once per forward and reused by the
        recomputation that gradient checkpointing runs during backward, as long as no tensor it reads changed.
        Outside backward it is always recomputed: some optimizers (bitsandbytes, ``p.data`` updates) write
        parameters without bumping their version counters, so a memo could not tell a new step from the last.
        """
        up, down = self.up_weight, self.lora_down.weight
        mid = self.lora_mid.weight if self.use_tucker else None
        if _compiling():  # no memo (its identity checks would break the graph); recomputed under checkpointing
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
                return DF.adapted_norm(self.base_weight, up, down, self._scale_value(), self.wd_on_out, mid,
                                       self._base_sq())
        if not self.detach_norm:
            norm = DF.adapted_norm(self.base_weight, up, down, self.scale, self.wd_on_out, mid, self._base_sq())
            self._norm_memo = (self._norm_key(), norm.detach())  # for the per-step statistics only
            return norm
        key = self._norm_key()
        in_backward = _graph_task_id() != -1
        if not (in_backward and self._norm_memo is not None and self._norm_memo[0] == key):
            with torch.no_grad():
                norm = DF.adapted_norm(self.base_weight, up, down, self.scale, self.wd_on_out, mid, self._base_sq())
            self._norm_memo = (key, norm)
        return self._norm_memo[1]

    def _norm_key(self) -> tuple:
        mid = self.lora_mid.weight if self.use_tucker else None
        return self._identity(self.lora_up.weight, self.lora_down.weight, mid, self.alpha, self.base_weight) + (
            self.wd_on_out,)

    # -- per-step statistics (sd-scripts' norm logging; O(r (in + out)), no weight-sized tensor) -----------------
    def lowrank_norm(self) -> torch.Tensor:
        """||s B A||_F (the update LoRA adds; what ``--scale_weight_norms`` caps), from r x r Gram matrices."""
        mid = self.lora_mid.weight if self.use_tucker else None
        with torch.no_grad():
            return DF.lowrank_frobenius(self.up_weight, self.lora_down.weight, self.scale, mid)

    def dora_weight_norm(self) -> torch.Tensor:
        """||W'||_F of this adapter's DoRA weight (strength 1), from the axis norms the forward computed.

        Reuses the norm of the last forward while no tensor it read has changed (sd-scripts calls this between
        backward and the optimizer step); otherwise computes it in factored form (r*in*out work, no weight-sized
        tensor). Only for DoRA adapters.
        """
        memo = self._norm_memo
        if memo is not None and memo[0] == self._norm_key():
            norm = memo[1]
        else:
            up, down = self.up_weight, self.lora_down.weight
            mid = self.lora_mid.weight if self.use_tucker else None
            with torch.no_grad():
                norm = DF.adapted_norm(self.base_weight, up, down, self.scale, self.wd_on_out, mid, self._base_sq())
        with torch.no_grad():
            return DF.dora_weight_frobenius(norm.detach(), self.dora_scale.detach())

    @torch.no_grad()
    def merged_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """W(mu) = W0 + mu * (W' - W0) in float32 (plain LoRA: W0 + mu * s B A)."""
        mu = self.multiplier if multiplier is None else float(multiplier)
        base = self.base_weight
        delta = self.delta_weight()
        if not self.dora:
            return base.to(delta.dtype) + mu * delta
        return DF.blend(base, DF.dora_weight(base, delta, self.dora_scale, self.wd_on_out), mu)

    def _hidden(self, x: torch.Tensor, down_scale: torch.Tensor | None = None) -> torch.Tensor:
        """h = mid(down(x * down_scale)) with the dropouts: the rank-r activations.

        ``down_scale`` (one factor per input channel) is folded into the (r, in) ``lora_down`` weight, so the
        scaled input is never formed for this path and autograd keeps only ``x``, which LoRA keeps too. A
        convolution's (r, in, k, k) folded weight would be kept as well: it goes through FoldedScaleConv instead.
        """
        if down_scale is None:
            hidden = self.lora_down(x)
        elif (self.kind != "linear" and self.lora_down.padding_mode == "zeros" and torch.is_grad_enabled()
              and not isinstance(self.lora_down.padding, str)):
            d = self.lora_down
            hidden = FoldedScaleConv.apply(x, down_scale, d.weight, d.stride, d.padding, d.dilation, d.groups)
        else:
            down = folded_weight(self.lora_down.weight, down_scale)
            hidden = F.linear(x, down) if self.kind == "linear" else self.lora_down._conv_forward(x, down, None)
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.use_tucker:
            hidden = self.lora_mid(hidden)
        if self.training and self.rank_dropout:
            shape = (hidden.shape[0], self.rank) + (1,) * (hidden.dim() - 2)
            if self.kind == "linear":
                shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (self.rank,)
            keep = torch.rand(shape, device=hidden.device) >= self.rank_dropout
            hidden = hidden * keep.to(hidden.dtype) / (1.0 - self.rank_dropout)
        return hidden

    def _folded_up(self, up_scale: torch.Tensor | float) -> torch.Tensor:
        """The (out, r) ``lora_up`` weight times ``up_scale`` (a number, or one factor per output channel).

        Folding the scale into the tiny weight costs one pass over r * out numbers instead of two passes (forward
        and backward) over the activation-sized output.
        """
        up = self.up_weight
        if isinstance(up_scale, torch.Tensor):
            return up * up_scale.reshape((-1,) + (1,) * (up.dim() - 1)).to(up.dtype)
        return up * up_scale

    def _project_up(self, hidden: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, up) if self.kind == "linear" else F.conv2d(hidden, up)

    def _scaled_input_base(self, x: torch.Tensor, c_base: torch.Tensor) -> torch.Tensor:
        """base(x * c_b), keeping for backward only what LoRA keeps (``x``, shared with the ``lora_down`` path).

        A plain, frozen nn.Linear / zero-padded nn.Conv2d whose forward nobody else patched goes through
        :class:`~dora_network.autograd_ops.ScaledInputBase`; anything else through its own forward and autograd.
        """
        base = self.base_layer
        bias = getattr(base, "bias", None)
        plain = (not self._had_instance_forward and type(base) in (nn.Linear, nn.Conv2d)
                 and getattr(base, "padding_mode", "zeros") == "zeros" and not isinstance(getattr(base, "padding", 0), str)
                 and not base.weight.requires_grad
                 and (bias is None or not bias.requires_grad))
        if plain and torch.is_grad_enabled() and (x.requires_grad or c_base.requires_grad):
            geometry = None if self.kind == "linear" else (base.stride, base.padding, base.dilation, base.groups)
            return ScaledInputBase.apply(x, c_base, base.weight, bias, geometry)
        return self._base_forward(x * per_channel(c_base, self.kind != "linear", x.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mu = self.multiplier
        if mu == 0.0 or self.precalculated:
            return self._base_forward(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            # Keep every parameter in the graph with a zero gradient: under multi-process training each rank
            # then all-reduces the same set of gradients (sd-scripts skips params whose grad is None, and a
            # rank-dependent set would hang or desynchronise the ranks; DDP would need find_unused_parameters).
            return self._base_forward(x) + sum(p.sum() for p in self.parameters()) * 0.0
        scale = self._scale_value()
        if not self.dora:
            return self._base_forward(x) + self._project_up(self._hidden(x), self._folded_up(mu * scale))
        c_base, c = DF.activation_scales(self.adapted_norm(), self.dora_scale, mu)
        if not self.wd_on_out:
            lowrank = self._project_up(self._hidden(x, down_scale=c), self._folded_up(mu * scale))
            return self._scaled_input_base(x, c_base) + lowrank
        # out-axis: y = c_b * (W0 x + b) + (1 - c_b) * b + mu*s*c * B A x, one fused pass over the output
        out = self._base_forward(x)
        hidden = self._hidden(x)
        up = self._folded_up(c * (mu * scale))
        bias = getattr(self.base_layer, "bias", None)
        if torch.is_grad_enabled() and (out.requires_grad or up.requires_grad or hidden.requires_grad):
            return OutAxisCombine.apply(out, c_base, hidden, up, bias)
        return out_axis_combine(out, c_base, hidden, up, bias)
