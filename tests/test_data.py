"""Offline data sets: determinism, disjoint splits, the answer extractor, probe columns, TRL formats."""

from __future__ import annotations

import doctest
import re

import pytest
from datasets import disable_progress_bars
from trl.data_utils import is_conversational

from cofitune_peft import CoFiTuneError
from cofitune_peft.kit import data
from cofitune_peft.kit.data import (
    answer_matches,
    arithmetic_task,
    capital_probes,
    extract_number,
    general_texts,
    to_messages,
)
from cofitune_peft.kit.evaluation import answers_match

disable_progress_bars()


# --- arithmetic ------------------------------------------------------------------------------------------------------


def test_arithmetic_is_deterministic_under_seed():
    a = arithmetic_task(n_train=50, n_test=10, seed=3)
    b = arithmetic_task(n_train=50, n_test=10, seed=3)
    c = arithmetic_task(n_train=50, n_test=10, seed=4)
    assert a[0].to_dict() == b[0].to_dict() and a[1].to_dict() == b[1].to_dict()
    assert a[1]["prompt"] != c[1]["prompt"]


def test_arithmetic_test_set_does_not_depend_on_n_train():
    assert arithmetic_task(n_train=10, n_test=20)[1].to_dict() == arithmetic_task(n_train=500, n_test=20)[1].to_dict()


def _operands(prompt: str) -> tuple[str, int, int]:
    a, op, b = re.fullmatch(r"What is (\d+) (\S) (\d+)\?", prompt).groups()
    return op, int(a), int(b)


@pytest.mark.parametrize("ops", [("+", "-"), ("*",), ("+", "-", "*")])
def test_arithmetic_train_test_disjoint_even_for_commutative_twins(ops):
    train, test = arithmetic_task(n_train=3000, n_test=300, seed=0, ops=ops)
    assert len(train) == 3000 and len(test) == 300
    assert not set(train["prompt"]) & set(test["prompt"])
    assert len(set(train["prompt"])) == len(train)

    def key(prompt):
        op, a, b = _operands(prompt)
        return (op, *sorted((a, b))) if op in "+×" else (op, a, b)

    assert not {key(p) for p in train["prompt"]} & {key(p) for p in test["prompt"]}


@pytest.mark.parametrize("style", ["equation", "answer"])
@pytest.mark.parametrize("allow_negative", [False, True])
def test_arithmetic_answers_are_correct_and_extractable(style, allow_negative):
    train, _ = arithmetic_task(
        n_train=400, n_test=0, ops=("+", "-", "*"), completion_style=style, allow_negative=allow_negative
    )
    assert train.column_names == ["prompt", "completion", "answer"]
    negatives = 0
    for row in train:
        op, a, b = _operands(row["prompt"])
        expected = {"+": a + b, "-": a - b, "×": a * b}[op]
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert row["answer"] == str(expected)
        assert extract_number(row["completion"]) == row["answer"]
        negatives += expected < 0
    assert (negatives > 0) == allow_negative


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 9000, "n_test": 10}, r"`n_train` \+ `n_test` must be at most 8190"),
        ({"ops": ("/",)}, "`ops`"),
        ({"ops": ()}, "`ops`"),
        ({"digits": 4}, "`digits`"),
        ({"completion_style": "cot"}, "`completion_style`"),
        ({"n_test": -1}, "`n_test`"),
    ],
)
def test_arithmetic_bad_input(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        arithmetic_task(**kwargs)


# --- extractor -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("85", "85"),
        ("47 + 38 = 85", "85"),
        ("The answer is 85.", "85"),
        ("The answer is **85**.", "85"),
        ("Answer: 85", "85"),
        ("-35", "-35"),
        ("12 - 47 = -35", "-35"),
        ("The result is −35.", "-35"),  # Unicode minus
        ("47-38", "38"),  # a hyphen after a digit is subtraction, not a sign
        ("1,234", "1234"),
        ("The answer is 1,234,567.", "1234567"),
        ("85.0", "85"),
        ("3.50", "3.5"),
        ("007", "7"),
        ("-0", "0"),
        ("The answer is 85, since 47 + 38 = 85 and 2 + 2 = 4.", "85"),  # "answer is" wins over "="
        ("To add 92 and 30, we first", "30"),  # last number: the model has not answered
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_rejects_non_strings():
    with pytest.raises(CoFiTuneError, match="`text`"):
        extract_number(85)


# --- TRL formats -----------------------------------------------------------------------------------------------------


def test_to_messages_prompt_completion_matches_trl():
    train, _ = arithmetic_task(n_train=6, n_test=0)
    chat = to_messages(train)
    assert sorted(chat.column_names) == ["answer", "completion", "prompt"]
    for row, original in zip(chat, train):
        assert is_conversational(row)
        assert row["prompt"] == [{"role": "user", "content": original["prompt"]}]
        assert row["completion"] == [{"role": "assistant", "content": original["completion"]}]
    # TRL's prompt-completion branch in SFTTrainer concatenates the two message lists.
    assert [m["role"] for m in chat[0]["prompt"] + chat[0]["completion"]] == ["user", "assistant"]


def test_to_messages_messages_style_matches_trl():
    train, _ = arithmetic_task(n_train=6, n_test=0)
    chat = to_messages(train, style="messages")
    # No string 'prompt' left beside 'messages': TRL checks one arbitrary supported key and prefers 'prompt'.
    assert chat.column_names == ["answer", "messages"]
    assert all(is_conversational(row) for row in chat)
    assert [m["role"] for m in chat[0]["messages"]] == ["user", "assistant"]
    assert not is_conversational(train[0])  # the raw data set is TRL's standard (string) prompt-completion type


def test_to_messages_renders_with_a_chat_template():
    """TRL's own template step turns both styles into the same text, the prompt a prefix of the whole."""
    from tiny_models import tiny_tokenizer
    from trl.data_utils import apply_chat_template

    tokenizer = tiny_tokenizer()
    train, _ = arithmetic_task(n_train=3, n_test=0)
    for pc, msg, raw in zip(to_messages(train), to_messages(train, style="messages"), train):
        rendered = apply_chat_template({"prompt": pc["prompt"], "completion": pc["completion"]}, tokenizer)
        assert rendered["prompt"].startswith(f"u:{raw['prompt']}") and rendered["prompt"].endswith("a:")
        assert rendered["completion"].startswith(f"{raw['completion']}</s>")
        assert apply_chat_template({"messages": msg["messages"]}, tokenizer)["text"] == (
            rendered["prompt"] + rendered["completion"]
        )


def test_to_messages_bad_input():
    train, _ = arithmetic_task(n_train=4, n_test=0)
    with pytest.raises(CoFiTuneError, match="`style`"):
        to_messages(train, style="chatml")
    with pytest.raises(CoFiTuneError, match="lacks"):
        to_messages(train.remove_columns("completion"))
    with pytest.raises(CoFiTuneError, match="already conversational"):
        to_messages(to_messages(train))


# --- capitals --------------------------------------------------------------------------------------------------------


def test_capital_probes_short_columns_and_determinism():
    probes = capital_probes(n=40, seed=0)
    assert probes.column_names == ["prompt", "answer", "country", "aliases"]
    assert probes.to_dict() == capital_probes(n=40, seed=0).to_dict()
    assert probes["prompt"] != capital_probes(n=40, seed=1)["prompt"]
    assert len(set(probes["country"])) == 40
    for row in probes:
        assert row["prompt"].startswith("What is the capital of ") and row["prompt"].endswith("?")
        assert row["answer"] and not re.search(r"[();,]", row["answer"].replace(", D.C.", ""))
        assert answer_matches(f"The capital of {row['country']} is {row['answer']}.", [row["answer"], *row["aliases"]])
        # The question never gives the answer away ("What is the capital of Singapore?").
        assert not answer_matches(row["prompt"], row["answer"])


def test_capital_probes_mc_labels_are_valid():
    short = capital_probes(n=60, seed=2)
    mc = capital_probes(n=60, seed=2, kind="mc")
    assert mc.column_names == ["prompt", "answer", "country", "options", "label"]
    assert mc["country"] == short["country"]  # same seed, same countries for both kinds
    labels = set()
    for row in mc:
        assert len(row["options"]) == 4 and len(set(row["options"])) == 4
        assert 0 <= row["label"] < 4 and row["options"][row["label"]] == row["answer"]
        assert row["options"].count(row["answer"]) == 1
        labels.add(row["label"])
    assert labels == {0, 1, 2, 3}  # the answer's position is shuffled


def test_capital_table_is_clean():
    table = data._capital_table(False)
    assert len(table) > 150
    by_country = {country: capital for country, capital, _ in table}
    assert by_country["France"] == "Paris" and by_country["Japan"] == "Tokyo"
    assert "South Africa" not in by_country  # three capitals
    assert "Singapore" not in by_country  # the capital repeats the country's name
    assert len(data._capital_table(True)) > len(table)


def test_capital_prompts_use_articles():
    prompts = set(capital_probes(n=len(data._capital_table(False)), seed=0)["prompt"])
    assert "What is the capital of the United Kingdom?" in prompts
    assert "What is the capital of France?" in prompts


@pytest.mark.parametrize(
    ("text", "answers", "expected"),
    [
        ("The capital of Colombia is Bogota.", ["Bogotá"], True),
        ("bogotá", "Bogota", True),
        ("Parisian cafés", "Paris", False),
        ("The capital is Washington.", ["Washington, D.C.", "Washington"], True),
        ("Port-au-Prince", "Port-Vila", False),
        ("anything", [""], False),
    ],
)
def test_answer_matches(text, answers, expected):
    assert answer_matches(text, answers) is expected
    # one matcher for probes and evaluators: the versatility eval scores short-answer probes with this test
    assert answers_match(text, answers, contains=True) is expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 10_000}, "`n` must be an integer in"),
        ({"n": 0}, "`n`"),
        ({"kind": "open"}, "`kind`"),
    ],
)
def test_capital_probes_bad_input(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        capital_probes(**kwargs)


# --- general text ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["factbook", "pydoc", "all"])
def test_general_splits_are_disjoint(source):
    importance = general_texts(split="importance", source=source)
    evaluation = general_texts(split="eval", source=source)
    assert len(importance) > 50 and len(evaluation) > 50
    assert not set(importance["document"]) & set(evaluation["document"])
    assert not set(importance["text"]) & set(evaluation["text"])
    for split in (importance, evaluation):
        assert len(set(split["text"])) == len(split)  # deduplicated


def test_general_split_membership_does_not_depend_on_seed():
    eval_docs = set(general_texts(split="eval")["document"])
    for seed in range(3):
        assert set(general_texts(n=30, seed=seed, split="eval")["document"]) <= eval_docs
        assert not set(general_texts(n=30, seed=seed, split="importance")["document"]) & eval_docs


def test_general_texts_are_deterministic_and_clean():
    a = general_texts(n=20, seed=5, max_chars=600)
    assert a.to_dict() == general_texts(n=20, seed=5, max_chars=600).to_dict()
    assert a["text"] != general_texts(n=20, seed=6, max_chars=600)["text"]
    assert a.column_names == ["text", "document"]
    for text in general_texts(source="all", max_chars=600)["text"]:
        assert 200 <= len(text) <= 600
        assert not re.search(r"</?[a-z]+[ >]|&[a-z]+;", text)  # no HTML tags or entities
        assert text == text.strip() and "  " not in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 100_000}, "`n` must be None or an integer in"),
        ({"split": "train"}, "`split`"),
        ({"source": "wikipedia"}, "`source`"),
        ({"max_chars": 10}, "`max_chars`"),
        ({"min_chars": 5000}, "`min_chars`"),
    ],
)
def test_general_texts_bad_input(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        general_texts(**kwargs)


# --- documentation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", data.__all__)
def test_docstring_example_runs(name):
    """Each public function's HF-style example (inside a ```python fence) runs as written."""
    docstring = getattr(data, name).__doc__
    source = "\n".join(line for line in docstring.splitlines() if not line.strip().startswith("```"))
    test = doctest.DocTestParser().get_doctest(source, {}, name, None, 0)
    assert test.examples, f"{name} has no runnable example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_word_reversal_is_deterministic_disjoint_and_correct():
    from cofitune_peft.kit.data import word_reversal_task
    from cofitune_peft.kit.evaluation.answers import normalize_answer

    train, test = word_reversal_task(n_train=300, n_test=40, seed=1)
    again = word_reversal_task(n_train=5, n_test=40, seed=1)[1]
    assert test.to_dict() == again.to_dict()  # the test set does not depend on n_train
    assert not set(train["prompt"]) & set(test["prompt"])
    for row in list(train) + list(test):
        words = row["prompt"].split(": ", 1)[1].split()
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words)
        assert row["answer"].split() == words[::-1] == row["completion"].split()
        assert normalize_answer(row["answer"]) == row["answer"]  # no article or punctuation the scorer would drop
    with pytest.raises(CoFiTuneError, match="min_words"):
        word_reversal_task(min_words=1)
    with pytest.raises(CoFiTuneError, match="n_train"):
        word_reversal_task(n_train=-1)
