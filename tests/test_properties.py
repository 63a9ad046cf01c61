"""Property tests (hypothesis): every invalid config value is refused, every valid config round-trips through JSON,
and `Importance` normalises, validates and saves any input of the right kind."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance
from cofitune_peft.architectures import ROLES, SHORTHANDS, UNITS
from cofitune_peft.config import SAVE_DTYPES, SOFTMASK_MODES

SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ALLOWED_UNITS = (*UNITS, "head@in", "none")

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=16)
not_str = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2)
)

# ---------------------------------------------------------------------------------------------------------- invalid

bad_element = st.one_of(st.floats(allow_nan=False), st.text(max_size=3), st.none(), st.booleans())
bad_layers = st.one_of(
    # non-int entries
    st.tuples(bad_element, st.integers(0, 64)),
    st.tuples(st.integers(0, 64), bad_element),
    # negative start
    st.integers(-64, -1).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, 64))),
    # reversed or empty window
    st.integers(0, 64).flatmap(lambda b: st.tuples(st.integers(b, 128), st.just(b))),
    # wrong length, as tuple or list
    st.lists(st.integers(0, 64), max_size=5)
    .filter(lambda v: len(v) != 2)
    .flatmap(lambda v: st.sampled_from([v, tuple(v)])),
    # not a sequence at all
    st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=False)),
)
bad_softmask_mode = st.one_of(st.text(max_size=12).filter(lambda s: s not in SOFTMASK_MODES), not_str)
# PEFT's meaning: any valid regex is a selection, so the bad strings are the empty one and broken regexes.
bad_target_modules = st.one_of(
    st.sampled_from(["", "(", "[a", "*x", "a)", "(?P<", "\\"]),
    st.just([]),
    st.lists(st.one_of(st.just(""), st.integers(), st.none()), min_size=1, max_size=3),
    st.lists(names, max_size=2).flatmap(lambda v: st.just([*v, ""])),
    st.one_of(st.integers(), st.floats(allow_nan=False), st.dictionaries(names, names, max_size=2)),
)
bad_parts = st.one_of(
    st.text(max_size=12).filter(lambda s: s not in SHORTHANDS and s not in ROLES),
    st.just([]),
    st.lists(st.one_of(st.just(""), st.integers(), st.none()), min_size=1, max_size=3),
    st.one_of(st.integers(), st.floats(allow_nan=False), st.dictionaries(names, names, max_size=2)),
)
bad_save_dtype = st.one_of(
    st.text(max_size=10).filter(lambda s: s not in SAVE_DTYPES), st.integers(), st.just(torch.float16)
)
bad_unit_map = st.one_of(
    st.just({}),
    st.lists(names, max_size=2),
    names,
    st.dictionaries(names, st.text(max_size=10).filter(lambda u: u not in ALLOWED_UNITS), min_size=1, max_size=3),
)
bad_flag = st.one_of(st.integers(), st.text(max_size=4), st.none())

INVALID = {
    "layers": bad_layers,
    "softmask_mode": bad_softmask_mode,
    "target_modules": bad_target_modules,
    "parts": bad_parts,
    "save_dtype": bad_save_dtype,
    "delta_dtype": bad_save_dtype,
    "unit_map": bad_unit_map,
    "fix_input_grads": bad_flag,
    "init_weights": bad_flag,
    "importance": st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.floats(0, 1), max_size=3)),
}


@SETTINGS
@given(data=st.data(), field_name=st.sampled_from(sorted(INVALID)))
def test_every_invalid_value_is_refused(data, field_name):
    value = data.draw(INVALID[field_name], label=field_name)
    with pytest.raises(CoFiTuneError) as err:
        CoFiTuneConfig(**{field_name: value})
    assert f"`{field_name}" in str(err.value), str(err.value)


@SETTINGS
@given(data=st.data())
def test_several_invalid_values_are_all_reported(data):
    chosen = data.draw(st.lists(st.sampled_from(sorted(INVALID)), min_size=2, max_size=4, unique=True))
    kwargs = {name: data.draw(INVALID[name], label=name) for name in chosen}
    with pytest.raises(CoFiTuneError) as err:
        CoFiTuneConfig(**kwargs)
    for name in chosen:
        assert f"`{name}" in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("value", [("up", 1), {"down", 2}, (None, "q")], ids=["tuple", "set", "tuple-none"])
def test_mixed_target_modules_tuple_is_refused(value):
    with pytest.raises(CoFiTuneError, match="target_modules"):
        CoFiTuneConfig(target_modules=value)


# ---------------------------------------------------------------------------------------------------------- valid

window = st.integers(0, 63).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, 64)))
valid = st.fixed_dictionaries(
    {},
    optional={
        "layers": st.one_of(st.none(), window, window.map(list)),
        "target_modules": st.one_of(
            st.none(),
            st.sampled_from(sorted(SHORTHANDS)),
            st.sampled_from(ROLES),
            st.lists(st.sampled_from(ROLES), min_size=1, max_size=4, unique=True),
            st.lists(names, min_size=1, max_size=3, unique=True),
        ),
        "softmask_mode": st.sampled_from(SOFTMASK_MODES),
        "unit_map": st.one_of(
            st.none(), st.dictionaries(names, st.sampled_from(ALLOWED_UNITS), min_size=1, max_size=3)
        ),
        "layers_pattern": st.one_of(st.none(), names),
        "save_dtype": st.one_of(st.none(), st.sampled_from(SAVE_DTYPES)),
        "delta_dtype": st.one_of(st.none(), st.sampled_from(SAVE_DTYPES)),
        "fix_input_grads": st.booleans(),
        "init_weights": st.booleans(),
        "modules_to_save": st.one_of(st.none(), st.lists(names, min_size=1, max_size=2)),
        "importance_source": st.one_of(st.none(), st.text(max_size=20)),
        "inference_mode": st.booleans(),
        "base_model_name_or_path": st.one_of(st.none(), names),
        "revision": st.one_of(st.none(), names),
        "task_type": st.sampled_from([None, "CAUSAL_LM"]),
    },
)


def _fields(config: CoFiTuneConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}


@SETTINGS
@given(kwargs=valid)
def test_every_valid_config_round_trips_through_json(kwargs):
    config = CoFiTuneConfig(**kwargs)
    saved = json.loads(json.dumps(config.to_dict()))  # what adapter_config.json holds
    assert saved["peft_type"] == "COFITUNE"
    # PeftConfig.from_pretrained hands every saved key, peft_type included, to `from_peft_type` -> the config class
    loaded = CoFiTuneConfig.from_peft_type(**saved)
    assert type(loaded) is CoFiTuneConfig
    assert _fields(loaded) == _fields(config)
    assert loaded.to_dict() == config.to_dict()
    # and once more with the keys PEFT adds for itself dropped
    for key in ("peft_type", "auto_mapping", "peft_version"):
        saved.pop(key)
    again = CoFiTuneConfig(**saved)
    assert {k: v for k, v in _fields(again).items() if k != "peft_version"} == {
        k: v for k, v in _fields(config).items() if k != "peft_version"
    }


@SETTINGS
@given(kwargs=valid, use_path=st.booleans())
def test_importance_is_not_serialised_but_its_source_is(kwargs, use_path):
    kwargs.pop("importance_source", None)
    importance = Importance(intermediate=torch.rand(2, 3)) if not use_path else "/data/importance.safetensors"
    saved = json.loads(json.dumps(CoFiTuneConfig(importance=importance, **kwargs).to_dict()))
    assert saved["importance"] is None
    expected = "/data/importance.safetensors" if use_path else "in-memory Importance"
    assert saved["importance_source"] == expected
    assert CoFiTuneConfig.from_peft_type(**saved).importance_source == expected


# ---------------------------------------------------------------------------------------------------------- Importance

PARTS = ("heads", "intermediate", "output")
layers = st.integers(1, 6)
units = st.integers(1, 80)  # |z| <= (n-1)/sqrt(n) < 9 for n <= 80, where float32 tanh is still below 1
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def raw_parts(value_strategy=finite32, unit_counts=units):
    """1 to 3 parts with one common layer count and any unit counts."""

    def build(n_layers):
        part = unit_counts.flatmap(lambda u: arrays(np.float32, (n_layers, u), elements=value_strategy))
        return st.dictionaries(st.sampled_from(PARTS), part, min_size=1, max_size=3)

    return layers.flatmap(build)


@SETTINGS
@given(parts=raw_parts())
def test_raw_scores_normalise_into_unit_interval(parts):
    imp = Importance(**{k: torch.from_numpy(v) for k, v in parts.items()})
    for name, value in imp.parts().items():
        assert value.shape == parts[name].shape and value.dtype == torch.float32
        assert torch.isfinite(value).all()
        assert float(value.min()) >= 0.0 and float(value.max()) < 1.0, name
    assert imp.normalized


def test_normalise_saturates_to_exactly_one_for_extreme_outliers():
    """Documented limit of "[0, 1)": with > ~80 units a lone outlier has |z| > 9 and float32 tanh rounds to 1.0,
    so that unit gets scale 0 (fully protected), as its importance ~1 asks anyway."""
    raw = torch.zeros(1, 200)
    raw[0, 0] = 1.0  # z = 199 / sqrt(200) = 14.1
    assert float(Importance(intermediate=raw).intermediate[0, 0]) == 1.0


@SETTINGS
@given(
    parts=raw_parts(st.floats(0, 1, width=32), st.integers(2, 20)),  # valid both raw and as normalized=True
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    data=st.data(),
)
def test_nan_and_inf_are_refused(parts, bad, data):
    name = data.draw(st.sampled_from(sorted(parts)))
    value = parts[name].copy()
    index = data.draw(st.tuples(st.integers(0, value.shape[0] - 1), st.integers(0, value.shape[1] - 1)))
    value[index] = bad
    parts = {**parts, name: value}
    for normalized in (False, True):
        with pytest.raises(CoFiTuneError, match="NaN/inf"):
            Importance(**{k: torch.from_numpy(v) for k, v in parts.items()}, normalized=normalized)


@SETTINGS
@given(parts=raw_parts(st.floats(0, 1, width=32)), outside=st.one_of(st.floats(-1e6, -1e-6), st.floats(1.000001, 1e6)))
def test_normalized_values_outside_unit_interval_are_refused(parts, outside):
    name = sorted(parts)[0]
    value = parts[name].copy()
    value[0, 0] = outside
    with pytest.raises(CoFiTuneError, match=r"\[0, 1\]"):
        Importance(**{k: torch.from_numpy(v) for k, v in {**parts, name: value}.items()}, normalized=True)


@SETTINGS
@given(parts=raw_parts(st.floats(0, 1, width=32)))
def test_normalized_values_are_taken_exactly(parts):
    imp = Importance(**{k: torch.from_numpy(v) for k, v in parts.items()}, normalized=True)
    for name, value in parts.items():
        assert torch.equal(getattr(imp, name), torch.from_numpy(value))


@SETTINGS
@given(
    parts=raw_parts(),
    metadata=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=3),
)
def test_save_load_round_trip_is_exact(parts, metadata):
    imp = Importance(**{k: torch.from_numpy(v) for k, v in parts.items()}, metadata=metadata)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "importance.safetensors")
        imp.save(path)
        loaded = Importance.load(path)
        assert sorted(os.listdir(folder)) == ["importance.safetensors"]  # no temp file left
    assert sorted(loaded.parts()) == sorted(imp.parts())
    for name, value in imp.parts().items():
        assert torch.equal(getattr(loaded, name), value), name
    assert loaded.metadata == {**imp.metadata, "source": path}
    assert loaded.normalized
