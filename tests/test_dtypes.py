"""Every dtype sd-scripts uses (fp32/fp16/bf16/float8 base; fp32/bf16 adapters): finite, float32 norms, and our
merge keeps small updates that a bf16 sum would round away. Numbers come from scripts/precision_report.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "precision_report", Path(__file__).resolve().parents[1] / "scripts" / "precision_report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


@pytest.mark.parametrize("base_dtype", report.BASE_DTYPES)
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_dtype_matrix_cell(base_dtype, adapter_dtype, wd_on_out):
    cell = report.layer_case(base_dtype, adapter_dtype, wd_on_out)
    assert cell["finite"]
    full = base_dtype == torch.float32 and adapter_dtype == torch.float32
    assert cell["output_rel_err"] < (1e-6 if full else 1e-2)  # bf16 activations: ~2^-8 per element
    assert cell["merge_delta_rel_err"] < 1e-5  # merges are computed in float32 whatever the dtypes


@pytest.mark.parametrize("ratio", [4e-4, 4e-3, 4e-2])
def test_small_dora_update_survives_bf16_base(ratio):
    """LyCORIS 4.1.3 loses 93/37/3.8 % of this update (reference/lycoris-dora.md §0.9); we keep it."""
    assert report.small_update_case(ratio)["delta_rel_err"] < 1e-3
