"""Smoke test of scripts/benchmark.py: it runs end to end and writes finite numbers (no timing asserts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = ["none", "ours_lora", "ours_dora_in"]

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("lycoris")  # bench_methods preloads it in the forkserver


@pytest.mark.slow
def test_benchmark_quick_step(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--methods", ",".join(METHODS),
           "--sections", "step", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ours_dora_in |" in proc.stdout  # the markdown table was printed

    data = json.loads(out.read_text())
    rows = {row["method"]: row for row in data["step"]["rows"]}
    assert sorted(rows) == sorted(METHODS)
    assert data["problems"] == []
    for method, row in rows.items():
        assert "error" not in row, (method, row)
        assert (row["latent"], row["rank"], row["gc"]) == (32, 16, False)
        for key in ("cpu_ms", "fwd_ms", "bwd_ms", "peak_rss_mb", "saved_mb", "loss", "x_ours_lora", "x_none"):
            assert math.isfinite(row[key]) and row[key] >= 0, (method, key, row[key])
        assert row["cpu_ms"] > 0 and row["peak_rss_mb"] > 0
    assert rows["none"]["trainable"] == 0
    assert rows["ours_lora"]["trainable"] > 0
    assert rows["ours_dora_in"]["trainable"] > rows["ours_lora"]["trainable"]  # + one magnitude per column
    assert rows["ours_lora"]["n_layers"] == rows["ours_dora_in"]["n_layers"] > 0
    assert rows["ours_lora"]["layers_hash"] == rows["ours_dora_in"]["layers_hash"]
    assert rows["ours_lora"]["x_ours_lora"] == pytest.approx(1.0)


@pytest.mark.slow
def test_benchmark_trainer_section_replays_the_sd_scripts_loop(tmp_path: Path) -> None:
    """--quick runs the trainer section's loop on the small UNet (the full-size run is a development tool)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--sections", "trainer", "--steps", "1",
           "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "DORA_BENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["trainer"]["rows"]
    assert {(r["method"], r["max_norm"]) for r in rows} == {
        (m, n) for m in ("ours_lora", "ours_dora_in", "ours_dora_out") for n in (None, 1.0)}
    for row in rows:
        assert "error" not in row, row
        assert row["conv"] and row["n_layers"] == rows[0]["n_layers"] > 0  # conv_dim: resnets adapted too
        for key in ("step_ms", "fwd_ms", "bwd_ms", "hooks_ms", "opt_ms", "logs_ms", "peak_rss_mb", "x_lora_step_ms"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["method"], key, row[key])
    assert list((tmp_path / "cache").glob("unet_bench_sdxl_*.safetensors"))  # built once, then read by each process
