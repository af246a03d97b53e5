"""Precision of dora_network across the dtypes sd-scripts uses, against a float64 reference.

Prints two tables:
1. the dtype matrix: base weight dtype x adapter dtype, max relative error of the layer output (fp32 input, or
   autocast for half precision) and of the merged weight;
2. the small-update test of reference/lycoris-dora.md §0.9: a bf16 base, ||s B A|| / ||W0|| from 4e-4 to 4e-2,
   relative error of the DoRA weight delta W' - W0 as our merge forms it (LyCORIS 4.1.3 loses 93/37/3.8 %).

Usage: python scripts/precision_report.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from dora_network import DoRAModule
from dora_network import functional as DF

BASE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


def reference_weight(w0: torch.Tensor, up: torch.Tensor, down: torch.Tensor, m: torch.Tensor, scale: float,
                     wd_on_out: bool) -> torch.Tensor:
    w0 = w0.double()
    return DF.dora_weight(w0, scale * up.double() @ down.double(), m.double(), wd_on_out)


def layer_case(base_dtype: torch.dtype, adapter_dtype: torch.dtype, wd_on_out: bool, seed: int = 0) -> dict:
    """One cell: a 256x256 Linear adapted at rank 8, trained-looking tensors, output and merge errors."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(256, 256, bias=False).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(256, 256, generator=gen) * 0.05)
    module = DoRAModule("x", base, 8, 4.0, wd_on_out=wd_on_out)
    with torch.no_grad():
        module.lora_up.weight.copy_(torch.randn(256, 8, generator=gen) * 0.01)
        module.dora_scale.mul_(1 + 0.05 * torch.rand(module.dora_scale.shape, generator=gen))
    base.weight.data = base.weight.data.to(base_dtype)  # cast after the network is built, as --fp8_base does
    module.to(adapter_dtype)
    module.apply_to()
    module.eval()
    x = torch.randn(64, 256, generator=gen)
    ref_w = reference_weight(base.weight.float(), module.lora_up.weight.float(), module.lora_down.weight.float(),
                             module.dora_scale.float(), module.scale, wd_on_out)
    ref_w = ref_w.detach()
    ref_y = x.double() @ ref_w.T
    compute = torch.float32 if base_dtype in (torch.float32,) and adapter_dtype == torch.float32 else torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute != torch.float32):
        y = base(x if compute == torch.float32 else x)
    merged = module.merged_weight().double()
    delta_ref = ref_w - base.weight.double()
    return {
        "base": str(base_dtype).replace("torch.", ""), "adapter": str(adapter_dtype).replace("torch.", ""),
        "axis": "out" if wd_on_out else "in", "compute": str(compute).replace("torch.", ""),
        "output_rel_err": float((y.double() - ref_y).norm() / ref_y.norm()),
        "merge_delta_rel_err": float((merged - base.weight.double() - delta_ref).norm() / delta_ref.norm()),
        "finite": bool(torch.isfinite(y).all()),
    }


def small_update_case(ratio: float, seed: int = 0) -> dict:
    """bf16 base 1024x1024, rank 16, ||sBA||/||W0|| = ratio: error of W' - W0 from our merge (fp32 math)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(1024, 1024, generator=gen) * 0.02).to(torch.bfloat16)
    up, down = torch.randn(1024, 16, generator=gen), torch.randn(16, 1024, generator=gen)
    delta = up @ down
    up = up * (ratio * w0.float().norm() / delta.norm())
    base = nn.Linear(1024, 1024, bias=False).requires_grad_(False)
    base.weight.data = w0.clone()
    module = DoRAModule("x", base, 16, 16.0, wd_on_out=True)
    with torch.no_grad():
        module.lora_up.weight.copy_(up)
        module.lora_down.weight.copy_(down)
    ref = reference_weight(w0.float(), up, down, module.dora_scale.detach(), 1.0, True) - w0.double()
    ours = module.merged_weight().double() - w0.double()
    return {"ratio": ratio, "delta_rel_err": float((ours - ref).norm() / ref.norm())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cells = [layer_case(b, a, axis) for b in BASE_DTYPES for a in (torch.float32, torch.bfloat16)
             for axis in (False, True)]
    print("| base | adapter | axis | compute | output rel. err | merged delta rel. err | finite |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['base']} | {c['adapter']} | {c['axis']} | {c['compute']} | {c['output_rel_err']:.2e} | "
              f"{c['merge_delta_rel_err']:.2e} | {c['finite']} |")
    small = [small_update_case(r) for r in (4e-4, 4e-3, 4e-2)]
    print("\n| ||sBA||/||W0|| (bf16 base) | rel. err of W' - W0, ours | LyCORIS 4.1.3 (reference) |")
    print("|---|---|---|")
    for s, lyco in zip(small, ("0.93", "0.37", "0.038")):
        print(f"| {s['ratio']:.0e} | {s['delta_rel_err']:.1e} | {lyco} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"matrix": cells, "small_update": small}, handle, indent=1)


if __name__ == "__main__":
    main()
