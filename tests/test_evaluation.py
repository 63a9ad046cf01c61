"""Speciality / versatility scorers and the Spec. / Vers. / Uni. formulas, on hand-checked cases and tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from cofitune_peft import CoFiTuneError
from cofitune_peft.kit.evaluation import (
    SpecialityEval,
    VersatilityEval,
    answers_match,
    extract_number,
    first_line,
    generate_answers,
    normalize_answer,
    option_logprobs,
    speciality_score,
    unified_score,
    versatility_score,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(chat: bool = False):
    """A character-level tokenizer whose ids fit the tiny models' 128-token vocabulary (ids 0-3 are special)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [*map(chr, range(32, 127)), "\n"]:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


GENERAL = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Python is a programming language that lets you work quickly.",
    "Water boils at one hundred degrees at sea level.",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on 2 shared cores a second one cost up to 7x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the formulas, by hand


def test_speciality_score_is_gain_relative_to_full_fine_tuning():
    assert speciality_score(tuned=0.5, base=0.1, full=0.9) == pytest.approx(0.5)
    assert speciality_score(tuned=0.9, base=0.1, full=0.9) == pytest.approx(1.0)
    assert speciality_score(tuned=0.1, base=0.1, full=0.9) == 0.0
    assert speciality_score(tuned=1.0, base=0.2, full=0.6) == pytest.approx(2.0)  # beats full FT
    assert speciality_score(tuned=0.0, base=0.2, full=0.6) == pytest.approx(-0.5)  # lost speciality
    with pytest.raises(CoFiTuneError, match=r"Spec\. is undefined"):
        speciality_score(tuned=0.4, base=0.3, full=0.3)


def test_versatility_and_unified_scores():
    assert versatility_score(tuned=0.6, base=0.8) == pytest.approx(0.75)
    assert versatility_score(tuned=0.8, base=0.8) == 1.0
    with pytest.raises(CoFiTuneError, match=r"Vers\. is undefined"):
        versatility_score(tuned=0.5, base=0.0)
    assert unified_score(0.8, 0.9) == pytest.approx(0.85)
    assert unified_score(0.8, 0.9, weight=0.25) == pytest.approx(0.25 * 0.8 + 0.75 * 0.9)
    assert unified_score(0.8, 0.9, weight=1.0) == pytest.approx(0.8)
    for bad in (-0.1, 1.5):
        with pytest.raises(CoFiTuneError, match="`weight` must lie in"):
            unified_score(0.8, 0.9, weight=bad)


def test_answer_matching():
    assert extract_number("47 + 38 = 85.") == "85"
    assert extract_number("It is 1,234 apples") == "1234"
    assert extract_number("-3.5 degrees") == "-3.5"
    assert extract_number("no digits") is None
    assert first_line("\n  Paris\nFrance") == "Paris"
    assert normalize_answer("  The  Paris. ") == "paris"
    assert normalize_answer("3.5") == "3.5"
    assert answers_match("85.0", "85", numeric=True)
    assert not answers_match("84", "85", numeric=True)
    assert not answers_match("abc", "85", numeric=True)
    assert answers_match("paris!", "Paris", numeric=False)
    assert not answers_match(None, "Paris")
    assert answers_match("rome", ["Roma", "Rome"])  # accepted aliases
    assert answers_match("The capital of Colombia is Bogota.", ["Bogotá"], contains=True)  # accents ignored
    assert not answers_match("Parisian cafés are famous.", "Paris", contains=True)  # whole words only
    assert not answers_match("The capital of Colombia is Bogota.", ["Bogotá"])  # exact: the whole reply


# ------------------------------------------------------------------ speciality


class ScriptedLM(nn.Module):
    """Answers each prompt from a dict (after the left padding), as a generating model would."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer = tokenizer
        self.answers = answers
        self.anchor = nn.Parameter(torch.zeros(1))
        self.batches = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.batches.append(input_ids.shape[0])
        assert bool((attention_mask[:, -1] == 1).all()), "prompts must be left-padded"
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            rows.append(self.tokenizer(self.answers[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tokenizer.eos_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_counts_by_hand_with_batching_and_extraction():
    tok = char_tokenizer()
    examples = [
        {"prompt": "What is 47 + 38?", "answer": "85"},
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": "What is 10 + 5?", "answer": "15"},
        {"prompt": "Capital of France?", "answer": "Paris"},
        {"prompt": "Capital of Italy?", "completion": "Rome"},
    ]
    model = ScriptedLM(
        tok,
        {
            "What is 47 + 38?": "47 + 38 = 85",  # last number: correct
            "What is 2 + 2?": "4.0",  # numeric match: correct
            "What is 10 + 5?": "16",  # wrong
            "Capital of France?": "paris.\nAnd more",  # first line, normalised: correct
            "Capital of Italy?": "Milan",  # wrong
        },
    )
    ev = SpecialityEval.exact_match(examples, tokenizer=tok, batch_size=2, progress=False)
    out = ev.evaluate(model)
    assert (out["correct"], out["total"], out["score"]) == (3, 5, 0.6)
    assert [p["correct"] for p in out["predictions"]] == [True, True, False, True, False]
    assert model.batches == [2, 2, 1]
    assert ev(model) == 0.6
    # a custom extractor replaces the defaults
    custom = SpecialityEval.exact_match(examples[:2], tokenizer=tok, answer_extractor=lambda t: t[-2:], progress=False)
    assert custom(model) == 0.5
    # "contains": the answer (or an alias) as whole words anywhere in the reply
    chatty = ScriptedLM(tok, {"Capital of France?": "It is Paris.", "Capital of Italy?": "Roma, of course"})
    items = [examples[3], {**examples[4], "aliases": ["Roma"]}]
    assert SpecialityEval.exact_match(items, tokenizer=tok, progress=False)(chatty) == 0.0
    assert SpecialityEval.exact_match(items, tokenizer=tok, match="contains", progress=False)(chatty) == 1.0
    with pytest.raises(CoFiTuneError, match="`match` must be"):
        SpecialityEval.exact_match(items, match="fuzzy")


def test_generation_is_the_same_batched_and_alone():
    tok, model = char_tokenizer(), tiny_model("llama")
    prompts = ["What is 2 + 3?", "Hi", "A longer prompt here"]
    alone = [generate_answers(model, tok, [p], max_new_tokens=4, progress=False)[0] for p in prompts]
    batched = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=3, progress=False)
    assert batched == alone


def test_multiple_choice_log_likelihood_matches_a_manual_sum():
    tok, model = char_tokenizer(), tiny_model("llama")
    prompts, options = ["2 + 3 =", "Sky is"], [["5", "6", "55"], ["blue", "green"]]
    got = option_logprobs(model, tok, prompts, options, batch_size=2, progress=False)
    for prompt, opts, scores in zip(prompts, options, got):
        for option, score in zip(opts, scores):
            p_ids = tok(prompt)["input_ids"]
            o_ids = tok(" " + option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + o_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            manual = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(o_ids))
            assert score == pytest.approx(manual, abs=1e-4)
    examples = [
        {"prompt": prompts[0], "options": options[0], "answer": "5"},
        {"prompt": prompts[1], "options": options[1], "answer": 1},
    ]
    out = SpecialityEval.multiple_choice(examples, tokenizer=tok, progress=False).evaluate(model)
    chosen = [max(range(len(s)), key=s.__getitem__) for s in got]
    assert out["score"] == ((chosen[0] == 0) + (chosen[1] == 1)) / 2
    assert [p["chosen"] for p in out["predictions"]] == chosen


def test_speciality_bad_inputs():
    tok = char_tokenizer()
    with pytest.raises(CoFiTuneError, match="eval set is empty"):
        SpecialityEval.exact_match([], tokenizer=tok)
    with pytest.raises(CoFiTuneError, match="needs `prompt` and `answer`"):
        SpecialityEval.exact_match([{"question": "x"}], tokenizer=tok)
    with pytest.raises(CoFiTuneError, match="needs `options`"):
        SpecialityEval.multiple_choice([{"prompt": "x", "answer": "a"}], tokenizer=tok)
    with pytest.raises(CoFiTuneError, match="must be an option or its index"):
        SpecialityEval.multiple_choice([{"prompt": "x", "options": ["a", "b"], "answer": "c"}], tokenizer=tok)
    with pytest.raises(CoFiTuneError, match="`tokenizer` is needed"):
        SpecialityEval.exact_match([{"prompt": "x", "answer": "1"}])(tiny_model("llama"))


def test_fingerprints_hash_the_settings_as_sorted_json():
    """The search keys its cache on these: sha256 of the sorted JSON, 16 hex digits, as before the kit shared one."""
    import hashlib
    import json

    examples = [{"prompt": "What is 2 + 3?", "answer": "5"}]
    spec = SpecialityEval.exact_match(examples, answer_extractor=extract_number)
    settings = ["exact_match", None, "exact", 16, False, None]
    payload = json.dumps([examples, settings, "extract_number"], sort_keys=True, default=str)
    assert spec.fingerprint == hashlib.sha256(payload.encode()).hexdigest()[:16]
    vers = VersatilityEval(["some general text"], tokenizer=None)
    payload = json.dumps([["some general text"], [], 256, 256, vers.weights], sort_keys=True, default=str)
    assert vers.fingerprint == hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_chat_template_formats_prompts_for_generation():
    from cofitune_peft.kit.training.encoding import encode_example, render_prompt

    tok = char_tokenizer(chat=True)
    assert render_prompt(tok, "Hi") == "<user>Hi\n<assistant>"
    assert render_prompt(tok, "Hi", chat_template=False) == "Hi"
    ids, labels = encode_example(tok, {"prompt": "Hi", "completion": "42"}, max_length=64)
    assert tok.decode(ids) == "<user>Hi\n<assistant>42\n"
    assert tok.decode([t for t in labels if t != -100]) == "42\n"  # loss on the answer and its end of turn


# ------------------------------------------------------------------ versatility


def perturbed(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "mlp" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_versatility_is_one_for_the_base_model_and_follows_its_formula():
    tok, base = char_tokenizer(), tiny_model("llama")
    probes = [
        {"prompt": "2 + 3 =", "options": ["5", "6"], "answer": 0},
        {"prompt": "Sky is", "options": ["blue", "green"], "answer": 0},
        {"prompt": "Grass is", "options": ["blue", "green"], "answer": 1},
    ]
    ev = VersatilityEval.default(GENERAL, probes, base_model=base, tokenizer=tok, kl_top_k=8, progress=False)
    ref_mc = ev.reference["probes_mc"]
    if ref_mc == 0:  # make the probe set usable whatever the random model prefers
        probes = [{**p, "answer": 1 - p["answer"]} for p in probes]
        ev = VersatilityEval.default(GENERAL, probes, base_model=base, tokenizer=tok, kl_top_k=8, progress=False)
        ref_mc = ev.reference["probes_mc"]
    same = ev.evaluate(base)
    assert same["score"] == 1.0 and same["kl"] == 0.0 and same["ce_increase"] == 0.0
    assert same["components"] == {"ce": 1.0, "kl": 1.0, "probes_mc": 1.0}

    tuned = perturbed(base)
    out = ev.evaluate(tuned)
    expected = {
        "ce": math.exp(-(out["ce"] - out["ce_base"])),
        "kl": math.exp(-out["kl"]),
        "probes_mc": out["probes_mc_accuracy"] / ref_mc,
    }
    assert out["components"] == pytest.approx(expected)
    assert out["score"] == pytest.approx(sum(expected.values()) / 3)
    assert out["kl"] > 0
    # weights: a zero weight drops a measure
    ev.weights["probes_mc"] = 0.0
    assert ev(tuned) == pytest.approx((expected["ce"] + expected["kl"]) / 2)


def test_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_with_top_k():
    tok, base = char_tokenizer(), tiny_model("llama")
    tuned = perturbed(base, scale=0.2)
    exact = VersatilityEval.default(GENERAL, base_model=base, tokenizer=tok, kl_top_k=10_000, progress=False)
    approx = VersatilityEval.default(GENERAL, base_model=base, tokenizer=tok, kl_top_k=8, progress=False)
    manual_kl, manual_ce, count = 0.0, 0.0, 0
    with torch.no_grad():
        for text in GENERAL:
            ids = torch.tensor([tok(text)["input_ids"]])
            p = torch.log_softmax(base(ids).logits[0, :-1], -1)  # [positions, vocab]
            q = torch.log_softmax(tuned(ids).logits[0, :-1], -1)
            manual_kl += float((p.exp() * (p - q)).sum())
            manual_ce += float(-q.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    got = exact.evaluate(tuned)
    assert got["kl"] == pytest.approx(manual_kl / count, rel=1e-4)
    assert got["ce"] == pytest.approx(manual_ce / count, rel=1e-5)
    assert 0 < approx.evaluate(tuned)["kl"] <= got["kl"] + 1e-6


def test_versatility_reference_state_round_trip_and_errors():
    tok, base = char_tokenizer(), tiny_model("llama")
    ev = VersatilityEval.default(GENERAL, tokenizer=tok, progress=False)
    with pytest.raises(CoFiTuneError, match="no base-model reference"):
        ev(base)
    with pytest.raises(CoFiTuneError, match="no reference yet"):
        ev.reference_state()
    ev.prepare(base)
    again = VersatilityEval.default(GENERAL, tokenizer=tok, progress=False)
    again.load_reference_state(ev.reference_state())
    tuned = perturbed(base)
    assert again(tuned) == ev(tuned)
    other = VersatilityEval.default(GENERAL[:2], tokenizer=tok, progress=False)
    with pytest.raises(CoFiTuneError, match="other general texts"):
        other.load_reference_state(ev.reference_state())
    with pytest.raises(CoFiTuneError, match="versatility eval set is empty"):
        VersatilityEval.default([], None, tokenizer=tok)
    with pytest.raises(CoFiTuneError, match="`weights` takes"):
        VersatilityEval.default(GENERAL, tokenizer=tok, weights={"mmlu": 1.0})


def test_base_model_failing_every_probe_warns_and_is_left_out():
    tok, base = char_tokenizer(), tiny_model("llama")
    probes = [{"prompt": "What is 2 + 3?", "answer": "definitely not generated"}]
    with pytest.warns(UserWarning, match="scores 0 on the probes_gen probes"):
        ev = VersatilityEval.default(GENERAL, probes, base_model=base, tokenizer=tok, max_new_tokens=3, progress=False)
    out = ev.evaluate(perturbed(base))
    assert set(out["components"]) == {"ce", "kl"}
