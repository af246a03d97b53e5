"""The smoke run's self-checks: every adapter trained, the saved file reloads, merges and loads in diffusers exactly,
and the loss fell.

Every check builds *fresh* tiny models from the run's settings (same config and seed as the trained one, so the
base weights are bit-identical) and goes through the same calls sd-scripts and the generation scripts make. Each
returns a :class:`CheckResult` whose one-line form carries its numbers.

Tolerances are relative to the largest magnitude compared. A float32 file must reproduce the trained network to
float32 rounding (1e-5); a half-precision file only to its own rounding of the adapter weights.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import CHECKS, SmokeSettings
from .model import Probe, build_model, probe_output
from ..tiny import TinySDXL, build_pipeline

logger = logging.getLogger(__name__)

__all__ = ["CHECK_NAMES", "CheckResult", "check_adapters_trained", "check_diffusers_pipeline", "check_loss_fell",
           "check_merged_equals_unmerged", "check_reload", "relative_difference", "reload_tolerance", "run_checks"]

CHECK_NAMES = CHECKS

#: relative tolerance of the reload check by the file's dtype: float32 rounding, or the file's rounding of the
#: adapter weights, which the UNet amplifies (bf16 keeps 8 mantissa bits).
_RELOAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}

_TE1_LAYER = re.compile(r"^lora_te1_text_model_encoder_layers_(\d+)_")

#: merged vs unmerged from the same file: the same weights, summed in a different order.
MERGE_TOLERANCE = 1e-5

#: weights written by the diffusers loader vs our merge: both W0 + mu*(W' - W0) in float32.
WEIGHT_TOLERANCE = 1e-5


@dataclass
class CheckResult:
    """The outcome of one self-check.

    Attributes:
        name: one of :data:`CHECK_NAMES`.
        status: "pass", "fail" or "skip".
        detail: a human-readable sentence with the numbers.
        numbers: the same numbers, for ``summary.json``.
    """

    name: str
    status: str
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def line(self) -> str:
        """``check <name> PASS|FAIL|SKIP  <detail>``, the line the smoke run prints."""
        return f"check {self.name:<9} {self.status.upper():<4}  {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, **self.numbers}


def reload_tolerance(save_dtype: torch.dtype | None) -> float:
    """Relative tolerance of the reload check for a file saved in ``save_dtype`` (None: float32)."""
    return _RELOAD_TOLERANCE.get(save_dtype or torch.float32, _RELOAD_TOLERANCE[torch.bfloat16])


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max |actual - expected|, that divided by max |expected|)``, in float32."""
    diff = float((actual.float() - expected.float()).abs().max())
    scale = float(expected.float().abs().max())
    return diff, diff / scale if scale > 0 else diff


def check_adapters_trained(file: Path) -> CheckResult:
    """Every adapter in the file moved off its init (``lora_up`` starts at zero; an all-zero one got no gradient).

    Exempt: text encoder 1's last layer. SDXL conditions on te1's *penultimate* hidden state, so that layer's
    adapters never get a gradient (in sd-scripts too: SDXL files keep them at zero).
    """
    from ..io import load_file

    tensors, _ = load_file(file)
    ups = {key.split(".", 1)[0]: tensor for key, tensor in tensors.items() if key.endswith(".lora_up.weight")}
    te1_layers = [int(m.group(1)) for name in ups if (m := _TE1_LAYER.match(name))]
    unused = f"lora_te1_text_model_encoder_layers_{max(te1_layers)}_" if te1_layers else None
    untrained = sorted(name for name, tensor in ups.items() if not torch.count_nonzero(tensor))
    exempt = [name for name in untrained if unused and name.startswith(unused)]
    untrained = [name for name in untrained if name not in exempt]
    passed = bool(ups) and not untrained
    detail = (f"{len(ups) - len(untrained) - len(exempt)}/{len(ups)} adapters have a non-zero lora_up"
              + (f", {len(exempt)} exempt (te1's last layer: SDXL uses its penultimate hidden state)" if exempt else "")
              + (f"; never updated: {untrained[:3]}{' ...' if len(untrained) > 3 else ''}" if untrained else ""))
    numbers = {"adapters": len(ups), "untrained": len(untrained), "exempt": len(exempt),
               "untrained_examples": untrained[:10]}
    return CheckResult("trained", "pass" if passed else "fail", detail, numbers)


def check_reload(settings: SmokeSettings, file: Path, reference: torch.Tensor, probe: Probe,
                 device: torch.device, save_dtype: torch.dtype | None, expected_modules: int
                 ) -> tuple[CheckResult, torch.Tensor]:
    """(a) A fresh model + ``create_network_from_weights`` + ``apply_to`` + ``load_state_dict`` = the trained model.

    This is the generation scripts' non-merging path. Returns the check and the reloaded model's probe output.
    """
    import dora_network

    model = build_model(settings, device)
    network, weights = dora_network.create_network_from_weights(
        1.0, str(file), model.vae, model.text_encoders, model.unet)
    network.apply_to(model.text_encoders, model.unet)  # the gen scripts' two-argument call
    info = network.load_state_dict(weights, False)
    network.eval()
    output = probe_output(model, probe)
    network.restore()
    diff, rel = relative_difference(output, reference)
    tolerance = reload_tolerance(save_dtype)
    modules = len(network.loras)
    problems = len(info.missing_keys) + len(info.unexpected_keys)
    passed = rel <= tolerance and problems == 0 and modules == expected_modules
    detail = (f"fresh model + create_network_from_weights + apply_to + load_state_dict: UNet output max abs diff "
              f"{diff:.3g} (relative {rel:.3g}, tolerance {tolerance:g}); {modules}/{expected_modules} modules, "
              f"{len(info.missing_keys)} missing / {len(info.unexpected_keys)} unexpected keys")
    numbers = {"max_abs_diff": diff, "relative_diff": rel, "tolerance": tolerance, "modules": modules,
               "expected_modules": expected_modules, "missing_keys": len(info.missing_keys),
               "unexpected_keys": len(info.unexpected_keys)}
    return CheckResult("reload", "pass" if passed else "fail", detail, numbers), output


def check_merged_equals_unmerged(settings: SmokeSettings, file: Path, unmerged: torch.Tensor | None, probe: Probe,
                                 device: torch.device) -> tuple[CheckResult, TinySDXL]:
    """(b) ``create_network_from_weights(for_inference=True)`` + ``merge_to`` on a fresh model = the unmerged reload.

    This is ``--base_weights`` / ``--network_merge``. ``unmerged`` is the reload check's output (None: the reload
    is rebuilt here). Returns the check and the merged model (for the diffusers check).
    """
    import dora_network

    if unmerged is None:
        unmerged = _unmerged_output(settings, file, probe, device)
    model = build_model(settings, device)
    network, weights = dora_network.create_network_from_weights(
        1.0, str(file), model.vae, model.text_encoders, model.unet, for_inference=True)
    network.merge_to(model.text_encoders, model.unet, weights, torch.float32, device)
    output = probe_output(model, probe)
    diff, rel = relative_difference(output, unmerged)
    passed = rel <= MERGE_TOLERANCE
    detail = (f"create_network_from_weights(for_inference=True) + merge_to on a fresh model vs unmerged reload: "
              f"UNet output max abs diff {diff:.3g} (relative {rel:.3g}, tolerance {MERGE_TOLERANCE:g}); "
              f"{len(network.loras)} layers merged")
    numbers = {"max_abs_diff": diff, "relative_diff": rel, "tolerance": MERGE_TOLERANCE,
               "merged_layers": len(network.loras)}
    return CheckResult("merge", "pass" if passed else "fail", detail, numbers), model


def _unmerged_output(settings: SmokeSettings, file: Path, probe: Probe, device: torch.device) -> torch.Tensor:
    import dora_network

    model = build_model(settings, device)
    network, weights = dora_network.create_network_from_weights(
        1.0, str(file), model.vae, model.text_encoders, model.unet, for_inference=True)
    network.apply_to(model.text_encoders, model.unet)
    network.load_state_dict(weights, False)
    return probe_output(model, probe)


def check_loss_fell(losses: Sequence[float], window: int, min_drop: float) -> CheckResult:
    """(c) The moving average of the last ``window`` steps is at least ``min_drop`` (relative) below the first's."""
    count = len(losses)
    window = max(1, min(window, count // 2))
    if count < 2 or not all(torch.isfinite(torch.tensor(list(losses)))):
        detail = f"{count} steps, finite: {all(torch.isfinite(torch.tensor(list(losses) or [0.0])))}"
        return CheckResult("loss", "fail", f"cannot judge the loss: {detail}", {"steps": count})
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    drop = 1.0 - last / first
    passed = drop >= min_drop
    detail = (f"moving average (window {window}) fell from {first:.4f} (first) to {last:.4f} (last): "
              f"{drop:.1%} lower, required >= {min_drop:.0%}")
    numbers = {"window": window, "first_moving_average": first, "last_moving_average": last,
               "relative_drop": drop, "required_drop": min_drop}
    return CheckResult("loss", "pass" if passed else "fail", detail, numbers)


def check_diffusers_pipeline(settings: SmokeSettings, file: Path, merged: TinySDXL | None,
                             device: torch.device) -> CheckResult:
    """(d) HOOK for the diffusers loader: the file loads into a ``StableDiffusionXLPipeline`` with the right weights.

    Calls ``dora_network.integrations.diffusers_loader.apply_dora_to_pipeline(pipe, file, strength=1.0) -> handle`` on a pipeline
    assembled from a fresh tiny model and compares every UNet and text-encoder weight of the patched pipeline with
    the model merged by check (b); then ``handle.remove()`` must give back the base weights. Skipped while that
    module does not exist.
    """
    try:
        from ..integrations.diffusers_loader import apply_dora_to_pipeline  # type: ignore[import-not-found]
    except ImportError:
        return CheckResult("diffusers", "skip", "skipped: loader not available (dora_network.integrations.diffusers_loader)")
    if merged is None:
        return CheckResult("diffusers", "skip", "skipped: needs the merge check's model (merge was skipped)")
    fresh = build_model(settings, device)
    base = _weights(fresh)
    pipe = build_pipeline(fresh)
    handle = apply_dora_to_pipeline(pipe, str(file), strength=1.0)
    try:
        patched = _weights(fresh)
    finally:
        handle.remove()
    restored = _weights(fresh)
    expected = _weights(merged)
    worst, compared, missing = _compare(patched, expected)
    undo, _, _ = _compare(restored, base)
    changed = sum(1 for name in expected if not torch.equal(expected[name], base[name]))
    passed = worst <= WEIGHT_TOLERANCE and undo == 0.0 and missing == 0 and changed > 0
    detail = (f"apply_dora_to_pipeline on a fresh StableDiffusionXLPipeline vs merge_to: {compared} weights compared "
              f"({changed} changed by the adapters, {missing} missing), max relative diff {worst:.3g} (tolerance "
              f"{WEIGHT_TOLERANCE:g}); after handle.remove() max relative diff to the base {undo:.3g}")
    numbers = {"compared": compared, "changed": changed, "missing": missing, "relative_diff": worst,
               "tolerance": WEIGHT_TOLERANCE, "undo_relative_diff": undo}
    return CheckResult("diffusers", "pass" if passed else "fail", detail, numbers)


def _weights(model: TinySDXL) -> dict[str, torch.Tensor]:
    """Copies of every UNet and text-encoder parameter, keyed ``unet.<name>`` / ``te1.<name>`` / ``te2.<name>``."""
    parts = {"unet": model.unet, "te1": model.text_encoders[0], "te2": model.text_encoders[1]}
    return {f"{prefix}.{name}": param.detach().float().cpu().clone()
            for prefix, part in parts.items() for name, param in part.named_parameters()}


def _compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, int, int]:
    """(worst per-tensor relative diff, tensors compared, expected names missing from ``actual``)."""
    worst, compared, missing = 0.0, 0, 0
    for name, tensor in expected.items():
        other = actual.get(name)
        if other is None or other.shape != tensor.shape:
            missing += 1
            continue
        worst = max(worst, relative_difference(other, tensor)[1])
        compared += 1
    return worst, compared, missing


def run_checks(settings: SmokeSettings, file: Path, reference: torch.Tensor, probe: Probe, losses: Sequence[float],
               device: torch.device, save_dtype: torch.dtype | None, expected_modules: int) -> list[CheckResult]:
    """Run every check not in ``settings.skip_checks``: every adapter trained, then (a) reload, (b) merge, (c) loss,
    (d) diffusers."""
    skip = set(settings.skip_checks)
    results: list[CheckResult] = []
    if "trained" in skip:
        results.append(CheckResult("trained", "skip", "skipped (--skip_checks)"))
    else:
        results.append(check_adapters_trained(file))
    unmerged: torch.Tensor | None = None
    merged: TinySDXL | None = None
    if "reload" in skip:
        results.append(CheckResult("reload", "skip", "skipped (--skip_checks)"))
    else:
        result, unmerged = check_reload(settings, file, reference, probe, device, save_dtype, expected_modules)
        results.append(result)
    if "merge" in skip:
        results.append(CheckResult("merge", "skip", "skipped (--skip_checks)"))
    else:
        result, merged = check_merged_equals_unmerged(settings, file, unmerged, probe, device)
        results.append(result)
    if "loss" in skip:
        results.append(CheckResult("loss", "skip", "skipped (--skip_checks)"))
    else:
        results.append(check_loss_fell(losses, settings.loss_window, settings.min_loss_drop))
    if "diffusers" in skip:
        results.append(CheckResult("diffusers", "skip", "skipped (--skip_checks)"))
    else:
        results.append(check_diffusers_pipeline(settings, file, merged, device))
    return results
