"""The mask's strength as a knob: `mask_budget="mean_one"`, the post-hoc `strength`, and the hard `top_fraction` mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from tiny_models import batch, tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance, set_importance
from cofitune_peft.model import convert_to_lora

L, D, INTER = 8, 32, 48
UP = "base_model.model.model.layers.2.mlp.up_proj"


def importance(seed: int = 0, heads: bool = False) -> Importance:
    g = torch.Generator().manual_seed(seed)
    parts = {"intermediate": torch.rand(L, INTER, generator=g), "output": torch.rand(L, D, generator=g)}
    if heads:
        parts["heads"] = torch.rand(L, 4, generator=g)
    return Importance(**parts)


def trained_scales(pm, raw: bool = False) -> torch.Tensor:
    """Every trained row's scale of the adapter, concatenated in module order."""
    out = []
    for _, layer in pm.base_model.cofitune_layers():
        rows = layer.cofitune_rows["default"] > 0
        out.append(layer.cofitune_scale["default"][rows])
    return torch.cat(out)


def effective(pm, key):
    layer = pm.get_submodule(key)
    return (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach().clone()


def run(pm, steps=20, lr=1e-3, optimizer="adamw"):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-12)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=lr)
    )
    pm.train()
    for step in range(steps):
        x = batch(step, size=4)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=batch(99) if x is None else x).logits


# ------------------------------------------------------------------------------------------------- mask_budget


@pytest.mark.parametrize("cap", [4.0, 1.5])
def test_mean_one_has_mean_one_keeps_the_order_and_respects_the_cap(cap):
    imp = importance()
    raw = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 5), target_modules="ffn", importance=imp))
    one = get_peft_model(
        tiny_model(),
        CoFiTuneConfig(layers=(2, 5), target_modules="ffn", importance=imp, mask_budget="mean_one", mask_cap=cap),
    )
    r, m = trained_scales(raw), trained_scales(one)
    assert float(r.mean()) < 0.9  # the raw mask spends less than the full step budget
    assert float(m.mean()) == pytest.approx(1.0, abs=1e-5)
    assert one.base_model.mask_statistics()["mask_mean_scale"] == pytest.approx(1.0, abs=1e-5)
    assert float(m.max()) <= cap + 1e-6
    # one factor for the whole adapter: m = min(c * r, cap), so the order of the rows is kept
    free = m < cap - 1e-6
    factor = m[free] / r[free]
    assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
    torch.testing.assert_close(m, (r * factor[0]).clamp_max(cap), rtol=1e-5, atol=1e-6)
    order = torch.sort(r, stable=True).indices
    assert bool((m[order].diff() >= -1e-7).all())
    if cap == 1.5:
        assert bool((m >= cap - 1e-6).any())  # the cap binds, the mean is still 1


def test_mean_one_keeps_frozen_rows_frozen_and_warns_when_the_budget_cannot_be_met():
    inter = torch.ones(L, INTER)
    inter[:, :4] = 0.0  # 4 of 48 units per layer may move
    imp = Importance(intermediate=inter, normalized=True)
    with pytest.warns(UserWarning, match="too few rows can move"):
        pm = get_peft_model(
            tiny_model(),
            CoFiTuneConfig(layers=(2, 4), target_modules=["up"], importance=imp, mask_budget="mean_one"),
        )
    scale = pm.get_submodule(UP).cofitune_scale["default"]
    assert torch.equal(scale[:4], torch.full((4,), 4.0)) and torch.equal(scale[4:], torch.zeros(INTER - 4))


def test_mean_one_without_importance_changes_nothing_and_set_importance_applies_it():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), mask_budget="mean_one"))
    assert torch.equal(trained_scales(pm), torch.ones_like(trained_scales(pm)))
    set_importance(pm, importance())
    assert float(trained_scales(pm).mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(trained_scales(pm).std()) > 0.1


def test_mean_one_under_adamw_a_row_moves_its_scale_times_as_far():
    """A row of scale s moves s times as far as the same row unmasked (scale 1), also when s > 1."""
    inter = torch.zeros(L, INTER)
    inter[2:4, :24] = 0.8  # half the units protected: the factor is about 1.67
    inter[2, 7] = 0.95
    imp = Importance(intermediate=inter, output=torch.zeros(L, D), normalized=True)
    free = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), target_modules=["up"]))
    cfg = CoFiTuneConfig(layers=(2, 4), target_modules=["up"], importance=imp, mask_budget="mean_one")
    pm = get_peft_model(tiny_model(), cfg)
    start = effective(free, UP)
    run(free)
    run(pm)
    scale = pm.get_submodule(UP).cofitune_scale["default"]
    assert float(scale[30]) > 1.5  # unprotected rows train faster than unmasked ones
    for unit in (7, 10, 30):
        ratio = (effective(pm, UP)[unit] - start[unit]).norm() / (effective(free, UP)[unit] - start[unit]).norm()
        assert float(ratio) == pytest.approx(float(scale[unit]), rel=0.10), unit


def test_a_mean_one_adapter_loads_its_scales_from_the_file(tmp_path):
    pm = get_peft_model(
        tiny_model(),
        CoFiTuneConfig(layers=(2, 4), importance=importance(), mask_budget="mean_one", init_weights=False),
    )
    expected = logits(pm)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(trained_scales(loaded), trained_scales(pm))
    torch.testing.assert_close(logits(loaded), expected)


# ------------------------------------------------------------------------------------------------------- strength


def hand_model(pm, strength: float):
    """The base model with every target weight replaced by W0 + strength * s * Delta, computed by hand."""
    ref = tiny_model()
    for name, layer in pm.base_model.cofitune_layers():
        delta = layer.cofitune_delta["default"].weight.detach()
        s = layer.cofitune_scale["default"] * layer.cofitune_rows["default"]
        s = s.unsqueeze(1) if layer.cofitune_axis["default"] == 0 else s.unsqueeze(0)
        target = ref.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(target.weight + strength * s * delta)
    return ref


@pytest.mark.parametrize("strength", [0.3, 1.7])
def test_strength_forward_delta_merge_mixed_batch_and_lora_export_are_exact(strength):
    cfg = CoFiTuneConfig(layers=(2, 4), target_modules="all", importance=importance(heads=True), strength=strength)
    cfg.init_weights = False
    pm = get_peft_model(tiny_model(), cfg)
    x = batch(3)
    expected = logits(hand_model(pm, strength), x)
    torch.testing.assert_close(logits(pm, x), expected, rtol=1e-5, atol=1e-5)
    layer = pm.get_submodule(UP)
    s = (layer.cofitune_scale["default"] * layer.cofitune_rows["default"]).unsqueeze(1)
    torch.testing.assert_close(
        layer.get_delta_weight("default"), strength * s * layer.cofitune_delta["default"].weight
    )
    base_logits = logits(tiny_model(), x)
    pm.eval()
    with torch.no_grad():
        mixed = pm(input_ids=x, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=1e-5, atol=1e-5)
    _, state = convert_to_lora(pm, rank=10_000)
    a = state[f"base_model.model.{UP.removeprefix('base_model.model.')}.lora_A.weight"]
    b = state[f"base_model.model.{UP.removeprefix('base_model.model.')}.lora_B.weight"]
    torch.testing.assert_close(b @ a, layer.get_delta_weight("default").detach(), rtol=1e-4, atol=1e-5)
    w0 = layer.get_base_layer().weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(logits(pm, x), expected, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, rtol=0, atol=1e-6)


def test_strength_zero_is_the_base_model():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=importance(), strength=0.0))
    run(pm, steps=3, lr=1e-2)
    assert pm.get_submodule(UP).cofitune_delta["default"].weight.abs().max() > 0  # it trained ...
    torch.testing.assert_close(logits(pm), logits(tiny_model()), rtol=0, atol=0)  # ... and changes nothing


def test_strength_scales_the_training_step():
    # one SGD step from a zero delta: the same gradient, the weight moves `strength` times as far
    moves = []
    for strength in (1.0, 0.5):
        pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=importance(), strength=strength))
        start = effective(pm, UP)
        run(pm, steps=1, lr=0.1, optimizer="sgd")
        moves.append(effective(pm, UP) - start)
    assert moves[0].abs().max() > 0
    torch.testing.assert_close(moves[1], 0.5 * moves[0], rtol=1e-5, atol=1e-8)


def test_set_strength_after_training_and_save_load_in_a_fresh_process(tmp_path):
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=importance()))
    run(pm, steps=5, lr=1e-2)
    trained = logits(pm)
    pm.set_strength(0.5)  # PeftModel forwards to CoFiTuneModel.set_strength
    assert pm.peft_config["default"].strength == 0.5
    half = logits(pm)
    torch.testing.assert_close(half, logits(hand_model(pm, 0.5)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(half, trained, atol=1e-4)
    pm.base_model.set_strength(0)
    torch.testing.assert_close(logits(pm), logits(tiny_model()), rtol=0, atol=0)
    pm.base_model.set_strength(1.0)
    torch.testing.assert_close(logits(pm), trained, rtol=0, atol=0)
    pm.base_model.set_strength(0.5)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["strength"] == 0.5
    torch.save({"input_ids": batch(99), "logits": half}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from peft import PeftModel
        import cofitune_peft
        from tiny_models import tiny_model
        model = PeftModel.from_pretrained(tiny_model(), {str(tmp_path / "adapter")!r})
        assert model.peft_config["default"].strength == 0.5
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            got = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(got, expected["logits"], rtol=1e-5, atol=1e-5)
        model.set_strength(0.0)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits,
                                       tiny_model()(input_ids=expected["input_ids"]).logits, rtol=0, atol=0)
        print("ok")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_set_strength_refuses_bad_input():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4)))
    with pytest.raises(CoFiTuneError, match="`strength` must be a finite number"):
        pm.set_strength(float("inf"))
    with pytest.raises(CoFiTuneError, match="`strength` must be a finite number"):
        pm.set_strength("0.5")
    with pytest.raises(CoFiTuneError, match="does not exist"):
        pm.set_strength(0.5, adapter_name="nope")
    pm.merge_adapter()
    with pytest.raises(CoFiTuneError, match="unmerge_adapter"):
        pm.set_strength(0.5)
    pm.unmerge_adapter()
    pm.set_strength(0.5)
    assert pm.get_submodule(UP).cofitune_strength["default"] == 0.5


# ---------------------------------------------------------------------------------------------------- top_fraction


def test_top_fraction_picks_exactly_the_top_units():
    imp = Importance(intermediate=torch.rand(4, 48), output=torch.rand(4, 32), heads=torch.rand(4, 4))
    hard = imp.top_fraction(0.1)
    for part, values in imp.parts().items():
        mask = getattr(hard, part)
        count = int(0.1 * values.shape[1] + 0.5)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum(dim=1).tolist() == [float(count)] * 4, part
        for layer in range(4):
            chosen = set(torch.nonzero(mask[layer]).flatten().tolist())
            assert chosen == set(torch.topk(values[layer], count).indices.tolist()), part
    assert hard.metadata["top_fraction"] == "0.1"
    assert float(imp.top_fraction(0).intermediate.sum()) == 0.0
    assert float(imp.top_fraction(1).intermediate.sum()) == 4 * 48
    # ties go to the lower index
    assert Importance(intermediate=torch.ones(1, 4), normalized=True).top_fraction(0.5).intermediate.tolist() == [
        [1.0, 1.0, 0.0, 0.0]
    ]
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(CoFiTuneError, match="`fraction` must be a number in"):
            imp.top_fraction(bad)


def test_top_fraction_in_update_mode_freezes_the_top_rows_and_trains_the_rest_at_full_rate():
    hard = importance().top_fraction(0.1)
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=hard))
    free = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4)))
    top = torch.nonzero(hard.intermediate[2]).flatten()
    rest = torch.nonzero(hard.intermediate[2] == 0).flatten()
    scale = pm.get_submodule(UP).cofitune_scale["default"]
    assert torch.equal(scale[top], torch.zeros(len(top))) and torch.equal(scale[rest], torch.ones(len(rest)))
    before = effective(pm, UP)
    run(pm, lr=1e-2)
    run(free, lr=1e-2)
    after = effective(pm, UP)
    assert len(top) == 5 and torch.equal(after[top], before[top])
    moved = (after[rest] - before[rest]).norm(dim=1)
    assert bool((moved > 0).all())
    free_moved = (effective(free, UP)[rest] - before[rest]).norm(dim=1)
    assert float((moved / free_moved).mean()) == pytest.approx(1.0, rel=0.15)


# ---------------------------------------------------------------------------------------------- config round-trip


def test_new_fields_round_trip_and_old_configs_get_the_defaults(tmp_path):
    cfg = CoFiTuneConfig(layers=(2, 4), mask_budget="mean_one", mask_cap=2, strength=-0.5)
    assert cfg.mask_cap == 2.0 and isinstance(cfg.mask_cap, float)
    cfg.save_pretrained(tmp_path)
    back = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, CoFiTuneConfig)
    assert (back.mask_budget, back.mask_cap, back.strength) == ("mean_one", 2.0, -0.5)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("mask_budget", "mask_cap", "strength"):
        saved.pop(key)
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    old = PeftConfig.from_pretrained(tmp_path)
    assert (old.mask_budget, old.mask_cap, old.strength) == ("raw", 4.0, 1.0)


def test_bad_values_are_refused_all_at_once():
    with pytest.raises(CoFiTuneError) as err:
        CoFiTuneConfig(mask_budget="mean", mask_cap=0.5, strength=float("nan"))
    message = str(err.value)
    assert "`mask_budget` must be one of ('raw', 'mean_one'), got 'mean'" in message
    assert "`mask_cap` must be a finite number >= 1" in message and "got 0.5" in message
    assert "`strength` must be a finite number" in message and "got nan" in message
    for kwargs in ({"mask_cap": float("inf")}, {"mask_cap": True}, {"mask_cap": "4"}):
        with pytest.raises(CoFiTuneError, match="`mask_cap`"):
            CoFiTuneConfig(**kwargs)
    for value in (float("inf"), True, "1", None):
        with pytest.raises(CoFiTuneError, match="`strength`"):
            CoFiTuneConfig(strength=value)


# ------------------------------------------------------------------------------------ the comparison's new methods

GENERAL = [
    "The river runs through the old town and past the mill.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "A library keeps books, maps and old newspapers for readers.",
    "Mountains rise to the north of the valley, snow on the peaks.",
]


def test_mask_variant_methods_build_what_they_say(tmp_path):
    from tiny_models import tiny_tokenizer

    from cofitune_peft import estimate_importance
    from cofitune_peft.kit.compare import DEFAULT_LEARNING_RATES, METHODS, MethodSettings

    tok = tiny_tokenizer()
    shared = estimate_importance(tiny_model(num_layers=4), GENERAL, tokenizer=tok, num_samples=3, progress=False)
    settings = MethodSettings(
        tokenizer=tok, general_texts=GENERAL, importance=shared, cache_dir=str(tmp_path), importance_kwargs={}
    )
    names = ("cofitune_mask_mean1", "cofitune_onesided", "cofitune_fisher", "cofitune_hard")
    for name in names:
        assert METHODS[name].needs_importance and METHODS[name].family == "cofitune"
        assert len(DEFAULT_LEARNING_RATES[name]) == 3
    built = {name: METHODS[name].build(tiny_model(num_layers=4), settings) for name in names}
    assert built["cofitune_mask_mean1"].base_model.mask_statistics()["mask_mean_scale"] == pytest.approx(1, abs=1e-5)
    for name in ("cofitune_onesided", "cofitune_fisher"):
        own = built[name].base_model.get_importance()
        assert own is not shared and own.metadata["num_samples"] == "3"  # the shared estimate's settings
    assert built["cofitune_onesided"].base_model.get_importance().metadata["normalization"] == "one_sided"
    assert built["cofitune_fisher"].base_model.get_importance().metadata["signal"] == "fisher"
    assert len(list(tmp_path.glob("importance-cofitune_onesided-*.safetensors"))) == 1  # cached for the next lr
    again = METHODS["cofitune_onesided"].build(tiny_model(num_layers=4), settings).base_model.get_importance()
    torch.testing.assert_close(again.intermediate, built["cofitune_onesided"].base_model.get_importance().intermediate)
    hard = built["cofitune_hard"].base_model.get_importance()
    assert torch.equal(hard.intermediate, shared.top_fraction(0.1).intermediate)
    with pytest.raises(CoFiTuneError, match="needs `general_texts` and a `tokenizer`"):
        METHODS["cofitune_fisher"].build(tiny_model(num_layers=4), MethodSettings(importance=shared))
