"""Caches that cannot run code: the state file format, and the comparison and the search refusing pickles by name.

Each refusal is tested with a booby-trapped pickle: loading it would create a marker file. The tests check that the
trap is real (a plain `torch.load` fires it) and that cofitune-peft raises instead of loading it.
"""

from __future__ import annotations

import math
import os
import pickle
import re

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneError, Importance
from cofitune_peft.kit.compare import EvalSplit, compare_methods
from cofitune_peft.kit.evaluation import VersatilityEval
from cofitune_peft.kit.search import search_layers
from cofitune_peft.kit.state_file import load_state, save_state

GENERAL = [
    "The river runs through the old town and past the mill.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "A library keeps books, maps and old newspapers for readers.",
    "Mountains rise to the north of the valley, snow on the peaks.",
]
TRAIN = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10, 13) for b in range(20, 22)]


class _Trap:
    """Unpickling this calls `open(marker, "w")`, which creates the marker file: any code could run instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def booby_trap(path, marker, *, with_torch: bool = True) -> None:
    """Write a pickle to `path` that creates `marker` when loaded (torch.save's zip format, or a bare pickle)."""
    if with_torch:
        torch.save({"fingerprint": "x", "top_logp": [_Trap(str(marker))]}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"fingerprint": "x", "payload": _Trap(str(marker))}, f)


def test_the_trap_is_real(tmp_path):
    marker = tmp_path / "fired"
    booby_trap(tmp_path / "trap.pt", marker)
    torch.load(tmp_path / "trap.pt", weights_only=False)
    assert marker.exists(), "the trap must fire when unpickled, or the tests below prove nothing"


def test_round_trip_keeps_structure_tensors_and_values(tmp_path):
    state = {
        "fingerprint": "abc",
        "top_logp": [torch.randn(3, 4), torch.randn(0, 4)],
        "top_idx": [torch.arange(12, dtype=torch.int32).view(3, 4), torch.zeros(0, 4, dtype=torch.int32)],
        "rest": [torch.rand(3), None],
        "ce": 2.5,
        "tokens": 17,
        "nested": {"flag": True, "items": (1, "two", 3.0), "nan": float("nan"), "inf": float("-inf")},
    }
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    got = load_state(path)
    assert set(got) == set(state)
    for key in ("top_logp", "top_idx"):
        for a, b in zip(got[key], state[key]):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(got["rest"][0], state["rest"][0]) and got["rest"][1] is None
    assert (got["fingerprint"], got["ce"], got["tokens"]) == ("abc", 2.5, 17)
    assert got["nested"]["items"] == [1, "two", 3.0] and got["nested"]["flag"] is True
    assert math.isnan(got["nested"]["nan"]) and got["nested"]["inf"] == float("-inf")
    assert not [p for p in os.listdir(tmp_path) if p != "state.safetensors"], "no temp file is left behind"


def test_a_versatility_reference_survives_the_round_trip(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(num_layers=2)
    vers = VersatilityEval(GENERAL, tokenizer=tok, kl_top_k=8, progress=False)
    vers.prepare(model)
    save_state(vers.reference_state(), tmp_path / "ref.safetensors")
    again = VersatilityEval(GENERAL, tokenizer=tok, kl_top_k=8, progress=False)
    again.load_reference_state(load_state(tmp_path / "ref.safetensors"))
    assert again.evaluate(model) == vers.evaluate(model)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"x": {1, 2}}, r"`state`\['x'\]: a set cannot be stored"),
        ({"x": [object()]}, r"`state`\['x'\]\[0\]: a object cannot be stored"),
        ({"x": {3: 1.0}}, "dict keys must be strings"),
        ({"__tensor__": "t0"}, "reserved for tensors"),
    ],
)
def test_values_that_cannot_be_stored_are_refused(tmp_path, value, match):
    with pytest.raises(CoFiTuneError, match=match):
        save_state(value, tmp_path / "s.safetensors")
    assert not os.listdir(tmp_path), "a refused save writes nothing"


@pytest.mark.parametrize("with_torch", [True, False], ids=["torch.save", "pickle"])
def test_a_pickle_is_refused_unread(tmp_path, with_torch):
    marker, path = tmp_path / "fired", tmp_path / "state.safetensors"
    booby_trap(path, marker, with_torch=with_torch)
    with pytest.raises(CoFiTuneError, match=r"state\.safetensors.*not a safetensors file.*delete it"):
        load_state(path)
    assert not marker.exists()


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "imp.safetensors"
    Importance(heads=torch.rand(2, 4), intermediate=torch.rand(2, 8), output=torch.rand(2, 4)).save(path)
    with pytest.raises(CoFiTuneError, match=r"imp\.safetensors.*format 'cofitune-importance'.*delete it"):
        load_state(path)


# ------------------------------------------------------------------ the comparison and the search


class _Weights:
    """A speciality that moves after any training step (the comparison needs full fine-tuning to move it)."""

    def __init__(self, name: str):
        self.fingerprint = name

    def __call__(self, model, tokenizer) -> float:
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def _compare(tmp_path, tok):
    val = EvalSplit(_Weights("val"), VersatilityEval(GENERAL[:2], tokenizer=tok, kl_top_k=8, progress=False))
    test = EvalSplit(_Weights("test"), VersatilityEval(GENERAL[2:], tokenizer=tok, kl_top_k=8, progress=False))
    return compare_methods(
        lambda: tiny_model(num_layers=2),
        TRAIN,
        tokenizer=tok,
        validation=val,
        test=test,
        output_dir=str(tmp_path),
        methods=["full"],
        learning_rates={"full": (1e-3,)},
        steps=1,
        batch_size=2,
        max_length=16,
        progress=False,
    )


@pytest.mark.parametrize("name", ["reference-validation.pt", "reference-test.safetensors"])
def test_the_comparison_refuses_a_pickled_reference_by_name(tmp_path, name):
    tok = tiny_tokenizer()
    marker = tmp_path / "fired"
    booby_trap(tmp_path / name, marker)
    with pytest.raises(CoFiTuneError, match=re.escape(name) + r".*(pickle|not a safetensors).*rm "):
        _compare(tmp_path, tok)
    assert not marker.exists()


def test_the_comparison_stores_references_as_safetensors_and_follows_its_advice(tmp_path):
    tok = tiny_tokenizer()
    _compare(tmp_path, tok)
    saved = sorted(p.name for p in tmp_path.glob("reference-*"))
    assert saved == ["reference-test.safetensors", "reference-validation.safetensors"]
    assert load_state(tmp_path / "reference-test.safetensors")["fingerprint"]
    # An old cache next to the new ones: refused; deleted as the message says: the run resumes.
    marker = tmp_path / "fired"
    booby_trap(tmp_path / "reference-test.pt", marker)
    with pytest.raises(CoFiTuneError, match=r"reference-test\.pt.*pickle.*Delete it"):
        _compare(tmp_path, tok)
    os.remove(tmp_path / "reference-test.pt")
    _compare(tmp_path, tok)
    assert not marker.exists()


def _search(tmp_path, tok):
    return search_layers(
        lambda: tiny_model(num_layers=4),
        TRAIN,
        speciality=lambda m, t: 0.5,
        versatility=VersatilityEval(GENERAL, tokenizer=tok, kl_top_k=8, progress=False),
        tokenizer=tok,
        budget_steps=1,
        output_dir=str(tmp_path),
        windows=[(0, 2)],
        levels=("window",),
        full_reference={"speciality": 1.0, "versatility": 0.5},
        batch_size=2,
        max_length=16,
        progress=False,
    )


@pytest.mark.parametrize("name", ["versatility_reference.pt", "versatility_reference.safetensors"])
def test_the_search_refuses_a_pickled_reference_by_name(tmp_path, name):
    tok = tiny_tokenizer()
    marker = tmp_path / "fired"
    booby_trap(tmp_path / name, marker, with_torch=name.endswith(".pt"))
    with pytest.raises(CoFiTuneError, match=re.escape(name) + r".*(pickle|not a safetensors).*rm "):
        _search(tmp_path, tok)
    assert not marker.exists()


def test_the_search_stores_its_reference_as_safetensors(tmp_path):
    tok = tiny_tokenizer()
    _search(tmp_path, tok)
    assert load_state(tmp_path / "versatility_reference.safetensors")["fingerprint"]
    assert not list(tmp_path.glob("*.pt"))


def test_the_corda_cache_is_safetensors_and_a_pickled_one_is_refused(tmp_path, monkeypatch):
    from peft.tuners.lora import corda

    from cofitune_peft.kit.compare import MethodSettings
    from cofitune_peft.kit.compare.methods import build_corda_kpm

    tok = tiny_tokenizer()
    settings = MethodSettings(
        general_texts=GENERAL, tokenizer=tok, lora_rank=2, corda_samples=4, cache_dir=str(tmp_path)
    )
    first = build_corda_kpm(tiny_model(num_layers=2), settings)
    (cached,) = tmp_path.glob("corda_kpm-*")
    assert cached.suffix == ".safetensors" and load_state(cached)
    assert first.peft_config["default"].corda_config.cache_file is None

    def no_covariance(*args, **kwargs):
        raise AssertionError("the cached decomposition was computed again")

    monkeypatch.setattr(corda, "calib_cov_distribution", no_covariance)
    second = build_corda_kpm(tiny_model(num_layers=2), settings)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    marker = tmp_path / "fired"
    booby_trap(cached.with_suffix(".pt"), marker)
    with pytest.raises(CoFiTuneError, match=r"corda_kpm-.*\.pt.*CorDA cache as a pickle.*Delete it"):
        build_corda_kpm(tiny_model(num_layers=2), settings)
    assert not marker.exists()
