"""Replays sd-scripts' train_network.py / sdxl_train_network.py / gen_img.py calls with their real argument forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

import dora_network
from dora_network import create_network, create_network_from_weights
from tiny_fixtures import batch, frozen_tiny_sdxl, loss_of, unet_output

# what `--network_args "conv_dim=4" "conv_alpha=2" "use_tucker=False"` becomes, plus the injected dropout
NET_KWARGS = {"conv_dim": "4", "conv_alpha": "2", "use_tucker": "False", "dropout": None}


def train_steps(network, model, steps: int, *, accumulate: int = 1, seed: int = 0, te_lr=None, max_norm=None):
    """sd-scripts' loop: prepare params -> optimizer -> prepare_grad_etc -> on_epoch_start -> steps with clip."""
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, 1e-3, 1e-3)
    assert len(groups) == len(descriptions)
    optimizer = torch.optim.AdamW(groups)
    network.prepare_grad_etc(model.text_encoders, model.unet)
    network.on_epoch_start(model.text_encoders, model.unet)
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            network.on_step_start(model.text_encoders, model.unet)
            loss = loss_of(model, batch(seed + step * accumulate + micro)) / accumulate
            loss.backward()
            losses.append(float(loss.detach()) * accumulate)
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if max_norm is not None:
            keys, mean, top = network.apply_max_norm_regularization(max_norm, "cpu")
            assert isinstance(keys, int) and isinstance(mean, float) and isinstance(top, float)
    return losses, optimizer


@pytest.fixture()
def model():
    return frozen_tiny_sdxl()


def test_full_training_sequence_save_and_resume(model, tmp_path):
    network = create_network(1.0, None, 1, None, model.text_encoders, model.unet, neuron_dropout=None, **NET_KWARGS)
    assert network.args.rank == 4 and network.args.alpha == 1.0  # network_dim=None -> 4; alpha int 1
    assert hasattr(network, "set_multiplier")
    network.apply_to(model.text_encoders, model.unet, True, True)
    network.enable_gradient_checkpointing()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    losses, _ = train_steps(network, model, 3, accumulate=2, te_lr=[5e-4, 2e-4])
    assert all(math.isfinite(x) for x in losses)
    changed = [k for k, v in network.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("lora_up.weight") for k in changed) and any(k.endswith("dora_scale") for k in changed)
    assert not any(k.endswith("alpha") for k in changed)

    network.eval()
    reference = unet_output(model, batch(99)).detach()
    file = tmp_path / "dora.safetensors"
    metadata = {"ss_network_module": "dora_network", "ss_network_dim": "None", "ss_network_alpha": "1",
                "ss_network_args": '{"conv_dim": "4", "dropout": null}', "ss_base_model_version": "sdxl_base_v1-0"}
    network.save_weights(str(file), None, dict(metadata))
    with safe_open(str(file), "pt") as handle:
        saved_meta = handle.metadata()
        saved = {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in metadata.items():
        assert saved_meta[key] == value
    assert saved_meta["dora_network.wd_on_out"] == "False" and saved_meta["dora_network.algo"] == "dora"
    for key, tensor in network.state_dict().items():
        assert torch.equal(saved[key], tensor), key  # bit for bit

    # --network_weights: a fresh model and network, apply_to, then load_weights
    fresh = frozen_tiny_sdxl()
    resumed = create_network(1.0, None, 1, None, fresh.text_encoders, fresh.unet, neuron_dropout=None, **NET_KWARGS)
    resumed.apply_to(fresh.text_encoders, fresh.unet, True, True)
    info = resumed.load_weights(str(file))
    assert not info.missing_keys and not info.unexpected_keys
    resumed.eval()
    torch.testing.assert_close(unet_output(fresh, batch(99)), reference, rtol=0, atol=0)

    # --dim_from_weights: create_network_from_weights(1, file, vae, te, unet, **net_kwargs), then load_weights too
    again = frozen_tiny_sdxl()
    built, weights_sd = create_network_from_weights(1, str(file), None, again.text_encoders, again.unet, **NET_KWARGS)
    assert set(weights_sd) == set(saved)
    built.apply_to(again.text_encoders, again.unet, True, True)
    built.load_weights(str(file))
    built.eval()
    torch.testing.assert_close(unet_output(again, batch(99)), reference, rtol=0, atol=0)


def test_resume_restores_training_state_exactly(model, tmp_path):
    """Train 2 steps, save, resume into a fresh model: the next step gives the same weights as uninterrupted."""
    network = create_network(1.0, 4, 2.0, None, model.text_encoders, model.unet, **NET_KWARGS)
    network.apply_to(model.text_encoders, model.unet)
    train_steps(network, model, 2)
    file = tmp_path / "a.safetensors"
    network.save_weights(str(file), torch.float32, {})
    fresh = frozen_tiny_sdxl()
    resumed = create_network(1.0, 4, 2.0, None, fresh.text_encoders, fresh.unet, **NET_KWARGS)
    resumed.apply_to(fresh.text_encoders, fresh.unet)
    resumed.load_weights(str(file))
    for key, value in network.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_prepare_optimizer_params_forms(model):
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet, loraplus_lr_ratio="16")
    network.apply_to(model.text_encoders, model.unet)
    plain = network.prepare_optimizer_params(1e-4, 1e-3, 1e-2)
    assert type(plain) is list and plain and type(plain[0]) is dict
    assert all(p.requires_grad for g in plain for p in g["params"])
    assert {g["lr"] for g in plain} == {1e-4, 1e-4 * 16, 1e-3, 1e-3 * 16}
    two_args = network.prepare_optimizer_params(None, None)  # sd-scripts' TypeError fallback form
    assert type(two_args) is list and all("lr" not in g for g in two_args)
    groups, names = network.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], None, 3e-3)
    assert names == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-5, 1.6e-4, 2e-5, 3.2e-4, 3e-3, 3e-3 * 16]
    all_params = {id(p) for p in network.parameters()}
    assert {id(p) for g in groups for p in g["params"]} == all_params
    old_toml = network.prepare_optimizer_params_with_multiple_te_lrs(5e-5, None, 3e-3)[0]  # float from old TOML
    assert old_toml[0]["lr"] == 5e-5


def test_train_unet_only_and_text_encoder_only(model):
    unet_only = create_network(1.0, 4, 1, None, model.text_encoders, model.unet)
    unet_only.apply_to(model.text_encoders, model.unet, False, True)
    assert not unet_only.text_encoder_loras and all(k.startswith("lora_unet_") for k in unet_only.state_dict())
    unet_only.restore()
    te_only = create_network(1.0, 4, 1, None, model.text_encoders, model.unet)
    te_only.apply_to(model.text_encoders, model.unet, True, False)
    assert not te_only.unet_loras and all(k.startswith("lora_te") for k in te_only.state_dict())
    groups = te_only.prepare_optimizer_params(None, None, 1e-3)
    assert groups


def test_base_modules_are_never_registered(model):
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet, conv_dim="4")
    network.apply_to(model.text_encoders, model.unet)
    base_params = {id(p) for m in [model.unet, *model.text_encoders] for p in m.parameters()}
    assert not base_params & {id(p) for p in network.parameters()}
    assert not base_params & {id(b) for b in network.buffers()}
    suffixes = {k.split(".", 1)[1] for k in network.state_dict()}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    network.to(torch.float16)  # --full_fp16: only adapters are cast
    assert next(model.unet.parameters()).dtype == torch.float32


def test_base_weights_merge_before_training(model, tmp_path):
    """--base_weights: create_network_from_weights(mult, file, vae, te, unet, for_inference=True) + merge_to."""
    donor = create_network(1.0, 4, 2, None, model.text_encoders, model.unet, conv_dim="4", conv_alpha="2")
    with torch.no_grad():
        for p in donor.parameters():
            if p.ndim > 1:
                p.add_(torch.randn_like(p) * 0.05)
    donor.apply_to(model.text_encoders, model.unet)
    file = tmp_path / "base.safetensors"
    donor.save_weights(str(file), None, {})
    donor.set_multiplier(0.5)
    donor.eval()
    expected = unet_output(model, batch(3)).detach()

    target = frozen_tiny_sdxl()
    merger, weights_sd = create_network_from_weights(0.5, str(file), None, target.text_encoders, target.unet,
                                                     for_inference=True)
    merger.merge_to(target.text_encoders, target.unet, weights_sd, torch.float32, "cpu")
    torch.testing.assert_close(unet_output(target, batch(3)), expected, rtol=1e-4, atol=1e-5)
    # then a new network trains on top of the merged base, its magnitudes taken from the merged weights
    network = create_network(1.0, 4, 1, None, target.text_encoders, target.unet)
    network.apply_to(target.text_encoders, target.unet)
    losses, _ = train_steps(network, target, 2)
    assert all(math.isfinite(x) for x in losses)


def test_gen_img_flow_wrapper_unet_two_arg_apply_and_multiplier(model, tmp_path):
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.normal_(std=0.05)
    file = tmp_path / "g.safetensors"
    network.save_weights(str(file), torch.float16, {})

    class InferWrapper:  # sd-scripts' InferSdxlUNet2DConditionModel: not an nn.Module, delegates
        def __init__(self, delegate):
            self.delegate = delegate

    gen_model = frozen_tiny_sdxl()
    net, weights_sd = create_network_from_weights(0.8, str(file), None, gen_model.text_encoders,
                                                  InferWrapper(gen_model.unet), for_inference=True)
    assert net.is_mergeable()
    net.apply_to(gen_model.text_encoders, InferWrapper(gen_model.unet))  # two arguments
    info = net.load_state_dict(weights_sd, False)
    assert not info.missing_keys and not info.unexpected_keys
    net.to(memory_format=torch.channels_last)
    net.to(torch.float32).to("cpu")
    base = frozen_tiny_sdxl()
    net.set_multiplier(0.0)
    torch.testing.assert_close(unet_output(gen_model, batch(1)), unet_output(base, batch(1)), rtol=0, atol=0)
    net.set_multiplier(1.0)
    full = unet_output(gen_model, batch(1)).detach()
    assert not torch.allclose(full, unet_output(base, batch(1)))
    # --network_pre_calc: backup, restore, pre_calculation per batch gives the same output, then restores exactly
    originals = {k: v.clone() for k, v in gen_model.unet.state_dict().items()}
    net.backup_weights()
    net.restore_weights()
    net.pre_calculation()
    torch.testing.assert_close(unet_output(gen_model, batch(1)), full, rtol=1e-4, atol=1e-5)
    net.restore_weights()
    assert all(torch.equal(v, originals[k]) for k, v in gen_model.unet.state_dict().items())
    torch.testing.assert_close(unet_output(gen_model, batch(1)), full, rtol=0, atol=0)


def test_scale_weight_norms_caps_delta(model):
    network = create_network(1.0, 4, 4, None, model.text_encoders, model.unet)
    network.apply_to(model.text_encoders, model.unet)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.normal_(std=1.0)
    keys, mean, top = network.apply_max_norm_regularization(0.5, "cpu")
    assert keys == len(network.loras) and top == pytest.approx(0.5, rel=1e-5) and mean <= top
    assert max(float(m.delta_weight().detach().norm()) for m in network.loras) == pytest.approx(0.5, rel=1e-4)


def test_norm_logging_hooks(model):
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet)
    network.apply_to(model.text_encoders, model.unet)
    train_steps(network, model, 1)
    network.update_norms()
    assert network.weight_norms().shape == (len(network.loras),)
    assert network.combined_weight_norms().mean().item() > 0
    assert network.grad_norms() is None  # grads were cleared by zero_grad(set_to_none=True)


def test_import_is_light_and_side_effect_free():
    import subprocess
    import sys

    code = ("import sys, logging; import dora_network; "
            "heavy = [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not heavy, heavy; assert not logging.getLogger().handlers; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    assert dora_network.__all__ and callable(dora_network.create_network)


def test_network_deepcopy_free_forward_is_repeatable_under_checkpointing(model):
    """Reentrant checkpointing runs adapter forwards twice: no state may change between the runs."""
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet, conv_dim="4")
    network.apply_to(model.text_encoders, model.unet)
    model.unet.enable_gradient_checkpointing()
    network.enable_gradient_checkpointing()
    model.unet.train()
    network.prepare_grad_etc(model.text_encoders, model.unet)
    loss = loss_of(model, batch(0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    assert grads
    model.unet.disable_gradient_checkpointing()
    network.zero_grad()
    loss_of(model, batch(0)).backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(network.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)
    _ = copy  # copy imported for future deepcopy checks
