"""PEFT's vocabulary and serving conventions: `layers_to_transform`, `add_weighted_adapter`, mixed-adapter batches."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from tiny_models import batch, tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance
from cofitune_peft.architectures import dims_of
from cofitune_peft.checkpointing import lowest_trainable_layer


def trained_layers(pm) -> set[int]:
    names = {n for n, p in pm.named_parameters() if p.requires_grad}
    return {
        int(n.split(".layers.")[1].split(".")[0]) if ".layers." in n else int(n.split(".h.")[1].split(".")[0])
        for n in names
    }


def importance(model):
    dims = dims_of(model)
    return Importance(
        intermediate=torch.rand(dims.num_layers, dims.intermediate), output=torch.rand(dims.num_layers, dims.hidden)
    )


# ---------------------------------------------------------------------- layers_to_transform


def test_layers_to_transform_normalised():
    assert CoFiTuneConfig(layers_to_transform=[5, 1, 3, 3]).layers_to_transform == [1, 3, 5]
    assert CoFiTuneConfig(layers_to_transform=4).layers_to_transform == [4]
    assert CoFiTuneConfig(layers_to_transform=range(2, 4)).layers_to_transform == [2, 3]
    agree = CoFiTuneConfig(layers=(1, 3), layers_to_transform=[2, 1])
    assert agree.layers == (1, 3) and agree.layer_indices() == [1, 2]
    assert CoFiTuneConfig(layers=(1, 3)).layer_indices() == [1, 2] and CoFiTuneConfig().layer_indices() is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": (1, 3), "layers_to_transform": [1, 2, 3]}, r"name different layers"),
        ({"layers_to_transform": []}, r"non-empty list"),
        ({"layers_to_transform": [-1, 2]}, r"0 or more, got \[-1\]"),
        ({"layers_to_transform": "1,2"}, r"`layers_to_transform` must be"),
        ({"layers_to_transform": [1.0]}, r"`layers_to_transform` must be"),
        ({"layers_to_transform": True}, r"`layers_to_transform` must be"),
    ],
)
def test_layers_to_transform_bad_input(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        CoFiTuneConfig(**kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_layers_to_transform_trains_exactly_those_layers(arch):
    pm = get_peft_model(tiny_model(arch), CoFiTuneConfig(layers_to_transform=[1, 4, 6], target_modules="ffn+mha"))
    assert trained_layers(pm) == {1, 4, 6}
    assert pm.peft_config["default"].layers is None  # not a window
    assert lowest_trainable_layer(pm.base_model)[0] == 1


def test_contiguous_layers_to_transform_fills_the_window():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers_to_transform=[4, 3]))
    assert pm.peft_config["default"].layers == (3, 5) and trained_layers(pm) == {3, 4}


def test_layers_outside_the_model_are_named():
    base = tiny_model()
    with pytest.raises(CoFiTuneError, match=r"within \[0, 8\).*got \[8, 11\] outside"):
        get_peft_model(base, CoFiTuneConfig(layers_to_transform=[2, 8, 11]))
    assert not any("cofitune" in n for n, _ in base.named_modules())


def test_layers_to_transform_config_round_trips(tmp_path):
    config = CoFiTuneConfig(layers_to_transform=[1, 4, 6], target_modules=["up", "down"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1, 4, 6] and saved["layers"] is None
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CoFiTuneConfig) and loaded.layer_indices() == [1, 4, 6]


def test_non_contiguous_adapter_saves_and_loads(tmp_path):
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers_to_transform=[1, 4, 6], init_weights=False))
    x = batch()
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")
    assert loaded.peft_config["default"].layers_to_transform == [1, 4, 6]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


# ---------------------------------------------------------------------- add_weighted_adapter


def two_adapters(arch="llama"):
    """`default`: FFN of layers 1-2 with a soft mask; `b`: attention of layers 2 and 5, no mask."""
    base = tiny_model(arch)
    pm = get_peft_model(base, CoFiTuneConfig(layers=(1, 3), importance=importance(base), init_weights=False))
    pm.add_adapter("b", CoFiTuneConfig(layers_to_transform=[2, 5], target_modules="mha", init_weights=False))
    return pm.eval()


def logits_with_deltas(deltas: dict[str, torch.Tensor], x, arch="llama") -> torch.Tensor:
    """The base model's logits with `deltas` (module name -> weight change) added by hand."""
    base = tiny_model(arch)
    with torch.no_grad():
        for name, delta in deltas.items():
            base.get_submodule(name).weight += delta
        return base(x).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weighted_adapter_is_the_exact_weighted_sum(arch):
    pm = two_adapters(arch)
    w1, w2 = 0.7, -1.5
    pm.add_weighted_adapter(["default", "b"], [w1, w2], "mix")
    deltas = {}
    with torch.no_grad():
        for name, layer in pm.base_model.cofitune_layers():
            parts = [
                w * layer.get_delta_weight(a) for a, w in (("default", w1), ("b", w2)) if a in layer.cofitune_delta
            ]
            deltas[name] = sum(parts)
    x = batch()
    pm.set_adapter("mix")
    with torch.no_grad():
        got = pm(x).logits
    torch.testing.assert_close(got, logits_with_deltas(deltas, x, arch), rtol=1e-5, atol=1e-5)
    assert pm.peft_config["mix"].softmask_mode == "none"
    assert pm.peft_config["mix"].layers_to_transform == [1, 2, 5]


def test_task_arithmetic_equals_both_adapters_active():
    pm = two_adapters()
    pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "sum")
    x = batch()
    with torch.no_grad():
        pm.base_model.set_adapter(["default", "b"])
        both = pm(x).logits
        pm.base_model.set_adapter("sum")
        summed = pm(x).logits
    torch.testing.assert_close(summed, both, rtol=1e-5, atol=1e-5)


def test_weighted_adapter_keeps_trainability_and_is_frozen():
    pm = two_adapters().train()
    before = {n for n, p in pm.named_parameters() if p.requires_grad}
    pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    after = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert after == before and before and not any(".mix." in n for n in after)
    assert pm.active_adapters == ["default"]


def test_weighted_adapter_saves_and_loads(tmp_path):
    base = tiny_model()
    pm = get_peft_model(base, CoFiTuneConfig(layers=(1, 3), importance=importance(base), init_weights=False))
    pm.add_adapter("b", CoFiTuneConfig(layers=(2, 4), init_weights=False))
    pm.add_weighted_adapter(["default", "b"], [2.0, -0.5], "mix")
    pm.set_adapter("mix")
    x = batch()
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "mix")
    assert loaded.peft_config["default"].layers == (1, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((["default", "b"], [1.0, 1.0], "m"), {"combination_type": "svd"}, r"`combination_type` must be 'linear'"),
        ((["default", "nope"], [1.0, 1.0], "m"), {}, r"unknown adapters \['nope'\]; available: \['b', 'default'\]"),
        ((["default", "b"], [1.0], "m"), {}, r"one weight per adapter \(2\), got 1"),
        ((["default", "b"], [1.0, float("nan")], "m"), {}, r"`weights` must be finite"),
        ((["default", "default"], [1.0, 1.0], "m"), {}, r"distinct adapter names"),
        (([], [], "m"), {}, r"non-empty list"),
        ((["default", "b"], [1.0, 1.0], "b"), {}, r"`adapter_name` 'b' already exists"),
    ],
)
def test_weighted_adapter_bad_input(args, kwargs, match):
    pm = two_adapters()
    with pytest.raises(CoFiTuneError, match=match):
        pm.add_weighted_adapter(*args, **kwargs)
    assert set(pm.peft_config) == {"default", "b"}


def test_weighted_adapter_refuses_what_cannot_be_summed():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(1, 3), modules_to_save=["lm_head"]))
    pm.add_adapter("b", CoFiTuneConfig(layers=(1, 3)))
    with pytest.raises(CoFiTuneError, match=r"`modules_to_save`"):
        pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "m")
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(1, 3)))
    pm.add_adapter(
        "b",
        CoFiTuneConfig(
            layers=(1, 3),
            target_modules=["mlp.up_proj"],
            unit_map={"mlp.up_proj": "intermediate"},
            layers_pattern="layers",
        ),
    )
    with pytest.raises(CoFiTuneError, match=r"differ in `unit_map`"):
        pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "m")


# ---------------------------------------------------------------------- mixed-adapter batches


def pre_hook_count(pm) -> int:
    return sum(len(m._forward_pre_hooks) for m in pm.modules())


@pytest.mark.parametrize(
    "names, match",
    [
        (["default", "typo", "__base__"], r"unknown adapters \['typo'\]; available: \['b', 'default'\]"),
        ("default", r"must be a list with one adapter name"),
    ],
)
def test_adapter_names_validated(names, match):
    pm = two_adapters()
    hooks = pre_hook_count(pm)
    with pytest.raises(CoFiTuneError, match=match):
        pm(batch(size=3), adapter_names=names)
    assert pre_hook_count(pm) == hooks


def test_adapter_names_refused_in_training():
    pm = two_adapters().train()
    with pytest.raises(CoFiTuneError, match=r"training mode; call `model.eval\(\)`"):
        pm(batch(size=3), adapter_names=["default", "b", "__base__"])


def test_adapter_names_refused_while_merged():
    pm = two_adapters()
    pm.merge_adapter()
    with pytest.raises(CoFiTuneError, match=r"unmerge_adapter"):
        pm(batch(size=3), adapter_names=["default", "b", "__base__"])


def test_adapter_names_reach_every_layer_and_hooks_go_away():
    pm = two_adapters()
    tuner = pm.base_model
    hooks = pre_hook_count(pm)
    names = ["default", "b", "__base__"]
    seen = []

    def record(module, args, kwargs):  # runs after the tuner's hook; takes the names out again
        seen.append(kwargs.pop("adapter_names", None))
        return args, kwargs

    with tuner._enable_peft_forward_hooks(adapter_names=names):
        recorders = [layer.register_forward_pre_hook(record, with_kwargs=True) for _, layer in tuner.cofitune_layers()]
        with torch.no_grad():
            pm.get_base_model()(batch(size=3))
    for handle in recorders:
        handle.remove()
    assert len(seen) == len(tuner.cofitune_layers()) and all(s == names for s in seen)
    assert pre_hook_count(pm) == hooks


def test_mixed_batch_equals_each_adapter_alone():
    pm = two_adapters()
    x = batch(size=3)
    names = ["default", "b", "__base__"]
    with torch.no_grad():
        mixed = pm(x, adapter_names=names).logits
        alone = []
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    alone.append(pm(x[i : i + 1]).logits)
            else:
                pm.set_adapter(name)
                alone.append(pm(x[i : i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_mixed_batch_generate_equals_each_adapter_alone():
    pm = two_adapters()
    x = batch(size=3, length=6)
    names = ["b", "__base__", "default"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = pm.generate(input_ids=x, adapter_names=names, **kwargs)
        alone = []
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    alone.append(pm.generate(input_ids=x[i : i + 1], **kwargs))
            else:
                pm.set_adapter(name)
                alone.append(pm.generate(input_ids=x[i : i + 1], **kwargs))
    assert torch.equal(mixed, torch.cat(alone))


@pytest.mark.parametrize(
    "options",
    [{"num_beams": 2, "do_sample": False}, {"num_return_sequences": 2, "do_sample": True, "top_k": 1}],
    ids=["beams", "return_sequences"],
)
def test_mixed_batch_generate_repeats_names_for_each_copy(options):
    pm = two_adapters()
    x = batch(size=2, length=6)
    names = ["b", "default"]
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0, **options}
    with torch.no_grad():
        mixed = pm.generate(input_ids=x, adapter_names=names, **kwargs)
        alone = []
        for i, name in enumerate(names):
            pm.set_adapter(name)
            alone.append(pm.generate(input_ids=x[i : i + 1], **kwargs))
    assert torch.equal(mixed, torch.cat(alone))
