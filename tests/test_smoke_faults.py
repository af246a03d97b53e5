"""Training faults in the smoke train: a diverging run stops with a clear message and keeps its last good save, and a
run resumed from a saved state repeats the uninterrupted run bit for bit on CPU.

Every run here is a real, shortened smoke train (in-process, ``dora_network.smoke.main``). Divergence comes from a
learning rate of 1e10 (a real blow-up) or from the hidden ``--fault`` flag, which makes one chosen step's loss or one
adapter weight NaN so the test can place the fault between two saves.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from dora_network import smoke
from dora_network.io import load_file
from dora_network.loading import nonfinite_modules
from dora_network.smoke.config import load_settings
from dora_network.smoke.report import state_digest
from dora_network.smoke.state import load_state, state_path, step_file_name

pytestmark = pytest.mark.slow

QUICK = ["--skip_checks", "loss", "diffusers", "--loss_window", "2"]


def _run(out: Path, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one in-process smoke run writing to ``out``."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = smoke.main(["--output_dir", str(out), *QUICK, *args])
    return code, stdout.getvalue(), stderr.getvalue()


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _file_digest(path: Path) -> str:
    return state_digest(load_file(path)[0])


def _no_temp_files(folder: Path) -> bool:
    return not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("extra", [
    pytest.param([], id="default"),
    # dropouts draw random numbers every step, checkpointing recomputes, fp16 files are lossy: none of it may matter
    pytest.param(["--network_args", "conv_dim=4", "conv_alpha=4", "rank_dropout=0.2", "module_dropout=0.2",
                  "dropout=0.1", "--gradient_checkpointing", "--save_precision", "fp16"], id="dropouts-gc-fp16"),
])
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, extra):
    whole, first, resumed = tmp_path / "whole", tmp_path / "first", tmp_path / "resumed"
    code, printed, _ = _run(whole, "--max_train_steps", "6", *extra)
    assert code == 0, printed
    code, printed, _ = _run(first, "--max_train_steps", "6", "--save_every_n_steps", "3", *extra)
    assert code == 0, printed
    saved = first / step_file_name("smoke_dora", 3)
    assert saved.is_file() and state_path(saved).is_file()
    assert load_state(saved).step == 3
    # --resume takes the state, or the network file it sits beside
    code, printed, _ = _run(resumed, "--max_train_steps", "6", "--resume", str(saved), *extra)
    assert code == 0, printed
    assert "resumed at step 3" in printed
    assert _summary(resumed)["resumed_from_step"] == 3
    assert _summary(resumed)["losses"] == _summary(whole)["losses"] == _summary(first)["losses"]
    assert _summary(resumed)["weights_sha256"] == _summary(whole)["weights_sha256"] == _summary(first)["weights_sha256"]
    assert _file_digest(resumed / "smoke_dora.safetensors") == _file_digest(whole / "smoke_dora.safetensors")
    # the final state continues too: train on from the end of a finished run
    code, printed, _ = _run(tmp_path / "more", "--max_train_steps", "7", "--resume", str(whole / "smoke_dora.safetensors"),
                            *extra)
    assert code == 0 and _summary(tmp_path / "more")["losses"][:6] == _summary(whole)["losses"], printed


def test_nan_loss_stops_the_run_and_keeps_the_last_good_save(tmp_path):
    code, printed, error = _run(tmp_path, "--max_train_steps", "8", "--save_every_n_steps", "2", "--fault", "nan_loss@5")
    assert code == 3, printed + error
    last_good = tmp_path / step_file_name("smoke_dora", 4)
    assert "training diverged at step 5: the loss is nan" in error
    assert f"The last good save is {last_good}" in error and f"--resume {state_path(last_good)}" in error
    assert "lower --learning_rate" in error
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([step_file_name("smoke_dora", 2), step_file_name("smoke_dora", 4),
                            state_path(step_file_name("smoke_dora", 2)).name,
                            state_path(step_file_name("smoke_dora", 4)).name])  # no final file, nothing half-written
    tensors, metadata = load_file(last_good)
    assert not nonfinite_modules(tensors) and metadata["ss_steps"] == "4"
    # the kept state resumes with a lower rate, as the message suggests (rates may change; model and data may not)
    code, printed, _ = _run(tmp_path / "resumed", "--max_train_steps", "8", "--resume", str(state_path(last_good)),
                            "--learning_rate", "1e-3")
    assert code == 0, printed
    summary = _summary(tmp_path / "resumed")
    assert summary["resumed_from_step"] == 4 and len(summary["losses"]) == 8
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    assert load_file(tmp_path / "resumed" / "smoke_dora.safetensors")[1]["ss_steps"] == "8"


def test_nan_weight_after_an_optimizer_step_stops_the_run(tmp_path):
    code, printed, error = _run(tmp_path, "--max_train_steps", "6", "--save_every_n_steps", "2",
                                "--fault", "nan_weight@3")
    assert code == 3, printed + error
    assert "training diverged at step 3: an adapter weight became NaN/Inf in the optimizer step" in error
    assert f"The last good save is {tmp_path / step_file_name('smoke_dora', 2)}" in error
    assert not (tmp_path / "smoke_dora.safetensors").exists() and _no_temp_files(tmp_path)


def test_a_real_divergence_is_caught_and_every_kept_save_is_finite(tmp_path):
    code, printed, error = _run(tmp_path, "--max_train_steps", "6", "--save_every_n_steps", "1",
                                "--learning_rate", "1e10", "--max_grad_norm", "0")
    assert code == 3, printed + error
    assert "training diverged at step" in error and "turn on --max_grad_norm 1.0" in error
    saves = sorted(tmp_path.glob("smoke_dora-step*[0-9].safetensors"))
    assert saves, error  # lr 1e10 survives step 1 and blows up at step 2 (measured)
    for path in saves:
        assert not nonfinite_modules(load_file(path)[0])
    assert f"The last good save is {saves[-1]}" in error
    assert not (tmp_path / "smoke_dora.safetensors").exists() and _no_temp_files(tmp_path)


def test_resume_refuses_a_state_that_does_not_fit(tmp_path):
    code, printed, _ = _run(tmp_path / "a", "--max_train_steps", "4", "--save_every_n_steps", "2")
    assert code == 0, printed
    state = state_path(tmp_path / "a" / step_file_name("smoke_dora", 2))
    code, _, error = _run(tmp_path / "b", "--max_train_steps", "4", "--resume", str(state), "--network_dim", "8")
    assert code == 2 and "differs in network_dim=4 (now 8)" in error, error
    code, _, error = _run(tmp_path / "b", "--max_train_steps", "4", "--resume",
                          str(tmp_path / "a" / "smoke_dora-state.safetensors"))
    assert code == 2 and "already did 4 steps; set --max_train_steps above 4" in error, error
    code, _, error = _run(tmp_path / "b", "--resume", str(tmp_path / "nowhere.safetensors"))
    assert code == 2 and "no resume state" in error and "--save_every_n_steps" in error, error
    plain = tmp_path / "plain-state.safetensors"
    plain.write_bytes((tmp_path / "a" / "smoke_dora.safetensors").read_bytes())  # a network file, not a state
    code, _, error = _run(tmp_path / "b", "--resume", str(plain))
    assert code == 2 and "is not a dora_network smoke resume state" in error, error
    assert not (tmp_path / "b" / "smoke_dora.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--save_every_n_steps", "-1"], "save_every_n_steps=-1 must be >= 0"),
    (["--fault", "nan@3"], "fault='nan@3' must be nan_loss@N or nan_weight@N"),
])
def test_bad_fault_settings_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        load_settings(args)
