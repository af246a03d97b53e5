"""The smoke trainer end to end: it trains, saves, passes every self-check, writes its report, and runs data-parallel.

One shortened run (in-process, through ``dora_network.smoke.main``) is shared by the end-to-end tests; the settings
and data tests need no training. The distributed test launches two CPU processes with accelerate (gloo).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dora_network import smoke
from dora_network.io import load_file
from dora_network.smoke.config import DEFAULT_CONFIG, SmokeSettings, load_settings, read_toml
from dora_network.smoke.data import load_image_folder, synthetic_examples
from dora_network.smoke.report import state_digest

REPO = Path(__file__).resolve().parents[1]

# Shortened run: at the default lr the moving average falls by well over half within 40 steps (seeds 0-3 measured).
SHORT_STEPS = 40
SHORT_WINDOW = 10


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    """(exit status, output folder, what the run printed)."""
    out = tmp_path_factory.mktemp("smoke")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = smoke.main(["--max_train_steps", str(SHORT_STEPS), "--loss_window", str(SHORT_WINDOW),
                           "--output_dir", str(out), "--output_name", "tiny_dora"])
    return code, out, printed.getvalue()


@pytest.mark.slow
def test_smoke_train_passes_every_self_check(smoke_run):
    code, out, printed = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, summary["checks"]
    assert summary["passed"] is True
    assert {name: check["status"] for name, check in summary["checks"].items()} == {
        "trained": "pass", "reload": "pass", "merge": "pass", "loss": "pass",
        "diffusers": "skip" if _loader_missing() else "pass",
    }
    assert summary["checks"]["trained"]["untrained"] == 0 and summary["checks"]["trained"]["exempt"] == 6
    for name in ("trained", "reload", "merge", "loss"):
        assert re.search(rf"^check {name} +PASS  .*\d", printed, re.MULTILINE), printed
    assert printed.rstrip().endswith("smoke train OK")
    assert summary["checks"]["reload"]["relative_diff"] <= 1e-5
    assert summary["checks"]["merge"]["relative_diff"] <= 1e-5
    loss = summary["checks"]["loss"]
    assert loss["last_moving_average"] < loss["first_moving_average"] * (1 - loss["required_drop"])


def _loader_missing() -> bool:
    try:
        import dora_network.integrations.diffusers_loader  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.slow
def test_smoke_train_writes_file_plot_and_summary(smoke_run):
    _, out, _ = smoke_run
    file = out / "tiny_dora.safetensors"
    assert file.is_file() and (out / "loss.png").stat().st_size > 1000
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == SHORT_STEPS and summary["settings"]["max_train_steps"] == SHORT_STEPS
    assert summary["file"] == str(file.resolve())
    assert summary["it_per_s"] > 0 and summary["train_seconds"] > 0
    assert summary["last_moving_average_loss"] < summary["first_moving_average_loss"]
    assert summary["network_kwargs"] == {"conv_dim": "4", "conv_alpha": "4", "dropout": None}
    assert summary["weights_sha256"] == state_digest(load_file(file)[0])  # saved in float32: bit-identical


@pytest.mark.slow
def test_smoke_file_has_lycoris_keys_and_sd_scripts_metadata(smoke_run):
    _, out, _ = smoke_run
    tensors, metadata = load_file(out / "tiny_dora.safetensors")
    modules = {key.split(".", 1)[0] for key in tensors}
    suffixes = {key.split(".", 1)[1] for key in tensors}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    assert len(tensors) == 4 * len(modules)  # every module: down, up, alpha, dora_scale
    # tiny model, conv_dim=4: 259 UNet Linear + 11 1x1 + 38 kxk convs, 12 + 12 text-encoder layers
    assert len(modules) == 332
    assert sum(m.startswith("lora_unet_") for m in modules) == 308
    assert sum(m.startswith("lora_te1_text_model_") for m in modules) == 12
    assert sum(m.startswith("lora_te2_text_model_") for m in modules) == 12
    assert all(t.dtype == torch.float32 for t in tensors.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["key_counts"]["keys"] == len(tensors) and summary["key_counts"]["modules"] == 332
    assert metadata["ss_network_module"] == "dora_network"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4", "dropout": None}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_steps"] == str(SHORT_STEPS) and metadata["ss_output_name"] == "tiny_dora"
    assert float(metadata["ss_training_started_at"]) > 1.6e9 and metadata["ss_learning_rate"] == "0.003"
    assert re.fullmatch(r"[0-9a-f]{64}", metadata["sshs_model_hash"])
    assert metadata["dora_network.algo"] == "dora"


def test_readme_quotes_the_smoke_command():
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing"
    assert smoke.SMOKE_COMMAND in readme.read_text(encoding="utf-8")
    assert (REPO / "scripts" / "smoke_train.sh").is_file()


def test_config_file_spells_out_the_defaults():
    assert DEFAULT_CONFIG is not None and DEFAULT_CONFIG.name == "smoke.toml"
    from_file = read_toml(DEFAULT_CONFIG)
    defaults = asdict(SmokeSettings())
    assert from_file == {key: value for key, value in defaults.items() if key != "unet_lr"}
    assert defaults["unet_lr"] is None  # TOML cannot say None; the file leaves it out


def test_command_line_overrides_the_config_file(tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text('[training]\nmax_train_steps = 7\nlearning_rate = 1\n[network]\nnetwork_args = ["conv_dim=2"]\n')
    settings = load_settings(["--config_file", str(config.with_suffix("")), "--network_dim", "8",
                              "--network_args", "wd_on_out=True", "rank_dropout=0.1", "--algo", "lora",
                              "--gradient_checkpointing", "--text_encoder_lr", "1e-4", "2e-4"])
    assert settings.max_train_steps == 7 and settings.learning_rate == 1.0  # from the file (int read as float)
    assert settings.network_dim == 8 and settings.gradient_checkpointing is True
    assert settings.text_encoder_lr == [1e-4, 2e-4]
    assert settings.num_images == SmokeSettings().num_images  # omitted from the file: the default
    assert settings.network_kwargs() == {"wd_on_out": "True", "rank_dropout": "0.1", "algo": "lora", "dropout": None}


@pytest.mark.parametrize("text, message", [
    ("max_train_step = 3\n", "unknown setting 'max_train_step'.*Did you mean 'max_train_steps'"),
    ("network_dim = 'eight'\n", "'network_dim' = 'eight' must be of type int"),
    ("network_args = 'conv_dim=4'\n", "'network_args' = 'conv_dim=4' must be of type list"),
])
def test_bad_config_file_is_refused(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_settings(["--config_file", str(config)])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="resolution=100 must be a positive multiple of 32"):
        load_settings(["--resolution", "100"])
    with pytest.raises(ValueError, match="'conv_dim' is not key=value"):
        load_settings(["--network_args", "conv_dim"]).network_kwargs()
    assert smoke.main(["--resolution", "100"]) == 2  # a clear message and exit status 2, no traceback


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and smoke.SMOKE_COMMAND in text and "--network_args" in text
    assert "rank_digests" not in text  # hidden


def test_synthetic_data_is_deterministic_and_captioned():
    first, again, other = (synthetic_examples(6, 64, s) for s in (3, 3, 4))
    assert all(torch.equal(a.image, b.image) and a.caption == b.caption for a, b in zip(first, again))
    assert any(not torch.equal(a.image, b.image) for a, b in zip(first, other))
    for example in first:
        assert example.image.shape == (3, 64, 64) and example.image.min() >= -1 and example.image.max() <= 1
        fg, shape, bg = re.fullmatch(r"a (\w+) (\w+) on a (\w+) background", example.caption).groups()
        assert fg != bg and len(torch.unique(example.image.reshape(3, -1), dim=1).T) == 2  # shape + background


def test_image_folder_is_read_kohya_style(tmp_path):
    from PIL import Image

    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a red square\n")
    sub = tmp_path / "3_sks dog"
    sub.mkdir()
    Image.new("RGB", (32, 64), (0, 0, 255)).save(sub / "tall.jpg")
    examples = load_image_folder(tmp_path, 32)
    assert [e.caption for e in examples] == ["a red square"] + ["sks dog"] * 3
    assert all(e.image.shape == (3, 32, 32) for e in examples)
    assert torch.allclose(examples[0].image[0], torch.ones(32, 32)) and examples[0].image[1].max() == -1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        load_image_folder(empty, 32)


@pytest.mark.slow
def test_accelerate_launch_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",  # no user accelerate config
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               "-m", "dora_network.smoke", "--max_train_steps", "4", "--num_images", "4", "--train_batch_size", "2",
               "--output_dir", str(out), "--rank_digests", "--skip_checks", "loss", "diffusers"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    digests = [json.loads((out / f"rank{rank}_digest.json").read_text()) for rank in range(2)]
    assert digests[0]["sha256"] == digests[1]["sha256"]
    assert digests[0]["steps"] == digests[1]["steps"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["passed"] is True
    assert summary["weights_sha256"] == digests[0]["sha256"]
    assert state_digest(load_file(out / "smoke_dora.safetensors")[0]) == digests[0]["sha256"]
    assert summary["checks"]["reload"]["status"] == "pass" and summary["checks"]["merge"]["status"] == "pass"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
