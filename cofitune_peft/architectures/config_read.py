"""Reading sizes from transformers configs without letting a config's own exceptions escape.

Configs name the same size differently (`num_attention_heads`, `n_head`, ...), multimodal configs keep the text
model's values in a sub-config, and heterogeneous configs (transformers >= 5.25, e.g. Gemma 4) refuse to give a global
value of a per-layer attribute (`AmbiguousGlobalPerLayerAttributeError`): each layer's config has its own. Every read
here goes through `read`, which turns any exception into "unknown" (None), so callers check values against the
weights' shapes instead of trusting them.
"""

from __future__ import annotations

from torch import nn

HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "emb_dim", "embedding_dim")
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "attention_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads", "multi_query_group_num")
HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head", "kv_channels")
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def read(obj, name: str):
    """`obj.name`, or None when it is missing, None, or reading it raises (any exception)."""
    if obj is None:
        return None
    try:
        value = getattr(obj, name, None)
    except Exception:
        return None
    return value


def first_int(obj, names) -> int | None:
    """The first of `names` on `obj` that is a positive int."""
    for name in names:
        value = read(obj, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def text_config(config):
    """The text config of a (possibly multimodal) transformers config."""
    getter = read(config, "get_text_config")
    if callable(getter):
        try:
            return getter()
        except Exception:
            return config
    return config


def layer_config(config, index: int):
    """The config of decoder layer `index`: `config.per_layer_config[index]` for a heterogeneous config, else `config`."""
    if read(config, "is_heterogeneous"):
        try:
            return config.per_layer_config[index]
        except Exception:
            return config
    return config


def model_config(model: nn.Module):
    config = read(model, "config")
    return text_config(config) if config is not None else None


def model_type_of(model: nn.Module) -> str | None:
    config = read(model, "config")
    if config is None:
        return None
    return read(text_config(config), "model_type") or read(config, "model_type")
