"""Serving: CoFiTune -> stock LoRA (exact at full rank, loadable without cofitune_peft), merged model, fidelity."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance
from cofitune_peft.architectures import dims_of
from cofitune_peft.kit.cli import main
from cofitune_peft.kit.export_command import export_lora, fidelity, file_sizes
from cofitune_peft.model import convert_to_lora
from cofitune_peft.serving import lora_factors

pytestmark = pytest.mark.filterwarnings("ignore:the importance has no values")
TEXTS = ["The capital of France is Paris.", "2 + 2 = 4", "def add(a, b): return a + b", "Hello, world!"]


def adapted(arch="llama", **config):
    """A CoFiTune model with random deltas and a random soft mask."""
    base = tiny_model(arch)
    dims = dims_of(base)
    imp = Importance(
        intermediate=torch.rand(dims.num_layers, dims.intermediate), output=torch.rand(dims.num_layers, dims.hidden)
    )
    config = {"layers": (1, 4), "target_modules": "ffn+mha", "importance": imp, "init_weights": False, **config}
    return get_peft_model(base, CoFiTuneConfig(**config)).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_full_rank_lora_reproduces_the_adapter(arch, tmp_path):
    pm = adapted(arch)
    x = batch()
    config = export_lora(pm, tmp_path / "lora", rank=1000)
    assert config.peft_type == "LORA" and config.r == 32 and config.lora_alpha == config.r
    assert sorted(os.listdir(tmp_path / "lora")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    lora = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(lora, x), logits(pm, x), rtol=1e-4, atol=1e-4)
    assert len(lora.base_model.targeted_module_names) == len(pm.base_model.cofitune_layers())


def test_lora_factors_are_the_truncated_svd():
    pm = adapted()
    _, layer = pm.base_model.cofitune_layers()[0]
    delta = layer.get_delta_weight("default")
    a, b, r = lora_factors(layer, "default", 4)
    assert r == 4 and a.shape == (4, delta.shape[1]) and b.shape == (delta.shape[0], 4)
    s = torch.linalg.svdvals(delta)
    # Eckart-Young: the error of the best rank-4 approximation is the norm of the dropped singular values
    torch.testing.assert_close(torch.linalg.norm(delta - b @ a), s[4:].norm(), rtol=1e-4, atol=1e-5)
    _, _, r_energy = lora_factors(layer, "default", 0.5)
    energy = (s**2).cumsum(0) / (s**2).sum()
    assert energy[r_energy - 1] >= 0.5 and (r_energy == 1 or energy[r_energy - 2] < 0.5)


def test_energy_threshold_gives_per_module_ranks(tmp_path):
    pm = adapted()
    config = export_lora(pm, tmp_path / "lora", rank=0.6)
    ranks = {name: config.rank_pattern.get(name, config.r) for name in config.target_modules}
    assert len(ranks) == len(pm.base_model.cofitune_layers()) and all(1 <= r < 32 for r in ranks.values())
    assert config.alpha_pattern == config.rank_pattern
    lora = PeftModel.from_pretrained(tiny_model(), tmp_path / "lora")
    assert all(lora.get_submodule(f"base_model.model.{n}").r["default"] == r for n, r in ranks.items())


def test_every_layer_supports_conversion():
    pm = adapted()
    assert all(layer.supports_lora_conversion("default") for _, layer in pm.base_model.cofitune_layers())


def test_peft_convert_to_lora_accepts_cofitune_layers():
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert_to_lora

    pm = adapted(target_modules=["mlp.up_proj", "mlp.down_proj"])
    _, expected = convert_to_lora(pm, 8)
    _, got = peft_convert_to_lora(pm, rank=8)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize(
    "rank, match",
    [(0, r"`rank` must be"), (1.5, r"`rank` must be"), (True, r"`rank` must be"), ("8", r"`rank` must be")],
)
def test_convert_to_lora_bad_rank(rank, match):
    with pytest.raises(CoFiTuneError, match=match):
        convert_to_lora(adapted(), rank)


def test_convert_to_lora_refuses_what_lora_cannot_hold():
    with pytest.raises(CoFiTuneError, match=r"`adapter_name` 'nope' does not exist"):
        convert_to_lora(adapted(), 4, adapter_name="nope")
    with pytest.raises(CoFiTuneError, match=r"`modules_to_save`.*--to merged"):
        convert_to_lora(adapted(modules_to_save=["lm_head"]), 4)
    with pytest.raises(CoFiTuneError, match=r"no CoFiTune adapter"):
        convert_to_lora(tiny_model(), 4)


# ---------------------------------------------------------------------- the CLI


@pytest.fixture
def saved(tmp_path):
    """A base model folder (with a tokenizer) and a trained CoFiTune adapter folder; the adapter's logits."""
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    pm = adapted()
    pm.save_pretrained(tmp_path / "adapter")
    x = batch(3)
    torch.save(x, tmp_path / "x.pt")
    return tmp_path, x, logits(pm, x)


def test_export_lora_loads_without_cofitune_peft(saved):
    tmp_path, _, expected = saved
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from an earlier export")
    argv = ["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--to", "lora", "--rank", "64"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tmp_path / "base")
    script = f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "out")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "lora.pt")!r})
        assert not [m for m in sys.modules if m.startswith("cofitune_peft")], "cofitune_peft was imported"
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, env=env, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), expected, rtol=1e-4, atol=1e-4)


def test_export_merged_is_a_full_model_with_the_tokenizer(saved):
    tmp_path, x, expected = saved
    argv = ["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--to", "merged"]
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 0
    files = os.listdir(tmp_path / "merged")
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("cofitune" in n or "lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, x), expected, rtol=1e-4, atol=1e-4)


def test_export_checks_fidelity_on_texts(saved, caplog):
    tmp_path, _, _ = saved
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    argv = ["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--to", "lora", "--rank", "2"]
    with caplog.at_level("INFO"):
        assert main([*argv, "--out", str(tmp_path / "out"), "--check-texts", str(tmp_path / "texts.txt")]) == 0
    assert "top-1 agreement" in caplog.text and "KL mean" in caplog.text


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--to", "lora"], r"`--rank` is required"),
        (["--to", "merged", "--rank", "4"], r"`--rank` applies to `--to lora` only"),
        (["--to", "lora", "--rank", "4", "--check-texts", "missing.txt"], r"`--check-texts`: no file"),
        (["--to", "merged", "--base-model-id", "org/base"], r"`--base-model-id` applies to `--to lora`"),
        (["--to", "lora", "--rank", "4", "--base-model-id", "/tmp/base"], r"`--base-model-id` must be the base"),
    ],
)
def test_export_bad_arguments(saved, extra, match, capsys):
    tmp_path, _, _ = saved
    argv = ["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "o")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert "cofitune export: error:" in err and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_export_needs_an_adapter_folder(tmp_path, capsys):
    argv = ["export", str(tmp_path / "nope"), "--base", str(tmp_path), "--to", "merged", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "`ADAPTER_DIR`: no folder" in capsys.readouterr().err


def test_export_of_a_hub_repo_it_cannot_fetch_names_the_argument(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert main(["export", "nobody/nothing", "--to", "lora", "--rank", "4", "--out", str(tmp_path / "o")]) == 2
    assert "`ADAPTER_DIR`: no local folder 'nobody/nothing' and the Hub repository" in capsys.readouterr().err


def test_export_records_base_model_id_and_needs_a_base_when_the_adapter_names_none(saved, capsys):
    tmp_path, _, _ = saved  # built from a config: the adapter names no base model
    argv = ["export", str(tmp_path / "adapter"), "--to", "lora", "--rank", "4", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "`--base`: the adapter does not name its base model" in capsys.readouterr().err
    assert main([*argv, "--base", str(tmp_path / "base"), "--base-model-id", "org/base"]) == 0
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"
    assert "base_model: org/base" in (tmp_path / "o" / "README.md").read_text()


# ---------------------------------------------------------------------- fidelity


def test_fidelity_full_rank_is_exact_and_low_rank_is_worse(tmp_path):
    pm = adapted()
    tokenizer = tiny_tokenizer()
    export_lora(pm, tmp_path / "full", rank=32)
    export_lora(pm, tmp_path / "low", rank=1)
    full = PeftModel.from_pretrained(tiny_model(), tmp_path / "full").eval()
    low = PeftModel.from_pretrained(tiny_model(), tmp_path / "low").eval()
    exact = fidelity(pm, full, tokenizer, TEXTS)
    rough = fidelity(pm, low, tokenizer, TEXTS, batch_size=3)
    assert exact["tokens"] == rough["tokens"] == sum(len(t) for t in TEXTS)
    assert exact["kl_mean"] < 1e-6 and exact["top1_agreement"] == 1.0
    assert math.isfinite(rough["kl_max"]) and rough["kl_mean"] > 100 * max(exact["kl_mean"], 1e-12)
    assert rough["kl_max"] >= rough["kl_mean"] and 0.0 <= rough["top1_agreement"] <= 1.0
    sizes = file_sizes(tmp_path / "full", tmp_path / "low")
    assert sizes[str(tmp_path / "low")] < sizes[str(tmp_path / "full")]


def test_fidelity_needs_texts():
    pm = adapted()
    with pytest.raises(CoFiTuneError, match=r"`texts` must hold"):
        fidelity(pm, pm, tiny_tokenizer(), [])
