"""Tiny random-init configs of every causal-LM family of the installed transformers, built offline.

`tiny_config(model_type)` starts from the family's default config and shrinks every size it knows the name of (hidden
64, 4 layers, 4 heads of head_dim 32 where the config has `head_dim`, so that head_dim != hidden / heads, 2 key/value
heads, 4 experts of which 2 are routed per token, vocabulary 128), plus the few family-specific settings a default
config needs to build at this size (hybrids: attention in layers 1 and 3). Used by the architecture sweep
(`tests/sweep.py`).
"""

from __future__ import annotations

import transformers as T
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 4, 4, 2, 32, 128

FAMILIES = tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))

_SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim", "dim_model", "lru_width",
                     "attention_hidden_size"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size", "dff",
                     "d_inner", "dim_ff", "intermediate_size_mlp", "first_dense_intermediate_size",
                     "dense_intermediate_size", "mlp_only_intermediate_size", "feed_forward_size"), 96),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                     "expert_ffn_hidden_size", "shared_experts_intermediate_size"), 24),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers",
                     "encoder_layers", "num_encoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "attention_heads", "num_decoder_attention_heads",
                     "num_encoder_attention_heads", "swa_num_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "swa_head_dim", "d_head", "dim_head", "attention_head_size", "attention_head_dim",
                     "kv_channels"), HEAD_DIM),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "num_expert_group", "topk_group"), 1),
    **dict.fromkeys(("first_k_dense_replace", "num_dense_layers", "num_dense_blocks"), 1),
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24, "o_lora_rank": 16, "o_groups": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": 4, "linear_head_dim": 16,
    "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 8, "mamba_chunk_size": 16, "mamba_dt_rank": 8,
    "mamba_d_ssm": 128, "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 32, "state_size": 8,
    "time_step_rank": 8, "chunk_size": 16, "n_mamba_heads": 2, "mamba_headdim": 32,
    "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1,
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "index_num_heads": 2,
    **dict.fromkeys(("vocab_size", "decoder_vocab_size", "unpadded_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
                     "context_length", "model_max_length"), 128),
    "sliding_window": 16,
    "num_nextn_predict_layers": 0,
    "hidden_size_global": HIDDEN, "encoder_hash_byte_group_vocab": VOCAB,
}  # fmt: skip
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

#: Settings a family's default config needs to build at this size, or to put attention into the tiny model.
EXTRA: dict[str, dict] = {
    "bailing_hybrid": {"layer_types": _HYBRID},
    "bamba": {"attn_layer_indices": [1, 3]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": _ROPE, "sliding_attention": _ROPE}},
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}},
    "dots3_note_text": {
        "layer_types": ["indexed_attention", "sliding_attention", "indexed_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "head_dim": 32,
        "per_layer_config": {i: {"num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 24,
                                 "qk_nope_head_dim": 24} for i in (1, 3)},
    },
    "gemma3n_text": {"num_kv_shared_layers": 0, "intermediate_size": 96, "activation_sparsity_pattern": [0.0] * 4,
                     "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "laurel_rank": 8,
                     "altup_num_inputs": 2},
    # per-layer head_dim: the full-attention layers have 48, the sliding ones 32 (a heterogeneous config)
    "gemma4_text": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    "per_layer_config": {1: {"head_dim": 48}, 3: {"head_dim": 48}}},
    "gpt_neo": {"attention_types": [[["global", "local"], 2]], "window_size": 16},
    "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba", "attention"]},
    "helium": {"head_dim": HIDDEN // HEADS},  # its attention requires head_dim == hidden / heads
    "hunyuan_v1_dense": {"head_dim": HEAD_DIM},
    "hunyuan_v1_moe": {"head_dim": HEAD_DIM},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "kimi_linear": {"layer_types": _HYBRID},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "ministral": {"head_dim": HEAD_DIM},
    "nemotron": {"num_key_value_heads": KV_HEADS},
    "qwen4_exp_text": {"indexer_budget": 8, "indexer_compress_ratio": 4, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                       "indexer_head_dim": 32},
    "reformer": {"is_decoder": True, "hash_seed": 0, "axial_pos_embds_dim": [16, 48], "axial_pos_shape": [2, 4],
                 "attention_head_size": 16, "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "num_buckets": 2,
                 "max_position_embeddings": 8},
    "xlnet": {"d_head": HIDDEN // HEADS},  # validated: d_head == d_model / n_head
    "xlstm": {"num_heads": 2, "qk_dim_factor": 1.0},  # its recurrent step needs qk and v of one width
    "zamba": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "attention_head_dim": 32,
              "attention_hidden_size": 128},
    "zamba2": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "hybrid_layer_ids": [1, 3],
               "attention_head_dim": 32, "attention_hidden_size": 128, "n_mamba_heads": 4},
    "zaya": {"num_experts_per_tok": 1},  # its config accepts only 1
}  # fmt: skip

#: Families whose tiny model cannot be built offline here, with the reason (they are listed in the table as such).
NOT_BUILT = {
    "gemma3n": "its vision tower needs the `timm` package, which this project does not install",
    "gemma4_assistant": "an assistant (draft) model, built on top of a Gemma 4 backbone's key/value states",
    "gemma4_unified_assistant": "an assistant (draft) model, built on top of a Gemma 4 backbone's key/value states",
    "musicgen": "a text-to-audio model whose causal LM predicts codebooks of an audio encoder, not text tokens",
    "musicgen_melody": "a text-to-audio model whose causal LM predicts codebooks of an audio encoder, not text tokens",
    "dots3_note": "its default config's per-layer overrides of the audio/vision towers do not shrink to 4 layers",
}


def _shrink(values: dict) -> dict:
    """Small values for every size `values` names, sub-configs (text, vision, ...) included."""
    out = {}
    spare = iter(range(100, VOCAB))
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:
            layers = next(
                (value[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if isinstance(value.get(k), int)),
                None,
            )
            kept = {
                k: v
                for k, v in value.items()
                if k != "per_layer_config" and not (isinstance(v, list) and len(v) == layers)
            }
            out[key] = {**kept, **_shrink(value), **EXTRA.get(value["model_type"], {})}
        elif key in _SIZES and (value is None or (isinstance(value, int) and not isinstance(value, bool))):
            out[key] = _SIZES[key]
        elif key in _TOKENS and value is not None:
            out[key] = _TOKENS[key]
        elif key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= 100:
            out[key] = next(spare)
    if "qk_rope_head_dim" in values:  # latent attention: head_dim is the rotary part
        out["head_dim"] = out.get("qk_rope_head_dim", 8)
    if "kv_lora_rank" in values:  # latent attention has one key/value per query head
        out.update({k: HEADS for k in ("num_key_value_heads", "num_kv_heads") if k in out})
    if "rotary_dim" in values:
        out["rotary_dim"] = 8
    if values.get("is_decoder") is False:  # an encoder family used as a causal LM (BERT, RoBERTa, ...)
        out["is_decoder"] = True
    return out


def tiny_config(model_type: str, **overrides):
    """The tiny config of `model_type` (see the module docstring)."""
    values = _shrink(T.AutoConfig.for_model(model_type).to_dict())
    values.update(EXTRA.get(model_type, {}))
    values.update(overrides)
    return T.AutoConfig.for_model(model_type, **values)


def prepare(model_type: str, model):
    """Setup a tiny model needs before its first forward pass: xmod's language; weights its init leaves at zero (the
    xLSTM FFN's gate projection: its FFN would pass no gradient) drawn small instead, as a trained model's are."""
    import torch

    if model_type == "xmod":
        model.set_default_language("en_XX")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    return model
