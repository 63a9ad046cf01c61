"""HarnessVersatility: lm-evaluation-harness tasks as versatility retention, offline on local task files."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneError

pytest.importorskip("lm_eval")

from cofitune_peft.kit.evaluation.harness import HarnessVersatility, pick_metric

ROWS = [
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "label": 0},
    {"question": "Capital of Italy?", "choices": ["Paris", "Rome", "Oslo"], "label": 1},
    {"question": "Capital of Norway?", "choices": ["Paris", "Rome", "Oslo"], "label": 2},
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1},
]


def _write_tasks(folder, rows=ROWS):
    data = folder / "data.json"
    data.write_text(json.dumps(rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture
def tasks_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    return _write_tasks(folder)


def test_base_model_retention_is_one_and_training_moves_it(tasks_dir):
    tok = tiny_tokenizer()
    base = tiny_model(num_layers=2)
    vers = HarnessVersatility(["tiny_mc"], include_path=tasks_dir, include_defaults=False, tokenizer=tok, batch_size=4)
    ref = vers.prepare(base)
    assert 0.0 <= ref["tiny_mc"] <= 1.0
    if ref["tiny_mc"] == 0:
        pytest.skip("the random model scores 0 on the tiny task")
    out = vers.evaluate(base)
    assert out["score"] == pytest.approx(1.0)
    assert out["metric_names"] == {"tiny_mc": "acc,none"}
    # The same numbers as lm-eval's own log-likelihood ranking: a model whose weights moved scores differently or
    # equally, but always through the harness (retention = accuracy / base accuracy).
    moved = tiny_model(num_layers=2, seed=3)
    out = vers.evaluate(moved)
    assert out["score"] == pytest.approx(out["metrics"]["tiny_mc"] / ref["tiny_mc"])


def test_generate_until_task_and_peft_model(tasks_dir):
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model(num_layers=2), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    vers = HarnessVersatility(
        ["tiny_gen", "tiny_mc"], include_path=tasks_dir, include_defaults=False, tokenizer=tok, batch_size=4
    )
    model.train()
    raw = vers.run(model)
    assert raw["tiny_gen"]["metric"] == "exact_match,none"
    assert 0.0 <= raw["tiny_gen"]["value"] <= 1.0
    assert model.training  # the mode the model came in


def test_reference_state_round_trip_and_changed_task_refused(tasks_dir):
    tok = tiny_tokenizer()
    vers = HarnessVersatility(["tiny_mc"], include_path=tasks_dir, include_defaults=False, tokenizer=tok)
    vers.reference = {"fingerprint": vers.fingerprint, "tiny_mc": 0.5}
    state = vers.reference_state()
    other = HarnessVersatility(["tiny_mc"], include_path=tasks_dir, include_defaults=False, tokenizer=tok)
    other.load_reference_state(state)
    assert other.reference["tiny_mc"] == 0.5
    (tasks_dir / "data.json").write_text(json.dumps(ROWS[:2]))  # the data changed: another fingerprint
    changed = HarnessVersatility(["tiny_mc"], include_path=tasks_dir, include_defaults=False, tokenizer=tok)
    with pytest.raises(CoFiTuneError, match="other tasks or settings"):
        changed.load_reference_state(state)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(CoFiTuneError, match="`tasks` is empty"):
        HarnessVersatility([])
    with pytest.raises(CoFiTuneError, match="`include_path`"):
        HarnessVersatility(["x"], include_path=tmp_path / "missing")
    with pytest.raises(CoFiTuneError, match="not in `tasks`"):
        HarnessVersatility(["x"], weights={"y": 1.0})
    with pytest.raises(CoFiTuneError, match="prepare"):
        HarnessVersatility(["x"]).evaluate(torch.nn.Linear(2, 2))


def test_pick_metric():
    results = {"alias": "t", "acc,none": 0.25, "acc_stderr,none": 0.1, "exact_match,strict": 0.5}
    assert pick_metric(results) == ("acc,none", 0.25)
    assert pick_metric(results, "exact_match") == ("exact_match,strict", 0.5)
    with pytest.raises(CoFiTuneError, match="none of them"):
        pick_metric(results, "f1")
