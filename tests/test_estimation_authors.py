"""The authors' literal estimator (`recipe="authors"` and its options): each choice does what the authors' code does,
the default stays as it was, and what cannot be done is refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_estimation import TEXTS, char_tokenizer
from tiny_models import ARCHS, tiny_model
from torch.utils.data import DataLoader

from cofitune_peft.architectures import model_layout
from cofitune_peft.errors import CoFiTuneError
from cofitune_peft.estimation import RECIPES, _estimate_raw, estimate_importance
from cofitune_peft.estimation.attention import _attention_modules, _ProbabilityDropout
from cofitune_peft.estimation.batches import _text_batches

# Texts of different lengths, so that batches hold padding.
UNEVEN = [t * k for k, t in zip((1, 3, 2, 5, 1, 4), TEXTS)]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def raw(model, data, tok, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return _estimate_raw(model, data, tokenizer=tok, progress=False, **kwargs).parts


def assert_raw_equal(a, b, **tol):
    assert a.keys() == b.keys()
    for part in a:
        torch.testing.assert_close(a[part], b[part], **tol)


def test_the_default_recipe_is_the_default_options(tok):
    model = tiny_model(num_layers=2)
    plain = raw(model, UNEVEN, tok)
    assert_raw_equal(plain, raw(model, UNEVEN, tok, recipe="default"), rtol=0, atol=0)
    assert_raw_equal(plain, raw(model, UNEVEN, tok, **RECIPES["default"]), rtol=0, atol=0)


def test_padding_options_build_left_and_fixed_length_batches(tok):
    texts = ["abc", "abcdef"]
    (ids, mask, n), *_ = _text_batches(texts, tok, None, None, 2, 10, 0, 1)
    assert ids.shape == (2, 7) and mask.tolist()[0] == [1, 1, 1, 1, 0, 0, 0]  # right, to the longest (with <s>)
    (ids, mask, n), *_ = _text_batches(texts, tok, None, None, 2, 10, 0, 1, "max_length", "left")
    assert ids.shape == (2, 10) and n == 2
    assert mask.tolist() == [[0] * 6 + [1] * 4, [0] * 3 + [1] * 7]
    assert ids[0, :6].tolist() == [tok.pad_token_id] * 6 and ids[0, 6:].tolist() == tok("abc")["input_ids"]


def _fixed_noise(self, x):
    """A deterministic stand-in for the injected dropout: the second pass's features scaled by a fixed pattern, the
    same at every position, so that padding cannot change the noise the real tokens get."""
    half = x.shape[0] // 2
    scale = 1 + 0.2 * torch.cos(torch.arange(x.shape[-1], dtype=x.dtype))  # [features]
    return torch.cat([x[:half], x[half:] * scale])


def test_kl_over_padded_positions_is_what_padding_changes(tok, monkeypatch):
    from cofitune_peft.estimation import gates

    monkeypatch.setattr(gates._Gates, "_drop", _fixed_noise)
    model = tiny_model(num_layers=2, attn_implementation="eager")
    # No padding at all (one text per batch): the KL over every position is the KL over the tokens.
    one = raw(model, UNEVEN, tok, batch_size=1)
    assert_raw_equal(one, raw(model, UNEVEN, tok, batch_size=1, kl_positions="all"), rtol=0, atol=0)
    # Right padding to 256 (the texts are shorter) with the KL over tokens: the real tokens never see the padding.
    longest = raw(model, UNEVEN, tok)
    padded = raw(model, UNEVEN, tok, padding="max_length", max_length=256)
    assert_raw_equal(longest, padded, rtol=1e-4, atol=1e-9)
    # Left padding too, as long as the padded positions stay out of the KL.
    left = raw(model, UNEVEN, tok, padding="max_length", padding_side="left", max_length=256)
    assert_raw_equal(longest, left, rtol=1e-4, atol=1e-9)
    # Over every position the padded positions count too (under eager attention they attend uniformly to every key,
    # as in the authors' code), and the scores move.
    with_pads = raw(model, UNEVEN, tok, padding="max_length", padding_side="left", max_length=256, kl_positions="all")
    assert not torch.allclose(with_pads["intermediate"], left["intermediate"], rtol=0.05)


def test_never_zeroed_gate_gradients_count_batch_b_T_minus_b_plus_1_times(tok):
    model = tiny_model(num_layers=2)
    batches = [UNEVEN[i : i + 2] for i in range(0, 6, 2)]
    per_batch = [
        _estimate_raw(model, b, tokenizer=tok, batch_size=2, accumulate="signed", progress=False) for b in batches
    ]
    total = sum(r.num_tokens for r in per_batch)
    got = raw(model, UNEVEN, tok, accumulate="signed", gate_grads="never_zeroed")
    for part in got:
        # raw = gradient sum / tokens, so batch b's gradient is raw_b * tokens_b; it counts 3, 2, 1 times.
        expected = sum((3 - b) * r.parts[part].double() * r.num_tokens for b, r in enumerate(per_batch)) / total
        torch.testing.assert_close(got[part].double(), expected, rtol=1e-5, atol=1e-9)


def test_authors_recipe_in_micro_batches_checks_every_slice(tok):
    """The authors' recipe (eager attention, dropout on the probabilities, never-zeroed gradients) runs in slices of
    one example: every slice's forward computes its one softmax per layer, and the scores keep their shapes."""
    model = tiny_model(num_layers=2)
    kernel = model.config._attn_implementation
    whole = raw(model, UNEVEN, tok, recipe="authors", max_length=64)
    sliced = raw(model, UNEVEN, tok, recipe="authors", max_length=64, micro_batch_size=1)
    for part, value in whole.items():
        assert sliced[part].shape == value.shape and torch.isfinite(sliced[part]).all()
        assert not torch.equal(sliced[part], value)  # fresh dropout draws per slice
    assert model.config._attn_implementation == kernel  # switched back after each estimate


def _captured_probabilities(model, run):
    """The attention weights each attention module returns (eager: after its dropout) during `run()`."""
    seen = []
    modules = [module for _, module in _attention_modules(model, model_layout(model))]
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out[1].detach())) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_attention_dropout_acts_on_the_probabilities(tok):
    model = tiny_model(num_layers=2, attn_implementation="eager")
    texts = UNEVEN[:2]
    (ids, mask, _), *_ = _text_batches(texts, tok, None, None, 2, 256, 0, 1)
    with torch.no_grad():
        clean = _captured_probabilities(
            model, lambda: model(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1))
        )
    kwargs = {"batch_size": 2, "dropout": 0.5, "parts": ("heads",)}
    dropped = _captured_probabilities(
        model, lambda: raw(model, texts, tok, attention_dropout="probabilities", **kwargs)
    )
    kept = _captured_probabilities(model, lambda: raw(model, texts, tok, **kwargs))
    assert len(clean) == len(dropped) == len(kept) == 2
    # The first layer's probabilities see no injected noise upstream (later layers see the FFN dropout's).
    c, d, k = clean[0], dropped[0], kept[0]  # [2 * batch, heads, queries, keys]
    assert torch.equal(k, c), "the default leaves the probabilities alone (its dropout is on the heads' output)"
    live = c > 0
    zeroed = (d == 0) & live
    assert 0.4 < zeroed.sum() / live.sum() < 0.6
    torch.testing.assert_close(d[live & ~zeroed], 2 * c[live & ~zeroed])  # inverted dropout: kept / (1 - p)
    assert torch.equal(d[~live], c[~live])
    assert not torch.equal(d[: len(d) // 2], d[len(d) // 2 :]), "the two passes get different masks"
    assert not torch.equal(dropped[1], kept[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_authors_recipe_runs_on_every_architecture_and_restores_the_model(arch, tok):
    model = tiny_model(arch, num_layers=2)
    kernel = model.config._attn_implementation
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    imp = estimate_importance(
        model, UNEVEN, tokenizer=tok, batch_size=2, max_length=64, recipe="authors", progress=False
    )
    assert model.config._attn_implementation == kernel
    assert [m.training for m in model.modules()] == modes and torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "every hook is removed"
    assert {k: imp.metadata[k] for k in RECIPES["authors"]} == {k: str(v) for k, v in RECIPES["authors"].items()} | {
        "max_length": "64"
    }
    assert imp.metadata["recipe"] == "authors"
    assert all(torch.isfinite(v).all() and (v.std(dim=1) > 0).all() for v in imp.parts().values())


def test_authors_recipe_on_sdpa_equals_the_same_model_loaded_eager(tok):
    sdpa = tiny_model(num_layers=2, attn_implementation="sdpa")
    eager = tiny_model(num_layers=2, attn_implementation="eager")
    kwargs = {"max_length": 64, "recipe": "authors"}
    assert_raw_equal(raw(sdpa, UNEVEN, tok, **kwargs), raw(eager, UNEVEN, tok, **kwargs), rtol=0, atol=0)


def test_explicit_options_win_over_the_recipe(tok):
    model = tiny_model(num_layers=2)
    imp = estimate_importance(
        model, UNEVEN, tokenizer=tok, batch_size=2, recipe="authors", accumulate="abs", max_length=32, progress=False
    )
    assert (imp.metadata["accumulate"], imp.metadata["gate_grads"], imp.metadata["max_length"]) == (
        "abs",
        "never_zeroed",
        "32",
    )
    default = estimate_importance(model, UNEVEN, tokenizer=tok, batch_size=2, progress=False).metadata
    assert (default["recipe"], default["accumulate"], default["attn_implementation"]) == ("default", "abs", "sdpa")


def test_probabilities_need_eager_attention_and_the_advice_works(tok):
    model = tiny_model(num_layers=2, attn_implementation="sdpa")
    with pytest.raises(CoFiTuneError, match=r"`attention_dropout='probabilities'` needs eager attention.*'sdpa'"):
        raw(model, UNEVEN, tok, attention_dropout="probabilities")
    scores = raw(model, UNEVEN, tok, attention_dropout="probabilities", attn_implementation="eager")
    assert model.config._attn_implementation == "sdpa"
    assert_raw_equal(scores, raw(tiny_model(num_layers=2, attn_implementation="eager"), UNEVEN, tok,
                                 attention_dropout="probabilities"), rtol=0, atol=0)  # fmt: skip


def test_an_attention_without_one_softmax_is_refused_by_name():
    model = tiny_model(num_layers=2, attn_implementation="sdpa")
    hooks = _ProbabilityDropout(model, model_layout(model), lambda x: x)
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 100, (1, 6)))
        with pytest.raises(CoFiTuneError, match=r"layer 0 \(LlamaAttention\) computed 0 softmaxes.*'eager'"):
            hooks.check()
    finally:
        hooks.remove()


def test_a_kernel_the_model_cannot_switch_to_is_refused_and_nothing_changes(tok):
    model = tiny_model(num_layers=2, attn_implementation="sdpa")
    with pytest.raises(CoFiTuneError, match=r"`attn_implementation='no_such_kernel'`.*load the model with"):
        raw(model, UNEVEN, tok, attn_implementation="no_such_kernel")
    assert model.config._attn_implementation == "sdpa"


def test_authors_recipe_with_a_dataloader_uses_its_padding(tok):
    model = tiny_model(num_layers=2)
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:2, :5] = 0  # left padding, made by the loader's collator
    loader = DataLoader([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)], batch_size=2)
    got = raw(model, loader, None, recipe="authors")
    assert all(torch.isfinite(v).all() for v in got.values())
    with pytest.raises(CoFiTuneError, match="`padding` applies to text data; a DataLoader"):
        raw(model, loader, None, padding="max_length")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipe": "paper"}, r"`recipe` must be one of \('default', 'authors'\), got 'paper'"),
        ({"gate_grads": "never"}, r"`gate_grads` must be one of \('per_batch', 'never_zeroed'\)"),
        ({"padding": "max"}, r"`padding` must be one of \('longest', 'max_length'\)"),
        ({"padding_side": "top"}, r"`padding_side` must be one of \('right', 'left'\)"),
        ({"kl_positions": "pads"}, r"`kl_positions` must be one of \('tokens', 'all'\)"),
        ({"attention_dropout": "probs"}, r"`attention_dropout` must be one of \('head_output', 'probabilities'\)"),
        ({"attn_implementation": 3}, r"`attn_implementation` must be a string"),
        ({"recipe": "authors", "signal": "fisher"}, r"`recipe='authors'` is the authors' KL proxy"),
        ({"signal": "fisher", "kl_positions": "all"}, r"`kl_positions='all'` applies to the KL proxy only"),
        ({"signal": "fisher", "gate_grads": "never_zeroed"}, r"`gate_grads='never_zeroed'` applies to the KL proxy"),
        ({"recipe": "authors", "max_length": 0}, r"`max_length` must be a positive int, got 0"),
    ],
)
def test_bad_options_are_refused(tok, kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        raw(tiny_model(num_layers=1), UNEVEN, tok, **kwargs)


def test_kl_over_padding_under_a_fused_kernel_warns_with_the_fix(tok):
    model = tiny_model(num_layers=2, attn_implementation="sdpa")
    with pytest.warns(UserWarning, match=r"`kl_positions='all'` under 'sdpa'.*`attn_implementation='eager'`"):
        raw(model, UNEVEN, tok, kl_positions="all", padding="max_length", padding_side="left", max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw(model, UNEVEN, tok, kl_positions="all", attn_implementation="eager")


def test_the_comparison_registers_the_authors_estimator_as_a_mask_variant(tmp_path):
    from tiny_models import tiny_tokenizer

    from cofitune_peft.kit.compare import DEFAULT_LEARNING_RATES, METHODS, MethodSettings

    tok = tiny_tokenizer()
    shared = estimate_importance(tiny_model(num_layers=4), TEXTS, tokenizer=tok, num_samples=3, progress=False)
    settings = MethodSettings(tokenizer=tok, general_texts=TEXTS, importance=shared, cache_dir=str(tmp_path))
    method = METHODS["cofitune_authors"]
    assert method.needs_importance and method.family == "cofitune" and len(DEFAULT_LEARNING_RATES[method.name]) == 3
    model = tiny_model(num_layers=4)
    built = method.build(model, settings)
    own = built.base_model.get_importance().metadata
    # Every choice is the authors', although the shared estimate (whose settings the variants reuse) summed |grad|.
    assert shared.metadata["accumulate"] == "abs"
    assert {k: own[k] for k in RECIPES["authors"]} == {k: str(v) for k, v in RECIPES["authors"].items()}
    assert own["recipe"] == "authors" and own["num_samples"] == "3"
    assert model.config._attn_implementation == "sdpa", "the eager switch is undone"


def test_cli_recipe_flag(tmp_path, tok):
    from cofitune_peft import Importance
    from cofitune_peft.kit.cli import main

    folder = tmp_path / "model"
    tiny_model(num_layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(UNEVEN), encoding="utf-8")
    out = tmp_path / "imp.safetensors"
    argv = ["importance", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "2"]
    assert main([*argv, "--recipe", "authors", "--max-length", "64", "--no-progress", "--device", "cpu"]) == 0
    meta = Importance.load(out).metadata
    assert (meta["recipe"], meta["accumulate"], meta["max_length"], meta["attn_implementation"]) == (
        "authors",
        "signed",
        "64",
        "eager",
    )
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    meta = Importance.load(out).metadata
    assert (meta["recipe"], meta["accumulate"], meta["max_length"]) == ("default", "abs", "256")
