"""Tiny random models of every supported architecture, built offline from configs."""

from __future__ import annotations

import torch
import transformers as T

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt")

VOCAB = 128


def tiny_config(model_type: str = "llama", num_layers: int = 8, **overrides):
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        common["head_dim"] = 8
    if model_type in ("gemma2", "gemma3_text"):
        common["sliding_window"] = 16
    if model_type == "gpt2":
        common = {
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": num_layers,
            "n_head": 4,
            "n_positions": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
    if model_type == "gpt_neox":
        common.pop("num_key_value_heads")
    if model_type == "opt":
        common.pop("num_key_value_heads")
        common.pop("intermediate_size")
        common.update(ffn_dim=48, word_embed_proj_dim=32)
    common.update(overrides)
    return T.AutoConfig.for_model(model_type, **common)


def tiny_model(model_type: str = "llama", num_layers: int = 8, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, **overrides))
    model.eval()
    return model


def batch(seed: int = 0, size: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (size, length), generator=g)


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < VOCAB), with a minimal chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    return fast
