"""Layouts read from the model: the text decoder only, hybrids' windows, per-layer head dims, refusals by name whose
advice works, and `unit_map` wherever `get_peft_model` takes it (estimation included)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from sweep import _loader, _model
from tiny_models import tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, CoFiTuneLayer, estimate_importance, set_importance
from cofitune_peft.architectures import find_decoder_layers, model_layout

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def wrapped(pm) -> list[str]:
    return [n for n, m in pm.named_modules() if isinstance(m, CoFiTuneLayer)]


def test_multimodal_models_train_their_text_decoder_only():
    model = _model("gemma3")  # Gemma3ForConditionalGeneration: a SigLIP tower with its own `layers.<i>.self_attn`
    assert find_decoder_layers(model)[0] == "model.language_model.layers"
    pm = get_peft_model(model, CoFiTuneConfig(parts="mha", layers=(0, 4)))
    names = wrapped(pm)
    assert names and all(".language_model.layers." in n for n in names)
    imp = estimate_importance(pm, _loader(IDS), num_samples=2, progress=False)
    assert tuple(imp.heads.shape) == (4, 4)  # the text decoder's layers and heads


def test_a_hybrid_window_without_the_selected_parts_is_refused_with_the_layer_kinds():
    model = _model("jamba")  # layers 0 and 2 are Mamba layers, 1 and 3 attention
    with pytest.raises(CoFiTuneError, match=r"matched no module in layers 0\.\.0.*layer 0: mamba\+ffn"):
        get_peft_model(model, CoFiTuneConfig(parts="mha", layers=(0, 1)))
    pm = get_peft_model(_model("jamba"), CoFiTuneConfig(parts="mha", layers=(0, 4)))
    assert {n.split(".layers.")[1].split(".")[0] for n in wrapped(pm)} == {"1", "3"}


def test_pure_state_space_models_are_refused_by_name():
    with pytest.raises(CoFiTuneError, match=r"'mamba' .*no attention or feed-forward layer.*mamba"):
        get_peft_model(_model("mamba"), CoFiTuneConfig())


def test_per_layer_head_dims_of_a_heterogeneous_config_are_read_per_layer():
    from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError

    model = _model("gemma4_text")  # full-attention layers have head_dim 48, sliding ones 32
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        model.config.head_dim  # noqa: B018  (the config itself refuses a global value)
    layout = model_layout(model)
    widths = [next(g.width for g in layer.gates if g.kind == "heads") for layer in layout.layers]
    assert widths == [32, 48, 32, 48]
    pm = get_peft_model(model, CoFiTuneConfig(parts="mha", layers=(0, 4)))
    set_importance(pm, estimate_importance(pm, _loader(IDS), num_samples=2, progress=False))
    assert pm.base_model.mask_statistics()["mask_mean_scale"] < 1
    # and with a unit_map, whose head sizes also come from each layer's config
    unit_map = {"self_attn.q_proj": "head", "self_attn.o_proj": "head@in"}
    pm = get_peft_model(_model("gemma4_text"), CoFiTuneConfig(parts="all", unit_map=unit_map, layers=(0, 4)))
    assert len(wrapped(pm)) == 8


def test_several_layer_stacks_are_refused_and_the_advice_works():
    model = _model("hrm_text")
    with pytest.raises(CoFiTuneError, match=r"several stacks of layers .*layers_pattern=") as err:
        get_peft_model(model, CoFiTuneConfig())
    advice = str(err.value).split("layers_pattern=")[1].split("'")[1]
    pm = get_peft_model(model, CoFiTuneConfig(layers_pattern=advice, layers=(0, 4)))
    assert wrapped(pm) and all(advice in n for n in wrapped(pm))


class _Renamed(torch.nn.Module):
    """An FFN whose projections carry names inference does not know and no FFN-like class name."""

    def __init__(self, mlp):
        super().__init__()
        self.widen, self.narrow, self.squash, self.act = mlp.up_proj, mlp.down_proj, mlp.gate_proj, mlp.act_fn

    def forward(self, x):
        return self.narrow(self.act(self.squash(x)) * self.widen(x))


def _renamed_model():
    model = tiny_model(num_layers=4)
    for layer in model.model.layers:
        layer.block = _Renamed(layer.mlp)
        del layer.mlp
        layer.mlp = layer.block  # the decoder layer calls `self.mlp`
        del layer.block
    return model


def test_unreadable_layers_are_refused_naming_unit_map_and_the_advice_works():
    model = _renamed_model()
    with pytest.raises(CoFiTuneError, match="unit_map"):
        get_peft_model(model, CoFiTuneConfig(parts="ffn", layers=(0, 4)))
    unit_map = {"mlp.widen": "intermediate", "mlp.narrow": "output"}
    pm = get_peft_model(_renamed_model(), CoFiTuneConfig(parts="ffn", unit_map=unit_map, layers=(1, 3)))
    assert len(wrapped(pm)) == 4
    # the importance estimate, the callback's path (set_importance) and the memory of the layout all take it
    imp = estimate_importance(pm, _loader(IDS), num_samples=2, progress=False)
    assert tuple(imp.intermediate.shape) == (4, 48) and tuple(imp.output.shape) == (4, 32)
    set_importance(pm, imp)
    assert pm.base_model.mask_statistics()["mask_mean_scale"] < 1
    plain = estimate_importance(_renamed_model(), _loader(IDS), num_samples=2, progress=False, unit_map=unit_map)
    torch.testing.assert_close(plain.intermediate, imp.intermediate)


def test_tied_weights_across_layers_are_not_trained():
    model = tiny_model(num_layers=4)
    model.model.layers[3].mlp = model.model.layers[1].mlp  # one FFN used by two layers
    pm = get_peft_model(model, CoFiTuneConfig(parts="ffn", layers=(0, 4)))
    assert not any(".layers.1.mlp" in n or ".layers.3.mlp" in n for n in wrapped(pm))
    assert any(".layers.0.mlp" in n for n in wrapped(pm))


def test_config_reading_never_leaks_a_config_exception():
    from cofitune_peft.architectures.config_read import read

    class Angry:
        @property
        def head_dim(self):
            raise RuntimeError("per-layer attribute")

    assert read(Angry(), "head_dim") is None
