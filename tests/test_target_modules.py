"""`parts` and PEFT's meaning of `target_modules` (issue 17, item 5): after injection `target_modules` names exactly the
wrapped modules for PEFT's own matcher, so PEFT's `convert_to_lora` gives a LoRA that loads on a fresh base and
reproduces the logits at full rank; the selection of 0.1/0.2 (`target_modules="ffn"`) still works."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from peft.tuners.lora.conversion import convert_to_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from sweep import _model
from tiny_models import tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneLayer
from cofitune_peft._compat import peft_target_matches

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _wrapped(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize(
    ("family", "parts"),
    [
        ("llama", "ffn+mha"),
        ("gpt2", "all"),  # Conv1D weights
        ("gpt_neox", "mha"),  # per-head fused q, k, v
        ("phi3", "ffn"),  # fused gate_up of which only the up rows train
        ("gemma3", "mha"),  # a vision tower with the same `layers.<i>.self_attn` names
        ("mixtral", "mha"),
        ("bert", "ffn+mha"),
        ("deepseek_v3", "mha"),  # latent attention
    ],
)
def test_peft_convert_to_lora_reproduces_the_adapter_at_full_rank(family, parts):
    base = _model(family)
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, CoFiTuneConfig(parts=parts, layers=(1, 3), init_weights=False))
    config = pm.peft_config["default"]
    keys = [name for name, _ in fresh.named_modules() if name]
    assert {k for k in keys if peft_target_matches(config, k)} == _wrapped(pm)  # PEFT's matcher: exactly those
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
    lora_config, state_dict = convert_to_lora(pm, 1.0)  # all of each delta's singular values
    lora = get_peft_model(fresh, lora_config)
    assert _wrapped(lora) == _wrapped(pm)
    assert not set_peft_model_state_dict(lora, state_dict).unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=IDS).logits, expected, rtol=1e-3, atol=1e-3)


def test_target_modules_of_0_1_and_0_2_move_to_parts():
    for old, parts in (("ffn", "ffn"), ("mha", "mha"), (["up", "down"], ["up", "down"]), ("all-linear", "all")):
        config = CoFiTuneConfig(target_modules=old)
        assert config.parts == parts and config.target_modules is None
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(target_modules="mha", layers=(0, 2)))
    assert {n.rsplit(".", 1)[-1] for n in _wrapped(pm)} == {"q_proj", "k_proj", "v_proj"}


def test_target_modules_select_as_peft_does_within_parts():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(target_modules=["q_proj", "v_proj"], layers=(2, 4)))
    assert pm.peft_config["default"].parts == "all"
    assert _wrapped(pm) == {f"model.layers.{i}.self_attn.{m}" for i in (2, 3) for m in ("q_proj", "v_proj")}
    regex = get_peft_model(tiny_model(), CoFiTuneConfig(target_modules=r".*\.mlp\.(up|down)_proj", layers=(2, 3)))
    assert _wrapped(regex) == {"model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"}
    both = get_peft_model(tiny_model(), CoFiTuneConfig(parts="ffn", target_modules=["up_proj"], layers=(2, 3)))
    assert _wrapped(both) == {"model.layers.2.mlp.up_proj"}  # the intersection


def test_written_back_target_modules_rebuild_the_same_adapter():
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(parts="ffn+mha", layers=(1, 3)))
    config = pm.peft_config["default"]
    assert config.target_modules == ["mlp.down_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj",
                                     "self_attn.v_proj"]  # fmt: skip
    assert config.layers_to_transform == [1, 2] and config.layers_pattern == "layers"
    again = get_peft_model(tiny_model(), CoFiTuneConfig(**{k: v for k, v in config.to_dict().items() if k in (
        "parts", "target_modules", "layers", "layers_to_transform", "layers_pattern")}))  # fmt: skip
    assert _wrapped(again) == _wrapped(pm)
    assert all(isinstance(again.get_submodule("base_model.model." + n), CoFiTuneLayer) for n in _wrapped(again))
