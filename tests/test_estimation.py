"""Importance estimation (KL robustness proxy): shapes, invariants, inputs, state preservation, CLI."""

from __future__ import annotations

import json
import os
import random
import string

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from cofitune_peft.architectures import dims_of
from cofitune_peft.errors import CoFiTuneError
from cofitune_peft.estimation import _estimate_raw, estimate_importance
from cofitune_peft.importance import Importance
from cofitune_peft.kit.cli import build_parser, main

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "def add(a, b): return a + b",
    "Water boils at 100 degrees Celsius at sea level.",
    "To be, or not to be, that is the question.",
    "1 + 1 = 2",
]


def char_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return fast


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


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_finite_and_varied_for_each_architecture(arch, tok):
    model = tiny_model(arch, num_layers=2)
    dims = dims_of(model)
    scores = raw(model, TEXTS[:4], tok)
    expected = {
        "heads": (2, dims.num_heads),
        "intermediate": (2, dims.intermediate),
        "output": (2, dims.hidden),
    }
    for part, value in scores.items():
        assert tuple(value.shape) == expected[part]
        assert torch.isfinite(value).all()
        assert (value >= 0).all()  # |grad| by default
        assert (value.std(dim=1) > 0).all(), f"{part} does not tell units apart"
    imp = estimate_importance(model, TEXTS[:4], tokenizer=tok, batch_size=2, progress=False)
    assert {p: tuple(v.shape) for p, v in imp.parts().items()} == expected
    assert all(((v >= 0) & (v <= 1)).all() for v in imp.parts().values())
    imp.validate_for(model)
    assert imp.metadata["accumulate"] == "abs" and int(imp.metadata["num_tokens"]) > 0


def test_reproducible_under_seed(tok):
    model = tiny_model("llama", num_layers=2)
    first = raw(model, TEXTS, tok, seed=3)
    assert_raw_equal(first, raw(model, TEXTS, tok, seed=3), rtol=0, atol=0)
    other = raw(model, TEXTS, tok, seed=4)
    assert not torch.equal(first["intermediate"], other["intermediate"])


def test_independent_of_batch_order(tok):
    model = tiny_model("qwen2", num_layers=2)
    shuffled = TEXTS[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != TEXTS
    assert_raw_equal(raw(model, TEXTS, tok, batch_size=1), raw(model, shuffled, tok, batch_size=1), rtol=1e-5, atol=0)


def test_model_state_is_left_unchanged(tok):
    model = tiny_model("llama", num_layers=2)
    model.train()
    model.model.layers[1].eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    raw(model, TEXTS, tok)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unit_without_effect_gets_zero(tok):
    model = tiny_model("llama", num_layers=2)
    layer = model.model.layers[1]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, 5] = 0  # intermediate unit 5 feeds nothing
        layer.mlp.down_proj.weight[7, :] = 0  # output feature 7 is always 0
        layer.self_attn.o_proj.weight[:, 2 * head_dim : 3 * head_dim] = 0  # head 2 feeds nothing
    scores = raw(model, TEXTS, tok)
    assert scores["intermediate"][1, 5] == 0 and scores["output"][1, 7] == 0 and scores["heads"][1, 2] == 0
    assert (scores["intermediate"][1].count_nonzero(), scores["output"][1].count_nonzero()) == (47, 31)
    assert scores["heads"][1].count_nonzero() == 3


def test_signed_and_parts(tok):
    model = tiny_model("gpt2", num_layers=2)
    absolute = raw(model, TEXTS, tok)
    signed = raw(model, TEXTS, tok, accumulate="signed")
    assert (signed["intermediate"] < 0).any()
    for part in absolute:  # sum of |g| >= |sum of g|
        assert (absolute[part] >= signed[part].abs() - 1e-12).all()
    only = estimate_importance(model, TEXTS, tokenizer=tok, parts=["intermediate"], progress=False)
    assert only.heads is None and only.output is None and only.intermediate.shape == (2, 128)


def test_data_forms_agree(tok):
    import datasets
    from torch.utils.data import DataLoader

    model = tiny_model("llama", num_layers=2)
    reference = raw(model, TEXTS, tok, batch_size=1)
    ds = datasets.Dataset.from_dict({"content": TEXTS, "other": list(range(len(TEXTS)))})
    assert_raw_equal(reference, raw(model, ds, tok, batch_size=1, text_field="content"), rtol=0, atol=0)
    streamed = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()
    assert_raw_equal(reference, raw(model, streamed, tok, batch_size=1), rtol=0, atol=0)
    rows = [{"input_ids": torch.tensor(tok(t)["input_ids"])} for t in TEXTS]
    loader = DataLoader(rows, batch_size=1)
    assert_raw_equal(reference, raw(model, loader, None), rtol=0, atol=0)
    # num_samples limits the examples, in order
    assert_raw_equal(raw(model, TEXTS[:3], tok), raw(model, TEXTS, tok, num_samples=3), rtol=0, atol=0)


def test_chat_messages(tok):
    from torch.utils.data import DataLoader

    model = tiny_model("llama", num_layers=2)
    chats = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]} for t in TEXTS]
    rendered = [tok.apply_chat_template(c["messages"], tokenize=False) for c in chats]
    # rendered chat text is tokenized without adding special tokens (the template owns them)
    rows = [{"input_ids": torch.tensor(tok(r, add_special_tokens=False)["input_ids"])} for r in rendered]
    expected = raw(model, DataLoader(rows, batch_size=1), None)
    got = _estimate_raw(model, chats, tokenizer=tok, batch_size=1, progress=False)
    assert got.num_tokens == sum(len(r) for r in rendered)
    assert_raw_equal(expected, got.parts, rtol=0, atol=0)
    assert _estimate_raw(model, rendered, tokenizer=tok, progress=False).num_tokens == got.num_tokens + len(TEXTS)
    no_template = char_tokenizer()
    no_template.chat_template = None
    with pytest.raises(CoFiTuneError, match="no chat template"):
        raw(model, chats, no_template)


def test_peft_model_estimates_base_weights(tok):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", num_layers=2)
    expected = raw(model, TEXTS, tok)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj", "up_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert_raw_equal(expected, raw(peft_model, TEXTS, tok), rtol=1e-5, atol=0)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, adapted)  # adapters are active again
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags


def test_cofitune_peft_model_in_train_mode(tok):
    from peft import get_peft_model

    from cofitune_peft import CoFiTuneConfig

    model = tiny_model("llama", num_layers=4)
    expected = raw(model, TEXTS, tok)
    peft_model = get_peft_model(model, CoFiTuneConfig(layers=(1, 3), init_weights=False))
    peft_model.train()  # as CoFiTuneCallback finds it
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert_raw_equal(expected, raw(peft_model, TEXTS, tok), rtol=1e-5, atol=0)
    assert peft_model.training and {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable


def test_bad_inputs(tok):
    import datasets

    model = tiny_model("llama", num_layers=2)
    with pytest.raises(CoFiTuneError, match="`data` is empty"):
        raw(model, [], tok)
    with pytest.raises(CoFiTuneError, match="no non-empty text"):
        raw(model, ["", "  \n"], tok)
    with pytest.raises(CoFiTuneError, match="`tokenizer` is required"):
        raw(model, TEXTS, None)
    with pytest.raises(CoFiTuneError, match="list of strings"):
        raw(model, "some text", tok)
    with pytest.raises(CoFiTuneError, match="pass one split"):
        raw(model, datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}), tok)
    with pytest.raises(CoFiTuneError, match="no `text` or `messages` field"):
        raw(model, datasets.Dataset.from_dict({"body": TEXTS}), tok)
    with pytest.raises(CoFiTuneError, match="`accumulate` must be one of"):
        raw(model, TEXTS, tok, accumulate="mean")
    with pytest.raises(CoFiTuneError, match=r"`dropout` must lie in \(0, 1\)"):
        raw(model, TEXTS, tok, dropout=0)
    with pytest.raises(CoFiTuneError, match="`parts` must be"):
        raw(model, TEXTS, tok, parts=["heads", "neurons"])
    with pytest.raises(CoFiTuneError, match="`batch_size` must be a positive int"):
        raw(model, TEXTS, tok, batch_size=0)
    for micro in (0, 1.5, True):
        with pytest.raises(CoFiTuneError, match=rf"`micro_batch_size` must be a positive int or None.*{micro!r}"):
            raw(model, TEXTS, tok, micro_batch_size=micro)
    with pytest.raises(CoFiTuneError, match="does not have"):
        raw(tiny_model("llama", num_layers=2), TEXTS, tok, parts=["expert_output"])
    # a failure midway leaves no hooks and restores the flags
    with pytest.raises(CoFiTuneError):
        raw(model, [*TEXTS, 42], tok, batch_size=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_writes_importance(saved_model, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(TEXTS[:3]) + "\n\nfirst line\nsame paragraph\n", encoding="utf-8")
    out, png = tmp_path / "imp.safetensors", tmp_path / "imp.png"
    argv = ["importance", "--model", str(saved_model), "--data", str(data), "--out", str(out), "--batch-size", "2"]
    assert main([*argv, "--plot", str(png), "--no-progress", "--device", "cpu"]) == 0
    imp = Importance.load(out)
    assert {p: tuple(v.shape) for p, v in imp.parts().items()} == {
        "heads": (2, 4),
        "intermediate": (2, 48),
        "output": (2, 32),
    }
    assert imp.metadata["num_samples"] == "4" and png.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    lines = tmp_path / "docs.jsonl"
    lines.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS), encoding="utf-8")
    argv = ["importance", "--model", str(saved_model), "--data", str(lines), "--out", str(out), "--text-field", "body"]
    assert main([*argv, "--num-samples", "2", "--no-progress", "--device", "cpu"]) == 0
    assert Importance.load(out).metadata["num_samples"] == "2"
    # --micro-batch-size reaches the estimator (a bad value is refused by name)
    assert main([*argv, "--num-samples", "2", "--no-progress", "--device", "cpu", "--micro-batch-size", "1"]) == 0
    with pytest.raises(CoFiTuneError, match="`micro_batch_size` must be a positive int"):
        run_cli(["--model", str(saved_model), "--data", str(lines), "--out", str(out), "--text-field", "body",
                 "--no-progress", "--device", "cpu", "--micro-batch-size", "0"])  # fmt: skip


def run_cli(argv):
    args = build_parser().parse_args(["importance", *argv])
    return args.func(args)


def test_cli_errors(saved_model, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(TEXTS), encoding="utf-8")
    out = str(tmp_path / "imp.safetensors")
    model = str(saved_model)
    with pytest.raises(CoFiTuneError, match="`--model`: no folder"):
        run_cli(["--model", str(tmp_path / "nope"), "--data", str(data), "--out", out])
    with pytest.raises(CoFiTuneError, match="`--data`: no file or folder"):
        run_cli(["--model", model, "--data", str(tmp_path / "missing.txt"), "--out", out])
    with pytest.raises(CoFiTuneError, match="`--out`: the folder"):
        run_cli(["--model", model, "--data", str(data), "--out", str(tmp_path / "no" / "imp.safetensors")])
    with pytest.raises(CoFiTuneError, match=r"unsupported file type '\.csv'"):
        (tmp_path / "d.csv").write_text("a,b\n")
        run_cli(["--model", model, "--data", str(tmp_path / "d.csv"), "--out", out])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(CoFiTuneError, match="holds no examples"):
        run_cli(["--model", model, "--data", str(empty), "--out", out])
    with pytest.raises(CoFiTuneError, match=r"line 2 .* is not JSON"):
        (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
        run_cli(["--model", model, "--data", str(tmp_path / "bad.jsonl"), "--out", out])
    unknown = tmp_path / "mamba"
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mamba", vocab_size=128, hidden_size=16, num_hidden_layers=1, state_size=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(unknown)
    char_tokenizer().save_pretrained(unknown)
    with pytest.raises(CoFiTuneError, match=r"'mamba' .* no attention or feed-forward layer"):
        run_cli(["--model", str(unknown), "--data", str(data), "--out", out])
    assert main(["importance", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", out]) == 2
    assert "error: `--model`: no folder" in capsys.readouterr().err
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------- distributed


def test_ranks_share_the_data_and_reduce(tok, monkeypatch):
    """Two ranks simulated in one process: rank 1 runs first and its packed sums are added in rank 0's all-reduce."""
    import torch.distributed as dist

    model = tiny_model("llama", num_layers=2)
    expected = raw(model, TEXTS, tok, batch_size=1)
    packed = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda t: packed.setdefault(1, t.clone()))
    partial = _estimate_raw(model, TEXTS, tokenizer=tok, batch_size=1, progress=False)
    assert partial.num_samples == len(TEXTS) // 2
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(packed[1]))
    combined = _estimate_raw(model, TEXTS, tokenizer=tok, batch_size=1, progress=False)
    assert combined.num_samples == len(TEXTS)
    assert_raw_equal(expected, combined.parts, rtol=1e-5, atol=0)


def _distributed_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores = raw(tiny_model("llama", num_layers=2), TEXTS, char_tokenizer(), batch_size=1)
        torch.save(scores, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_distributed_ranks_match_single_process(tmp_path, tok):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = raw(tiny_model("llama", num_layers=2), TEXTS, tok, batch_size=1)
    for rank in range(2):
        assert_raw_equal(expected, torch.load(tmp_path / f"rank{rank}.pt"), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------ other signals, normalisations


def test_fisher_signal_is_the_summed_squared_lm_loss_gradient_per_gate(tok):
    """Fisher of one batch == (d LM-loss / d gate)^2 / tokens, computed by hand with an explicit gate on the FFN."""
    model = tiny_model("llama", seed=3)
    texts = TEXTS[:2]
    got = raw(model, texts, tok, signal="fisher", parts=("intermediate",), batch_size=2)["intermediate"]
    assert got.shape == (8, 48) and (got >= 0).all() and got.sum() > 0
    # By hand: a gate on the input of layer 5's down projection, the LM loss summed over predicted tokens.
    enc = tok(texts, return_tensors="pt", padding=True)
    gate = torch.ones(48, requires_grad=True)
    down = model.model.layers[5].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, args: (args[0] * gate,))
    try:
        logits = model(**enc).logits
        targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, gate)
    finally:
        handle.remove()
    torch.testing.assert_close(got[5], grad.square() / enc["attention_mask"].sum(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batches_sum_to_the_batch_gradient(tok, micro):
    """`micro_batch_size` is a memory knob: the slices' gradients add up to the batch's before it is squared (Fisher,
    no dropout: exact) or accumulated; per-slice squares would differ."""
    model = tiny_model("llama", num_layers=2, seed=1)
    whole = raw(model, TEXTS, tok, signal="fisher", batch_size=3)
    sliced = raw(model, TEXTS, tok, signal="fisher", batch_size=3, micro_batch_size=micro)
    assert_raw_equal(whole, sliced, rtol=1e-4, atol=1e-9)
    per_example = raw(model, TEXTS, tok, signal="fisher", batch_size=1)
    assert not torch.allclose(per_example["intermediate"], whole["intermediate"], rtol=1e-3)
    # The KL proxy in slices: the same shapes and scale (its dropout draws differ, as with another seed).
    kl_whole = raw(model, TEXTS, tok, batch_size=3)
    kl_sliced = raw(model, TEXTS, tok, batch_size=3, micro_batch_size=micro)
    for part, value in kl_whole.items():
        assert kl_sliced[part].shape == value.shape and torch.isfinite(kl_sliced[part]).all()
        ratio = float(kl_sliced[part].abs().sum() / value.abs().sum())
        assert 0.2 < ratio < 5


def test_fisher_and_kl_rank_units_differently_but_both_normalise(tok):
    model = tiny_model("llama", seed=3)
    kl = estimate_importance(model, TEXTS, tokenizer=tok, progress=False, batch_size=3)
    fisher = estimate_importance(model, TEXTS, tokenizer=tok, progress=False, batch_size=3, signal="fisher")
    assert fisher.metadata["signal"] == "fisher" and kl.metadata["signal"] == "kl"
    assert not torch.equal(kl.intermediate, fisher.intermediate)
    assert float(fisher.intermediate.min()) >= 0 and float(fisher.intermediate.max()) < 1


def test_one_sided_normalisation_protects_only_units_above_their_layer_mean():
    raw_scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    two = Importance(intermediate=raw_scores).intermediate[0]
    one = Importance(intermediate=raw_scores, normalization="one_sided").intermediate[0]
    assert torch.equal(one[:3], torch.zeros(3))  # at or below the mean: no protection
    torch.testing.assert_close(one[3:], two[3:])  # above it: as the authors' |tanh(z)|
    assert two[0] == two[4] > 0  # the authors' form protects the lowest unit as much as the highest


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"signal": "ewc"}, "`signal`"), ({"normalization": "x"}, "`normalization`")]
)
def test_unknown_signal_or_normalisation_is_refused(tok, kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        estimate_importance(tiny_model("llama"), TEXTS, tokenizer=tok, progress=False, **kwargs)
