"""The PEFT method itself: selection, freezing, identity at init, save/load/merge, multiple adapters, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import ARCHS, batch, tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, CoFiTuneLayer, Importance

HERE = os.path.dirname(__file__)


def trained(pm, steps=3, lr=1e-2, seed=0):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pm.train()
    for step in range(steps):
        x = batch(seed + step)
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    return pm


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_and_only_window_trains(arch):
    base = tiny_model(arch)
    x = batch()
    with torch.no_grad():
        ref = base(x).logits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, CoFiTuneConfig(layers=(2, 5), target_modules="ffn+mha"))
    with torch.no_grad():
        assert torch.equal(pm(x).logits, ref)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("cofitune_delta" in n for n in trainable)
    layers = {int(n.split(".")[n.split(".").index("layers" if ".layers." in n else "h") + 1]) for n in trainable}
    assert layers == {2, 3, 4}
    trained(pm)
    with torch.no_grad():
        assert not torch.allclose(pm(x).logits, ref)
        with pm.disable_adapter():
            assert torch.equal(pm(x).logits, ref)
    # the base weights themselves never change
    after = pm.get_base_model().state_dict()
    for key, value in before.items():
        wrapped = key.rsplit(".", 1)
        candidates = [key, f"{wrapped[0]}.base_layer.{wrapped[1]}"]
        match = next(after[k] for k in candidates if k in after)
        assert torch.equal(match, value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged(arch):
    pm = get_peft_model(tiny_model(arch), CoFiTuneConfig(layers=(1, 4), target_modules="all", init_weights=False))
    x = batch(1)
    with torch.no_grad():
        unmerged = pm(x).logits
        merged_model = pm.merge_and_unload()
        assert not any(isinstance(m, CoFiTuneLayer) for m in merged_model.modules())
        assert torch.allclose(merged_model(x).logits, unmerged, atol=1e-5)


def test_merge_unmerge_roundtrip():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(init_weights=False))
    x = batch()
    with torch.no_grad():
        ref = pm(x).logits
        pm.merge_adapter()
        assert torch.allclose(pm(x).logits, ref, atol=1e-5)
        pm.unmerge_adapter()
        assert torch.allclose(pm(x).logits, ref, atol=1e-6)


def test_default_window_is_quarter_to_half():
    pm = get_peft_model(tiny_model(num_layers=30), CoFiTuneConfig())
    assert pm.peft_config["default"].layers == (7, 15)
    names = {n for n, m in pm.named_modules() if isinstance(m, CoFiTuneLayer)}
    assert names == {
        f"base_model.model.model.layers.{i}.mlp.{p}" for i in range(7, 15) for p in ("up_proj", "down_proj")
    }


def test_roles_and_module_names_select_the_same():
    by_role = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(0, 2), target_modules=["up", "down"]))
    by_name = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(0, 2), target_modules=["up_proj", "mlp.down_proj"]))
    names = lambda pm: sorted(n for n, m in pm.named_modules() if isinstance(m, CoFiTuneLayer))  # noqa: E731
    assert names(by_role) == names(by_name)


def save_base(tmp_path, arch="llama"):
    base = tiny_model(arch)
    path = tmp_path / "base"
    base.save_pretrained(path)
    return path


def fresh_logits(script: str, out: str) -> torch.Tensor:
    code = f"import sys; sys.path.insert(0, {HERE!r})\n" + textwrap.dedent(script)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return torch.load(out)


def test_save_load_fresh_process_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    base_path = save_base(tmp_path)
    imp = Importance(intermediate=torch.rand(8, 48), output=torch.rand(8, 32))
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), CoFiTuneConfig(layers=(2, 6), importance=imp))
    trained(pm)
    x = batch(5)
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(".cofitune_delta." in k or k.endswith(".cofitune_scale") for k in tensors)
    assert len(tensors) == 4 * 2 * 2  # 4 layers x (up, down) x (delta, scale)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "COFITUNE" and config["layers"] == [2, 6] and config["importance"] is None
    assert "in-memory Importance" in config["importance_source"]

    out = str(tmp_path / "logits.pt")
    script = f"""
        import torch, cofitune_peft
        from peft import PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        from tiny_models import batch
        x = batch(5)
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_path)!r}), {str(tmp_path / "adapter")!r})
        auto = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})
        with torch.no_grad():
            a, b = pm(x).logits, auto(x).logits
            merged = pm.merge_and_unload()(x).logits
        torch.save(torch.stack([a, b, merged]), {out!r})
    """
    logits = fresh_logits(script, out)
    assert torch.equal(logits[0], ref)
    assert torch.equal(logits[1], ref)
    assert torch.allclose(logits[2], ref, atol=1e-5)


def test_transformers_load_adapter_path(tmp_path):
    from transformers import AutoModelForCausalLM

    base_path = save_base(tmp_path)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), CoFiTuneConfig(init_weights=False))
    x = batch()
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(base_path)
    model.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_save_dtype_bfloat16_halves_file(tmp_path):
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(init_weights=False, save_dtype="bfloat16"))
    pm.save_pretrained(tmp_path / "bf16")
    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {v.dtype for k, v in tensors.items() if "cofitune_delta" in k} == {torch.bfloat16}
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "bf16")
    delta = next(p for n, p in loaded.named_parameters() if "cofitune_delta" in n)
    assert delta.dtype == torch.float32


def test_model_card_says_cofitune(tmp_path):
    from transformers import AutoModelForCausalLM

    base_path = save_base(tmp_path)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), CoFiTuneConfig(layers=(3, 5)))
    pm.save_pretrained(tmp_path / "adapter")
    pm.save_pretrained(tmp_path / "adapter")  # a second save replaces the section, not appends
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.count("cofitune-peft: begin") == 1 and card.count("## What it was trained for") == 1
    assert "decoder layers 3..4" in card and "`ffn`" in card
    header = card.split("---")[1]
    assert "cofitune" in header  # a tag in the YAML header
    # a local folder without a Hub id: no `base_model`, and its path is no tag (tests/test_hub.py has the rest)
    assert "base_model" not in header and str(base_path) not in card


def test_auto_peft_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base_path = save_base(tmp_path, "qwen2")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), CoFiTuneConfig(init_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    x = batch()
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(auto(x).logits, pm(x).logits)


def test_multiple_adapters():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(0, 2), init_weights=False))
    pm.add_adapter("second", CoFiTuneConfig(layers=(1, 3), target_modules="mha", init_weights=False))
    x = batch()
    with torch.no_grad():
        first = pm(x).logits
        pm.set_adapter("second")
        second = pm(x).logits
    assert not torch.allclose(first, second)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    pm.set_adapter("default")
    pm.delete_adapter("second")
    assert "second" not in pm.peft_config
    assert not any("second" in n for n, _ in pm.named_parameters())
    with torch.no_grad():
        assert torch.equal(pm(x).logits, first)


def test_adapter_for_other_shapes_is_refused(tmp_path):
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(0, 2)))
    pm.save_pretrained(tmp_path / "adapter")
    other = tiny_model(intermediate_size=64)
    with pytest.raises(CoFiTuneError, match="other dimensions"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


def test_adapter_with_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(0, 2)))
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "layers.0." not in k}, path)
    with pytest.raises(CoFiTuneError, match="lack"):
        PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": (3, 3)}, "non-empty window"),
        ({"layers": (5, 2)}, "non-empty window"),
        ({"layers": (-1, 2)}, "start at 0"),
        ({"layers": (1, 2, 3)}, "pair of ints"),
        ({"layers": (1.0, 2)}, "pair of ints"),
        ({"parts": "mlp"}, "shorthands"),
        ({"parts": []}, "non-empty list"),
        ({"target_modules": []}, "non-empty list"),
        ({"softmask_mode": "grad"}, "softmask_mode"),
        ({"unit_map": {"fc": "neuron"}}, "unit_map"),
        ({"save_dtype": "int8"}, "save_dtype"),
        ({"importance": 3}, "importance"),
    ],
)
def test_config_refuses_bad_values(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        CoFiTuneConfig(**kwargs)


def test_config_collects_every_problem():
    with pytest.raises(CoFiTuneError) as err:
        CoFiTuneConfig(layers=(4, 2), softmask_mode="x", save_dtype="y")
    assert "layers" in str(err.value) and "softmask_mode" in str(err.value) and "save_dtype" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": (6, 9)}, r"within \[0, 8\)"),
        ({"target_modules": ["fc_in"]}, "matched no module"),
        ({"importance": Importance(intermediate=torch.rand(8, 50))}, "shape"),
        ({"importance": Importance(intermediate=torch.rand(4, 48))}, "shape"),
        ({"importance": "/nonexistent/importance.safetensors"}, "no file"),
    ],
)
def test_model_refuses_bad_values(kwargs, match):
    base = tiny_model()
    before = {n for n, _ in base.named_modules()}
    with pytest.raises(CoFiTuneError, match=match):
        get_peft_model(base, CoFiTuneConfig(**kwargs))
    assert {n for n, _ in base.named_modules()} == before  # nothing was replaced half-way


def test_layouts_are_read_from_the_model_not_its_model_type():
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(
        MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    )
    pm = get_peft_model(moe, CoFiTuneConfig(layers=(0, 2)))
    assert any("experts" in n for n, p in pm.named_parameters() if p.requires_grad)
    model = tiny_model()
    model.config.model_type = "mystery"  # a renamed Llama is still read as one
    names = {n for n, m in get_peft_model(model, CoFiTuneConfig()).named_modules() if isinstance(m, CoFiTuneLayer)}
    assert names and all(n.endswith(("mlp.up_proj", "mlp.down_proj")) for n in names)


def test_unit_map_for_custom_architecture():
    model = tiny_model()
    model.config.model_type = "mystery"
    cfg = CoFiTuneConfig(
        layers=(0, 2),
        target_modules=["mlp.up_proj", "mlp.down_proj"],
        unit_map={"mlp.up_proj": "intermediate", "mlp.down_proj": "output"},
        importance=Importance(intermediate=torch.ones(8, 48), output=torch.zeros(8, 32), normalized=True),
    )
    pm = get_peft_model(model, cfg)
    up = pm.base_model.model.model.layers[0].mlp.up_proj
    assert torch.equal(up.cofitune_scale["default"], torch.zeros(48))


def test_importance_of_nan_is_refused():
    with pytest.raises(CoFiTuneError, match="NaN"):
        Importance(heads=torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(CoFiTuneError, match=r"\[0, 1\]"):
        Importance(heads=torch.tensor([[0.1, 2.0]]), normalized=True)
