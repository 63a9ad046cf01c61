"""What the memory model reads off a model: the shapes of a meta model, and the plan of a CoFiTune adapter on it.

`Shapes.from_model` reads sizes and each decoder layer's linear modules; `cofitune_plan` builds the real adapter
(`get_peft_model` on a meta model: default window, `parts` shorthands, layouts read from the model, fused expert
weights, or a `unit_map`) and reads what it trains. `KNOWN_SHAPES` holds a few published configs, written out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from cofitune_peft import CoFiTuneError

# Hand-written transformers configs (no download); the numbers are those of the published config.json files.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
KNOWN_SHAPES: dict[str, dict] = {
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0,
        "original_max_position_embeddings": 8192}, "rms_norm_eps": 1e-5,
    },
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
    "llama-2-13b": {
        "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    },
    "llama-3-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    },
}  # fmt: skip


def load_config(config_or_model):
    """A transformers config from a config, a dict, a `KNOWN_SHAPES` name, a local path/folder or a Hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_model, PretrainedConfig):
        return config_or_model
    if isinstance(config_or_model, dict):
        values = dict(config_or_model)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if isinstance(config_or_model, str) and config_or_model in KNOWN_SHAPES:
        return load_config(KNOWN_SHAPES[config_or_model])
    if isinstance(config_or_model, str):
        try:
            return AutoConfig.from_pretrained(config_or_model)
        except (OSError, ValueError) as err:
            raise CoFiTuneError(
                f"cannot read a transformers config from {config_or_model!r} ({err}); pass a local config.json or "
                f"model folder, a Hub id, or one of {sorted(KNOWN_SHAPES)}."
            ) from err
    raise CoFiTuneError(
        f"`config_or_model` must be a config, dict, path, Hub id or model, got {type(config_or_model)}."
    )


def meta_model(config) -> nn.Module:
    """The causal LM of `config` with every tensor on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class Shapes:
    """What the memory model reads off a meta model: sizes and, per decoder layer, its linear modules."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    total_params: int
    layer_linear_params: int  # weights of the nn.Linear modules inside the decoder layers (what bnb quantises)
    linears: list[list[tuple[str, int, int]]]  # per layer: (name, in_features, out_features)
    # (layers, parts, unit_map, layers_pattern) -> CoFiTunePlan
    cofitune: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module, unit_map: dict | None = None, layers_pattern: str | None = None) -> Shapes:
        from cofitune_peft.architectures import dims_of, find_decoder_layers, model_layout

        dims = dims_of(model, model_layout(model, unit_map, layers_pattern))
        layers = find_decoder_layers(model, layers_pattern)[1]
        linears = [
            [(n, m.in_features, m.out_features) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            for layer in layers
        ]
        return cls(
            num_layers=len(layers),
            hidden=dims.hidden,
            intermediate=max(o for lin in linears for _, _, o in lin if o != dims.hidden) if linears else 0,
            num_heads=dims.num_heads,
            num_kv_heads=dims.num_kv_heads,
            head_dim=dims.head_dim,
            vocab=model.get_output_embeddings().weight.shape[0],
            total_params=_unique_numel(model.parameters()),
            layer_linear_params=sum(i * o for lin in linears for _, i, o in lin),
            linears=linears,
        )


class CoFiTunePlan(NamedTuple):
    """What a CoFiTune adapter trains, read off `get_peft_model` on a meta model."""

    trainable: int  # trained parameters
    window: tuple[int, int]
    wrapped: dict[int, list[str]]  # decoder layer -> wrapped module names inside it
    rows: int  # soft-mask rows: a scale per row of each wrapped module, per expert for fused expert weights
    tensors: list[tuple[int, int]]  # `(rows, numel / rows)` of each trained tensor (an expert delta is one tensor)


def _decoder_layers(model: nn.Module, layers_pattern: str | None = None) -> nn.ModuleList:
    """The text decoder's layer list, as CoFiTune finds it."""
    from cofitune_peft.architectures import find_decoder_layers

    return find_decoder_layers(model, layers_pattern)[1]


def cofitune_plan(
    config, layers: tuple[int, int] | None = None, target_modules="ffn", unit_map=None, layers_pattern=None
) -> CoFiTunePlan:
    """The `CoFiTunePlan` of a CoFiTune adapter, from `get_peft_model` on a meta model (the real plan: default window,
    `parts` shorthands, layouts read from the model, mixture-of-experts layers with a full-size delta and a soft mask
    per expert, or a `unit_map`). `target_modules` is the selection (`CoFiTuneConfig.parts`)."""
    from peft import get_peft_model

    from cofitune_peft import CoFiTuneConfig

    with torch.device("meta"):
        cofitune = CoFiTuneConfig(
            layers=layers, parts=target_modules, unit_map=unit_map, layers_pattern=layers_pattern
        )
        peft_model = get_peft_model(meta_model(config), cofitune)
    layer_list = _decoder_layers(peft_model.get_base_model(), layers_pattern)
    wrapped: dict[int, list[str]] = {}
    for index, layer in enumerate(layer_list):
        names = [n.rsplit(".cofitune_delta", 1)[0] for n, p in layer.named_parameters() if p.requires_grad]
        if names:
            wrapped[index] = sorted(set(names))
    trained = list({id(p): p for p in peft_model.parameters() if p.requires_grad}.values())
    window = tuple(peft_model.peft_config["default"].layers)
    rows = sum(b.numel() for n, b in peft_model.named_buffers() if ".cofitune_scale." in n)
    tensors = [(p.shape[0], p.numel() // p.shape[0]) for p in trained]
    return CoFiTunePlan(sum(p.numel() for p in trained), window, wrapped, rows, tensors)
