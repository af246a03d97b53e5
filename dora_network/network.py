"""DoRANetwork: the object sd-scripts trains, saves and merges; every method of its network-module contract.

Adapters are registered under their ``lora_name`` so ``state_dict()`` is the file layout. Base modules are never
registered (accelerate would move, cast and save them). The heavy lifting lives in layers.py (math per layer),
targets.py (which layers), loading.py (files -> layers), io.py (bytes on disk) and merge.py (baking weights).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import io as dio
from . import merge, step_hooks
from .args import NetworkArgs
from .families import Family, detect_family
from .keys import ModuleSpec, axis_from_metadata
from .layers import DoRAModule
from .loading import FileMatch, check_coverage, match_file, nonfinite_modules
from .targets import Target, every_layer, find_targets

logger = logging.getLogger(__name__)

__all__ = ["DoRANetwork"]

_VERSION_KEY = "dora_network.version"

#: how a user of sd-scripts opts in to loading a file of which only part fits the model
ALLOW_PARTIAL_HINT = '--network_args "allow_partial_load=True" (Python: allow_partial=True)'


class DoRANetwork(nn.Module):
    """A set of DoRA/LoRA adapters over a denoiser (UNet or DiT) and its text encoders.

    Args:
        text_encoders: the trainer's text encoders as a list, positions kept (None entries allowed).
        unet: the denoiser module, or None.
        args: parsed options.
        multiplier: strength mu of every adapter.
        file_specs: when built from a file, the per-layer specs read from it; only those layers get adapters
            and each takes its rank/alpha/axis/Tucker/DoRA from the file.
        family: the model family (recognised from the models when None).

    Attributes:
        family: the model family's description (families/).
        train_t5xxl: whether T5-XXL has adapters (FLUX/SD3 trainers read it to refuse cached T5 outputs).
    """

    def __init__(
        self,
        text_encoders: Sequence[nn.Module | None],
        unet: nn.Module | None,
        args: NetworkArgs,
        multiplier: float = 1.0,
        file_specs: dict[str, ModuleSpec] | None = None,
        family: Family | None = None,
    ) -> None:
        super().__init__()
        self.args = args
        self.multiplier = float(multiplier)
        self.family = family or detect_family(unet, text_encoders)
        from_file = file_specs is not None
        # every layer a file may name (any option, conv blocks, text encoders): tells a file for another model
        # from one that only adapts layers this network leaves alone
        self.model_layers: list[Target] = every_layer(text_encoders, unet, self.family)
        if from_file:
            self.targets: list[Target] = [t for t in self.model_layers if t.lora_name in file_specs]
        else:
            self.targets = find_targets(text_encoders, unet, args, family=self.family)
        slots = self.family.text_encoder_slots(len(text_encoders))
        self.train_t5xxl = any(t.te_index is not None and slots[t.te_index].enabled_by == "train_t5xxl"
                               for t in self.targets)
        self.text_encoder_loras: list[DoRAModule] = []
        self.unet_loras: list[DoRAModule] = []
        for target in self.targets:
            module = self._make_module(target, file_specs[target.lora_name] if from_file else None)
            self.add_module(target.lora_name, module)
            (self.unet_loras if target.component == "unet" else self.text_encoder_loras).append(module)
        if not self.targets:
            raise ValueError(
                f"no layer matched on this {self.family.title} model with these options: its containers "
                f"{', '.join(self.family.unet_containers(args))} hold no Linear/Conv2d layer that the options select "
                f"(check network_args such as train_blocks, *_dim=0, exclude_patterns, network_reg_dims)"
            )
        self._norm_cache: dict[str, torch.Tensor | None] = {}
        self._weight_backup: dict[str, torch.Tensor] = {}
        self._log_summary()

    # -- construction ------------------------------------------------------------------------------------------
    def _make_module(self, target: Target, spec: ModuleSpec | None) -> DoRAModule:
        a = self.args
        if spec is not None:
            rank, alpha, dora, wd_on_out, tucker = spec.rank, spec.alpha, spec.dora, bool(spec.wd_on_out), spec.tucker
            rs_lora = False  # a file stores the effective alpha (alpha*sqrt(r) for rs-LoRA)
        elif target.kind == "conv":
            rank, alpha = target.rank or a.conv_dim or a.rank, a.effective_conv_alpha
            dora, wd_on_out, tucker, rs_lora = a.dora, a.wd_on_out, a.use_tucker, a.rs_lora
        else:
            rank, alpha, dora, wd_on_out, tucker, rs_lora = (target.rank or a.rank, a.alpha, a.dora, a.wd_on_out,
                                                             False, a.rs_lora)
        parts = None
        if spec is None and a.family_options.get("split_qkv") and target.component == "unet":
            weight = target.module.weight
            parts = self.family.fused_parts(target.path, int(weight.shape[1]), int(weight.shape[0]))
        return DoRAModule(
            target.lora_name, target.module, rank, alpha, dora=dora, wd_on_out=wd_on_out, use_tucker=tucker,
            detach_norm=a.detach_norm, dropout=a.dropout, rank_dropout=a.rank_dropout,
            module_dropout=a.module_dropout, multiplier=self.multiplier, rs_lora=rs_lora, parts=parts,
        )

    def _log_summary(self) -> None:
        kinds = Counter((t.component, t.kind) for t in self.targets)
        axes = Counter("out" if m.wd_on_out else "in" for m in self.loras if m.dora)
        ranks = Counter(m.rank for m in self.loras)
        logger.info(
            "dora_network: %s, %d adapters (%s); algo=%s, ranks %s, axis %s, norm %s",
            self.family.title, len(self.targets), ", ".join(f"{c}/{k}: {n}" for (c, k), n in sorted(kinds.items())),
            self.args.algo, dict(ranks), dict(axes) or "-", "detached" if self.args.detach_norm else "with gradient",
        )
        if self.args.verbose:
            for module in self.loras:
                logger.info("\t%-60s rank %d, alpha %g", module.lora_name, module.rank, float(module.alpha))

    @property
    def loras(self) -> list[DoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    @staticmethod
    def match_targets(text_encoders: Sequence[nn.Module | None], unet: nn.Module | None,
                      state_dict: dict[str, torch.Tensor], axis_hint: bool | None = None,
                      allow_partial: bool = False, family: Family | None = None) -> FileMatch:
        """Match a file against every layer a file may adapt (conv blocks and text encoders included).

        Raises:
            ValueError: no module of the file matches the model, or some do not and ``allow_partial`` is False.
        """
        targets = every_layer(text_encoders, unet, family)
        found = match_file(state_dict, targets, axis_hint)
        check_coverage(found, targets, allow_partial, ALLOW_PARTIAL_HINT)
        return found

    # -- sd-scripts contract: setup ----------------------------------------------------------------------------
    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Patch the base layers' forwards; adapters of a part not applied are dropped from the network."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        if not self.loras:
            raise ValueError("apply_to: both text encoders and UNet were excluded, nothing left to train")
        for module in self.loras:
            module.apply_to()

    def _drop(self, modules: Iterable[DoRAModule]) -> None:
        names = {m.lora_name for m in modules}
        for name in names:
            delattr(self, name)
        self.targets = [t for t in self.targets if t.lora_name not in names]

    def restore(self) -> None:
        """Undo :meth:`apply_to` on every base layer."""
        for module in self.loras:
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for module in self.loras:
            module.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: adapters run inside the host's checkpointed blocks and have no side effects."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        """Called once, after every cast and move of the base models: memoise each ||W0|| where it now lives."""
        self.requires_grad_(True)
        for module in self.loras:
            if module.dora:
                module.refresh_base_norm()

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def on_step_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        """Nothing per step: dropout masks are drawn inside forward."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- optimizer ---------------------------------------------------------------------------------------------
    def _param_groups(self, modules: list[DoRAModule], lr: float | None, ratio: float | None,
                      label: str) -> tuple[list[dict[str, Any]], list[str]]:
        """Groups for one part: ``network_reg_lrs`` matches first (one group per pattern), then the rest at ``lr``;
        ``lora_up`` in a "plus" group when LoRA+ is on."""
        by_rate: dict[int, list[DoRAModule]] = {}
        paths = {t.lora_name: t.path for t in self.targets}
        for module in modules:
            path = paths.get(module.lora_name, "")
            match = next((i for i, (pattern, _) in enumerate(self.args.reg_lrs)
                          if self.family.reg_matches(pattern, module.lora_name, path)), -1)
            by_rate.setdefault(match, []).append(module)
        groups, names = [], []
        for match, members in sorted(by_rate.items(), key=lambda item: item[0] < 0):
            rate = lr if match < 0 else self.args.reg_lrs[match][1]
            if rate == 0:
                continue
            up, rest = [], []
            for module in members:
                for name, param in module.named_parameters():
                    (up if ratio and name.startswith("lora_up") else rest).append(param)
            tag = label if match < 0 else f"{label} reg_lr_{match}"
            for params, factor, suffix in ((rest, 1.0, ""), (up, ratio or 1.0, " plus")):
                if params:
                    group: dict[str, Any] = {"params": params}
                    if rate is not None:
                        group["lr"] = rate * factor
                    groups.append(group)
                    names.append(tag + suffix)
        return groups, names

    def _te_position(self) -> dict[str, int]:
        """lora_name -> the text encoder's position in the trainer's list (which ``--text_encoder_lr`` it takes)."""
        return {t.lora_name: t.te_index for t in self.targets if t.te_index is not None}

    def prepare_optimizer_params_with_multiple_te_lrs(
        self, text_encoder_lr: Any, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Param groups with one rate per text encoder (``--text_encoder_lr a b``: SDXL TE1/TE2, FLUX CLIP-L/T5,
        SD3 CLIP-L/CLIP-G/T5 with the last rate repeated),
        ``network_reg_lrs`` and LoRA+ ratios."""
        self.requires_grad_(True)
        position = self._te_position()
        used = sorted({position[m.lora_name] for m in self.text_encoder_loras})
        count = max(used, default=0) + 1
        if text_encoder_lr is None or isinstance(text_encoder_lr, (int, float)):
            te_lrs = [text_encoder_lr] * count
        else:
            te_lrs = list(text_encoder_lr) or [None]
            te_lrs = te_lrs + [te_lrs[-1]] * (count - len(te_lrs))  # the last rate repeats: SD3's [a, b] -> a, b, b
        a = self.args
        te_ratio = a.loraplus_text_encoder_lr_ratio or a.loraplus_lr_ratio
        unet_ratio = a.loraplus_unet_lr_ratio or a.loraplus_lr_ratio
        groups: list[dict[str, Any]] = []
        names: list[str] = []
        for index in used:
            lr = te_lrs[index] if te_lrs[index] is not None else default_lr
            label = f"textencoder {index + 1}" if count > 1 else "textencoder"
            members = [m for m in self.text_encoder_loras if position[m.lora_name] == index]
            g, n = self._param_groups(members, lr, te_ratio, label)
            groups += g
            names += n
        g, n = self._param_groups(self.unet_loras, unet_lr if unet_lr is not None else default_lr, unet_ratio, "unet")
        groups += g
        names += n
        if not groups:
            raise ValueError("no trainable adapter parameters: every learning rate is 0 or nothing was applied")
        return groups, names

    def prepare_optimizer_params(self, text_encoder_lr: Any = None, unet_lr: float | None = None,
                                 default_lr: float | None = None) -> list[dict[str, Any]]:
        """A plain, non-empty ``list`` of param groups (works with every sd-scripts version)."""
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)[0]

    # -- files -------------------------------------------------------------------------------------------------
    def load_weights(self, file: str, *, allow_partial: bool | None = None) -> Any:
        """Load a file into this network (``--network_weights``); returns ``load_state_dict``'s result.

        The file's axis (read from ``dora_scale``'s shape) wins over this network's option, so an out-axis
        LyCORIS file resumes as out-axis. See :meth:`load_file_state` for partial files.
        """
        state_dict, metadata = dio.load_file(file)
        return self.load_file_state(state_dict, axis_from_metadata(metadata), allow_partial=allow_partial)

    def load_file_state(self, state_dict: dict[str, torch.Tensor], axis_hint: bool | None = None, *,
                        allow_partial: bool | None = None) -> Any:
        """Load an in-memory file state dict (any accepted spelling) into this network.

        Modules for layers of the model that this network does not adapt (e.g. text-encoder modules when
        training with ``--network_train_unet_only``) are skipped with a warning, as sd-scripts' own networks do;
        modules that name no layer of the model at all refuse the file unless ``allow_partial`` (default: the
        ``allow_partial_load`` network arg).

        Raises:
            ValueError: the file does not fit the model (see loading.check_coverage) or this network's ranks.
        """
        allow = self.args.allow_partial_load if allow_partial is None else allow_partial
        found = match_file(state_dict, self.model_layers, axis_hint)
        check_coverage(found, self.model_layers, allow, ALLOW_PARTIAL_HINT)
        modules = dict(self.named_children())
        elsewhere = sorted(name for name in found.specs if name not in modules)
        if elsewhere:
            logger.warning("%d of the file's modules are for layers this network does not adapt (e.g. %s: text "
                           "encoders under --network_train_unet_only, or conv blocks without conv_dim); they are "
                           "not loaded, and files this network saves will not have them", len(elsewhere), elsewhere[:3])
        fresh = sorted(name for name in modules if name not in found.specs)
        if fresh:
            logger.info("%d of this network's adapters are not in the file and keep their initial values (e.g. %s)",
                        len(fresh), fresh[:3])
        for name, spec in found.specs.items():
            if name in modules:
                modules[name].conform(spec)
        mine = {key: value for key, value in found.state_dict.items() if key.partition(".")[0] in modules}
        return self.load_state_dict(mine, strict=False)

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                     *, allow_nonfinite: bool = False) -> None:
        """Write the LyCORIS-layout file atomically, with sd-scripts' metadata and hashes.

        Raises:
            ValueError: NaN/Inf in the weights (or produced by the cast to ``dtype``), unless ``allow_nonfinite``;
                any previous file at ``file`` is left as it was.
        """
        state_dict = {
            key: (value.detach().to(dtype) if dtype is not None and value.is_floating_point() else value.detach())
            .cpu().contiguous()
            for key, value in self.state_dict().items()
        }
        broken = [] if allow_nonfinite else nonfinite_modules(state_dict)
        if broken:
            cause = ("the training diverged; lower the learning rate or resume from the last good file"
                     if nonfinite_modules(dict(self.state_dict())) else
                     f"the values overflow {dtype}; save in bfloat16 or float32 (--save_precision bf16/float)")
            raise ValueError(f"refusing to save '{file}': NaN/Inf in {len(broken)} modules (e.g. {broken[:3]}): "
                             f"{cause}. Any previous file there is intact")
        metadata = dict(metadata or {})
        if str(file).lower().endswith(".safetensors"):
            from . import __version__

            axes = {m.wd_on_out for m in self.loras if m.dora}
            metadata.setdefault("ss_network_module", "dora_network")
            metadata[_VERSION_KEY] = __version__
            metadata["dora_network.algo"] = "dora" if axes else "lora"
            metadata["dora_network.wd_on_out"] = "mixed" if len(axes) > 1 else str(axes.pop()) if axes else "None"
            metadata["dora_network.detach_norm"] = str(self.args.detach_norm)
            model_hash, legacy_hash = dio.safetensors_hashes(state_dict, metadata)
            metadata["sshs_model_hash"] = model_hash
            metadata["sshs_legacy_hash"] = legacy_hash
        dio.save_file(file, state_dict, metadata)

    # -- merging -----------------------------------------------------------------------------------------------
    def merge_to(self, text_encoder: Any, unet: Any, weights_sd: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Bake the adapters (at this network's multiplier) into the base weights (``--base_weights``).

        ``dtype``/``device`` are accepted for sd-scripts' call; the merge runs in float32 where each base weight
        lives and is written in the base weight's own dtype.
        """
        if weights_sd is not None:
            self.load_file_state(weights_sd)
        merge.merge_into_base(self.loras)

    def backup_weights(self) -> None:
        merge.backup(self.loras, self._weight_backup)

    def restore_weights(self) -> None:
        merge.restore(self.loras, self._weight_backup)

    def pre_calculation(self) -> None:
        """``--network_pre_calc``: bake the current multiplier into the base weights; forwards skip the adapters."""
        merge.pre_calculate(self.loras, self._weight_backup)

    # -- per-step hooks (step_hooks.py: O(r (in + out)) per layer, no weight-sized tensor) ----------------------
    def apply_max_norm_regularization(self, max_norm_value: float, device: Any = None) -> tuple[int, float, float]:
        """Cap ||s B A||_F of every adapter at ``max_norm_value`` (``--scale_weight_norms``, after every step)."""
        return step_hooks.max_norm_regularize(self.loras, float(max_norm_value))

    def update_norms(self) -> None:
        """Record ||s B A||_F per adapter and ||W'||_F per DoRA adapter (called after every backward).

        W's norm comes from the axis norms this step's forward computed, so it describes the weights the step used.
        """
        self._norm_cache["weight"] = step_hooks.lowrank_norms(self.loras)
        self._norm_cache["combined"] = step_hooks.dora_weight_norms(self.loras)

    def update_grad_norms(self) -> None:
        """Record each adapter's gradient norm (all its parameters together)."""
        self._norm_cache["grad"] = step_hooks.grad_norms(self.loras)

    def weight_norms(self) -> torch.Tensor | None:
        """||s B A||_F per adapter, as of the last :meth:`update_norms`."""
        return self._norm_cache.get("weight")

    def grad_norms(self) -> torch.Tensor | None:
        """Gradient norm per adapter, as of the last :meth:`update_grad_norms`."""
        return self._norm_cache.get("grad")

    def combined_weight_norms(self) -> torch.Tensor | None:
        """||W'||_F per DoRA adapter (None for a plain-LoRA network), as of the last :meth:`update_norms`."""
        return self._norm_cache.get("combined")
