"""scripts/real_trainers/compare.py against a stand-in harness (the real one needs sd-scripts, which CI lacks): the
runs alternate per round, dora_network is imported from this checkout, the harness's s/it and peak-RSS lines are
parsed, medians and their ratio printed, and the two module sets compared."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "real_trainers" / "compare.py")
compare = importlib.util.module_from_spec(spec)
sys.modules["compare"] = compare
spec.loader.exec_module(compare)

FAKE = """#!/usr/bin/env bash
# stand-in for the harness's run_train.sh: prints what the real one prints, in its format
trainer=$1; module=$2; shift 2
echo "$module ${SDSCRIPTS_PYTHONPATH:-none} $SDSCRIPTS_DIM $SDSCRIPTS_ALPHA $*" >> "$LOG"
n=$(wc -l < "$LOG")
case "$module" in
  dora_network) s=$((10 + n % 2)) ;;
  *) s=10 ;;
esac
mkdir -p "$SDSCRIPTS_OUT"
printf 'lora_unet_a.lora_down.weight\\t[4, 8]\\nlora_unet_b.alpha\\t[]\\n' > "$SDSCRIPTS_OUT/keys.txt"
[ "$module" = dora_network ] && printf 'lora_unet_c.alpha\\t[]\\n' >> "$SDSCRIPTS_OUT/keys.txt"
echo "run_train.sh: train loop 00:30, ${s}.00s/it" >&2
echo "run_train.sh: Maximum resident set size (kbytes): $((1048576 * 2))"
"""


def test_parse_output_reads_seconds_per_step_and_peak_rss():
    assert compare.parse_output("run_train.sh: train loop 01:05, 21.70s/it\n"
                                "run_train.sh: \tMaximum resident set size (kbytes): 2097152") == (21.7, 2.0)
    assert compare.parse_output("run_dit_train.sh: train loop 00:02, 2.50it/s") == (0.4, None)
    with pytest.raises(ValueError, match="no 'train loop"):
        compare.parse_output("Traceback ...")


def test_alternated_runs_medians_and_module_sets(tmp_path, monkeypatch, capsys):
    harness = tmp_path / "harness"
    harness.mkdir()
    script = harness / "run_train.sh"
    script.write_text(FAKE)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("LOG", str(log))
    assert compare.main(["--family", "sdxl", "--harness", str(harness), "--dims", "16:8", "--rounds", "3",
                         "--ours-args", "wd_on_out=True"]) == 0
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["networks.lora", "dora_network", "dora_network", "networks.lora",
                                             "networks.lora", "dora_network"]
    assert all(c.split()[1] == str(ROOT) for c in calls if c.startswith("dora_network"))
    assert all(c.split()[1] == "none" for c in calls if c.startswith("networks.lora"))
    assert all(c.split()[2:4] == ["16", "8"] for c in calls)
    assert all(c.endswith("wd_on_out=True") for c in calls if c.startswith("dora_network"))
    row = capsys.readouterr().out.splitlines()[-1]
    # ours: 10 (2nd call), 11 (3rd), 10 (6th) -> median 10; theirs 10 -> ratio 1.000
    assert row.startswith("| 16 / 8 | 10.00 | 10.00 | **1.000x** | 1.000, 1.100, 1.000 | 2.00 / 2.00 GiB (1.000x)")
    assert row.endswith("| 3 / 2, same: no: 1 only ours, 0 only theirs |")
