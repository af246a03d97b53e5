"""The evidence run's pieces at a tiny size: pretrain a few steps, fine-tune every method, analyse two checkpoints.

Invariants, not outcomes: every method starts from the same base, a rank-r LoRA/DoRA never changes the base weights,
dM/dD equal a float64 recomputation here, the held-out sets are fixed across methods, the base is cached.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dora_network.evidence import Plan, Settings, run_evidence
from dora_network.evidence.analysis import analyse
from dora_network.evidence.data import BASE_COLORS, BASE_SHAPES, CONCEPT_COLORS, CONCEPT_SHAPES, encode, eval_set
from dora_network.evidence.train import eval_loss, finetune, pretrained_base, query_layers
from dora_network.tiny import build_tiny_sdxl, load_tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = Settings(resolution=64, batch_size=2, pretrain_steps=3, finetune_steps=4, checkpoints=2, base_count=6,
                concept_count=6, eval_count=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = load_tiny_config()
    config["image"]["resolution"], config["image"]["latent_size"] = 64, 8
    model = build_tiny_sdxl(config, seed=0)
    for part in (model.unet, model.vae, *model.text_encoders):
        part.requires_grad_(False).eval()
    data = {
        "base": encode(model, TINY.base_count, 0, BASE_SHAPES, BASE_COLORS, 64),
        "concept": encode(model, TINY.concept_count, 2, CONCEPT_SHAPES, CONCEPT_COLORS, 64),
        "base_eval": eval_set(encode(model, TINY.eval_count, 1, BASE_SHAPES, BASE_COLORS, 64), seed=11),
        "concept_eval": eval_set(encode(model, TINY.eval_count, 3, CONCEPT_SHAPES, CONCEPT_COLORS, 64), seed=13),
    }
    random_unet = {k: v.clone() for k, v in model.unet.state_dict().items()}
    info = pretrained_base(model, data["base"], TINY, tmp_path_factory.mktemp("cache"))
    base = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    return model, data, base, random_unet, info


def test_concept_never_appears_in_the_base_domain(setup):
    _, data, _, _, _ = setup
    for caption in data["base"].captions:
        assert not any(word in caption for word in ("triangle", "diamond", "yellow", "cyan")), caption
    assert all(any(s in c for s in CONCEPT_SHAPES) for c in data["concept"].captions)


def test_pretraining_trains_every_unet_weight_and_is_cached(setup, tmp_path):
    model, data, base, random_unet, info = setup
    assert not info["cached"] and len(info["losses"]) == TINY.pretrain_steps
    changed = [k for k, v in base.items() if v.is_floating_point() and not torch.equal(v, random_unet[k])]
    assert len(changed) > 0.9 * len([v for v in base.values() if v.is_floating_point()])
    model.unet.load_state_dict(random_unet)
    again = pretrained_base(model, data["base"], TINY, info["file"].rsplit("/", 1)[0])
    assert again["cached"] and again["losses"] == info["losses"]
    assert all(torch.equal(v, base[k]) for k, v in model.unet.state_dict().items())


@pytest.mark.parametrize("method", ["ft", "lora", "dora_in", "dora_out"])
def test_every_method_starts_from_the_base_and_adapters_leave_it_alone(setup, method):
    model, data, base, _, _ = setup
    result = finetune(model, base, method, None if method == "ft" else 2, 0, data["concept"], data["concept_eval"],
                      data["base_eval"], TINY)
    start = result.snapshots[0]
    for name, layer in query_layers(model).items():
        w0 = base[f"{name}.weight"]
        # LoRA/FT start exactly at W0; DoRA's W' = m V / (||V|| + eps) with m = ||W0||, V = W0: within eps
        torch.testing.assert_close(start[name], w0, rtol=1e-6, atol=1e-7)
    assert sorted(result.snapshots) == [0, 2, 4]
    assert math.isfinite(result.concept_loss) and math.isfinite(result.base_loss)
    if method != "ft":
        assert result.base_unchanged is True
        assert any(not torch.equal(result.snapshots[4][n], start[n]) for n in start)  # the adapters did learn
    assert all(torch.equal(v, base[k]) for k, v in model.unet.state_dict().items())  # the model is back at base


def test_decomposition_matches_a_float64_recomputation(setup):
    model, data, base, _, _ = setup
    result = finetune(model, base, "dora_in", 2, 1, data["concept"], data["concept_eval"], data["base_eval"], TINY)
    w0 = {n: base[f"{n}.weight"] for n in query_layers(model)}
    analysis = analyse(w0, result.snapshots)
    assert len(analysis.points) == 2 * len(w0)  # two checkpoints, step 0 left out
    for point in analysis.points:
        a, b = result.snapshots[point.step][point.layer].double(), w0[point.layer].double()
        norm_a, norm_b = a.norm(dim=0), b.norm(dim=0)  # the paper's columns: one per input feature
        d_m = (norm_a - norm_b).abs().mean()
        d_d = (1 - (a * b).sum(0) / (norm_a * norm_b)).mean()
        assert point.dM == pytest.approx(float(d_m), rel=1e-9, abs=1e-15)
        assert point.dD == pytest.approx(float(d_d), rel=1e-9, abs=1e-15)


def test_held_out_loss_is_a_function_of_the_weights(setup):
    model, data, base, _, _ = setup
    model.unet.load_state_dict(base)
    assert eval_loss(model, data["concept_eval"]) == eval_loss(model, data["concept_eval"])
    assert data["concept_eval"].digest() == eval_set(data["concept_eval"].data, seed=13).digest()


def test_run_writes_table_figure_and_json(tmp_path):
    plan = Plan(ranks=(2,), seeds=(0,), analysis_rank=2, settings=TINY)
    result = run_evidence(plan, tmp_path / "out", tmp_path / "cache", progress=False)
    saved = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert {(r["method"], r["rank"]) for r in saved["rows"]} == {("ft", None), ("lora", 2), ("dora_in", 2),
                                                                  ("dora_out", 2)}
    assert all(r["base_unchanged"] for r in saved["rows"] if r["method"] != "ft")
    assert (tmp_path / "out" / "evidence_fig2.png").stat().st_size > 0
    assert "| FT | full |" in (tmp_path / "out" / "evidence_table.md").read_text()
    again = run_evidence(plan, tmp_path / "out2", tmp_path / "cache", progress=False)
    assert again["base"]["cached"] and again["eval_set_digests"] == result["eval_set_digests"]
    assert [r["concept_loss"] for r in again["rows"]] == [r["concept_loss"] for r in result["rows"]]  # deterministic


def test_vs_lora_is_the_same_seed_difference():
    from dora_network.evidence.run import _summarize, render_table

    rows = [{"method": m, "rank": r, "seed": sd, "concept_loss": loss, "forgetting": 0.0, "slope": 1.0,
             "correlation": 0.5, "trainable": 10}
            for m, r, sd, loss in [("ft", None, 0, 0.5), ("ft", None, 1, 0.4), ("lora", 2, 0, 0.30),
                                   ("lora", 2, 1, 0.10), ("dora_in", 2, 0, 0.29), ("dora_in", 2, 1, 0.07)]]
    summary = {(e["method"], e["rank"]): e for e in _summarize(rows, None)}
    assert summary[("dora_in", 2)]["vs_lora"] == pytest.approx(-0.02)  # mean of -0.01 and -0.03
    # the spread of the per-seed differences (0.014), not the seeds' own spread (0.16)
    assert summary[("dora_in", 2)]["vs_lora_sd"] == pytest.approx(math.sqrt(2) * 0.01)
    assert math.isnan(summary[("lora", 2)]["vs_lora"]) and math.isnan(summary[("ft", None)]["vs_lora"])
    table = render_table({"plan": {"seeds": [0, 1], "settings": {"finetune_steps": 4}},
                          "before_finetune": {"concept": 0.6, "base": 0.5}, "rows": rows,
                          "summary": _summarize(rows, None)})
    assert "| -2000.00 ± 1414.21 |" in table
