"""The knowledge task, the chemical-symbol probes, probe splits and the replay pool: offline data of the comparison."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneError
from cofitune_peft.kit.data import knowledge_task, probe_splits
from cofitune_peft.kit.data.elements import AMBIGUOUS_SYMBOLS, ELEMENTS, element_table
from cofitune_peft.kit.data.knowledge import attributes
from cofitune_peft.kit.data.replay import (
    complete_sentences,
    replay_instructions,
    replay_pool,
    states_probed_fact,
)
from cofitune_peft.kit.evaluation import SpecialityEval, token_match


def test_knowledge_task_is_deterministic_and_teaches_every_asked_fact():
    train, held = knowledge_task(n_people=12, n_test=40, seed=3)
    again_train, again_held = knowledge_task(n_people=12, n_test=40, seed=3)
    assert train["prompt"] == again_train["prompt"] and held["prompt"] == again_held["prompt"]
    assert len(train) == 12 * 4 * 3 and len(held) == 40
    assert knowledge_task(n_people=12, n_test=40, seed=4)[1]["prompt"] != held["prompt"]
    taught = set(train["completion"])
    for row in held:
        assert row["completion"] in taught  # the fact was taught, in these very words
        assert row["answer"] in row["completion"] and row["answer"] not in row["rejected"]
        assert row["match"] == "contains" and row["person"] in row["prompt"]
    # one question per fact: splitting the held-out list anywhere gives disjoint facts
    facts = [(r["person"], r["attribute"]) for r in held]
    assert len(set(facts)) == len(facts)


def test_knowledge_validation_takes_unused_facts_first_then_other_paraphrases():
    _, held = knowledge_task(n_people=5, n_test=12, n_validation=16)  # 20 facts: 8 unused, then 8 test facts again
    validation, test = held.select(range(16)), held.select(range(16, 28))
    assert not set(validation["prompt"]) & set(test["prompt"])  # no question in both
    val_facts = [(r["person"], r["attribute"]) for r in validation]
    test_facts = {(r["person"], r["attribute"]) for r in test}
    assert len(set(val_facts)) == 16 and len(test_facts) == 12
    assert not set(val_facts[:8]) & test_facts and set(val_facts[8:]) <= test_facts
    _, disjoint = knowledge_task(n_people=5, n_test=12, n_validation=8)
    assert not {(r["person"], r["attribute"]) for r in disjoint.select(range(8))} & {
        (r["person"], r["attribute"]) for r in disjoint.select(range(8, 20))
    }


def test_knowledge_questions_are_paraphrases_never_used_in_training():
    train, held = knowledge_task(n_people=20, n_test=80)
    train_templates = {t for kind in attributes() for t in kind.train}
    held_templates = {t for kind in attributes() for t in kind.held_out}
    assert not train_templates & held_templates
    assert not set(train["prompt"]) & set(held["prompt"])
    for row in held:
        assert any(t.format(name=row["person"]) == row["prompt"] for t in held_templates)


def test_knowledge_towns_are_made_up():
    _, held = knowledge_task(n_people=50, n_test=200)
    towns = {r["answer"] for r in held if r["attribute"] == "town"}
    real = {name.lower() for _, _, name in ELEMENTS}
    assert towns and not {t.lower() for t in towns} & real


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_people": 0}, "`n_people`"),
        ({"n_people": 2, "n_test": 9}, "`n_test` and `n_validation` must each be at most 8"),
        ({"n_people": 2, "n_validation": 9, "n_test": 1}, "must each be at most 8"),
        ({"phrasings": 4}, "`phrasings`"),
        ({"n_towns": 1}, "`n_towns`"),
    ],
)
def test_knowledge_task_bad_input(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        knowledge_task(**kwargs)


@pytest.mark.parametrize(
    "reply, correct",
    [
        ("Ilsa Varnow lives in Korrath.", True),
        ("ilsa varnow lives in KORRATH", True),
        ("She lives in Korrath, near Beldor.", False),  # another town of the task: rejected
        ("Korrath, Beldor or Tavenna.", False),  # listing every value is not an answer
        ("Ilsa Varnow lives in Korrathia.", False),  # whole words only
        ("I do not know.", False),
    ],
)
def test_the_knowledge_matcher_accepts_a_correct_sentence_and_nothing_else(monkeypatch, reply, correct):
    from cofitune_peft.kit.evaluation import speciality

    item = {"prompt": "Where does Ilsa Varnow live?", "answer": "Korrath", "rejected": ["Beldor", "Tavenna"]}
    monkeypatch.setattr(speciality, "generate_answers", lambda *a, **k: [reply])
    spec = SpecialityEval.exact_match(
        [item], tokenizer=tiny_tokenizer(), numeric=False, match="contains", progress=False
    )
    assert spec.evaluate(object())["score"] == float(correct)


def test_first_line_and_token_match_per_item(monkeypatch):
    from cofitune_peft.kit.evaluation import speciality

    items = [
        {"prompt": "Q: capital of Peru?", "answer": "Lima", "first_line": True},
        {"prompt": "Q: symbol of gold?", "answer": "Au", "match": "token"},
        {"prompt": "Q: symbol of hydrogen?", "answer": "H", "match": "token"},
    ]
    replies = [" Lima\nQuestion: capital of Chile?\nAnswer: Santiago", "The symbol of gold is Au.", "Water is H2O."]
    monkeypatch.setattr(speciality, "generate_answers", lambda *a, **k: list(replies))
    spec = SpecialityEval.exact_match(items, tokenizer=tiny_tokenizer(), match="contains", progress=False)
    assert [p["correct"] for p in spec.evaluate(object())["predictions"]] == [True, True, False]
    assert token_match("AU and Aurum", "Au") is False and token_match("(Au)", ["Ag", "Au"]) is True
    with pytest.raises(CoFiTuneError, match="`match` must be one of"):
        SpecialityEval.exact_match([{**items[0], "match": "fuzzy"}])
    with pytest.raises(CoFiTuneError, match="`rejected` must be a list"):
        SpecialityEval.exact_match([{**items[0], "rejected": "Cusco"}])


def test_element_table_and_ambiguous_symbols():
    assert [n for n, _, _ in ELEMENTS] == list(range(1, 119)) and len({s for _, s, _ in ELEMENTS}) == 118
    symbols = {s for _, s in element_table()}
    assert not symbols & AMBIGUOUS_SYMBOLS and len(symbols) == 118 - len(AMBIGUOUS_SYMBOLS)


def test_probe_splits_are_disjoint_sized_and_mixed():
    splits = probe_splits({"validation": 80, "test": 120}, seed=1)
    subjects = {name: {p["subject"] for p in probes} for name, probes in splits.items()}
    assert not subjects["validation"] & subjects["test"]
    for name, n in (("validation", 80), ("test", 120)):
        probes = splits[name]
        short = [p for p in probes if "options" not in p]
        mc = [p for p in probes if "options" in p]
        assert len(short) == len(mc) == n and {p["subject"] for p in short} == {p["subject"] for p in mc}
        sources = {p["source"] for p in probes}
        assert sources == {"capitals", "elements"}
        for p in mc:
            assert p["options"][p["label"]] == p["answer"] and len(set(p["options"])) == 4
        assert all(p.get("match") == "token" for p in short if p["source"] == "elements")
    assert probe_splits({"validation": 80, "test": 120}, seed=1) == splits
    with pytest.raises(CoFiTuneError, match="`sizes` must hold positive ints"):
        probe_splits({"validation": 200, "test": 200})


def test_replay_instructions_and_filters():
    instructions = replay_instructions(64, seed=2)
    assert len(set(instructions)) == 64 and instructions == replay_instructions(64, seed=2)
    assert not any(word in " ".join(instructions).lower() for word in ("capital", "country", "element", "symbol"))
    assert complete_sentences("First one. Second is cut") == "First one."
    assert complete_sentences("no end here") is None
    assert complete_sentences("It helps. Here are two:\n\n1.") == "It helps."  # a list number ends nothing
    probes = [
        {"subject": "France", "answer": "Paris", "aliases": []},
        {"subject": "Gold", "answer": "Au", "match": "token"},
    ]
    assert states_probed_fact("Paris is the capital of France.", probes)
    assert not states_probed_fact("Paris is lovely in spring.", probes)  # the answer alone states no fact
    assert states_probed_fact("Gold has the symbol Au.", probes) and not states_probed_fact("Gold is shiny.", probes)
    with pytest.raises(CoFiTuneError, match="`n` must be an int"):
        replay_instructions(0)


def test_replay_pool_on_a_tiny_model(monkeypatch):
    from cofitune_peft.kit import evaluation

    replies = iter(["Knead it well. Then let it rise for", "Paris is the capital of France.", "no sentence", "Ok!"])
    monkeypatch.setattr(evaluation, "generate_answers", lambda m, t, prompts, **k: [next(replies) for _ in prompts])
    probes = [{"subject": "France", "answer": "Paris", "aliases": []}]
    pool = replay_pool(tiny_model(), tiny_tokenizer(), n=4, exclude=probes, progress=False)
    assert [x["completion"] for x in pool] == ["Knead it well.", "Ok!"]
    assert all(x["prompt"] in replay_instructions(4) for x in pool)
