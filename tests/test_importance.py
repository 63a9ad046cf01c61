"""The `Importance` container: normalisation, validation, combine, files, plot."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance


def sample(seed=0, layers=8):
    g = torch.Generator().manual_seed(seed)
    return Importance(
        heads=torch.rand(layers, 4, generator=g),
        intermediate=torch.rand(layers, 48, generator=g),
        output=torch.rand(layers, 32, generator=g),
    )


def test_raw_scores_are_normalised_into_unit_interval():
    imp = sample()
    for values in imp.parts().values():
        assert values.min() >= 0 and values.max() < 1
    assert imp.normalized


def test_normalized_values_are_taken_as_given():
    values = torch.tensor([[0.0, 0.5, 1.0]])
    assert torch.equal(Importance(heads=values, normalized=True).heads, values)


def test_save_load_roundtrip(tmp_path):
    imp = sample()
    imp.metadata = {"model": "tiny", "data": "unit test"}
    imp.save(tmp_path / "imp.safetensors")
    loaded = Importance.load(tmp_path / "imp.safetensors")
    for part, value in imp.parts().items():
        assert torch.equal(getattr(loaded, part), value)
    assert loaded.metadata["model"] == "tiny"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".importance-")]  # no temp file left


def test_partial_importance_roundtrip(tmp_path):
    imp = Importance(intermediate=torch.rand(3, 5))
    imp.save(tmp_path / "i.safetensors")
    loaded = Importance.load(tmp_path / "i.safetensors")
    assert loaded.heads is None and loaded.output is None and loaded.intermediate.shape == (3, 5)


def test_combine_is_elementwise_max():
    a, b = sample(1), sample(2)
    c = Importance.combine([a, b])
    assert torch.equal(c.intermediate, torch.maximum(a.intermediate, b.intermediate))
    only_heads = Importance(heads=torch.rand(8, 4))
    d = Importance.combine([only_heads, Importance(output=torch.rand(8, 32))])
    assert d.heads is not None and d.output is not None and d.intermediate is None


def test_plot_writes_png(tmp_path):
    sample().plot(tmp_path / "imp.png")
    assert (tmp_path / "imp.png").read_bytes()[:4] == b"\x89PNG"


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(CoFiTuneError, match="no file"):
        Importance.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CoFiTuneError, match=r"bad\.safetensors"):
        Importance.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(CoFiTuneError, match="not a CoFiTune importance"):
        Importance.load(other)
    with pytest.raises(CoFiTuneError, match="does not exist"):
        sample().save(tmp_path / "no" / "such" / "dir" / "x.safetensors")


def test_existing_file_survives_a_failed_save(tmp_path, monkeypatch):
    path = tmp_path / "imp.safetensors"
    first = sample(1)
    first.save(path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        sample(2).save(path)
    assert torch.equal(Importance.load(path).intermediate, first.intermediate)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "at least one"),
        ({"heads": torch.rand(3)}, "2-D"),
        ({"heads": torch.rand(3, 0)}, "2-D"),
        ({"heads": torch.rand(3, 4), "output": torch.rand(2, 4)}, "same number of layers"),
        ({"heads": torch.tensor([[float("inf"), 1.0]])}, "NaN/inf"),
        ({"heads": "abc"}, "tensor"),
        ({"heads": torch.rand(2, 2), "normalized": "yes"}, "normalized"),
    ],
)
def test_bad_importance_is_refused(kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        Importance(**kwargs)


def test_importance_from_path_and_set_importance(tmp_path):
    imp = sample()
    imp.save(tmp_path / "imp.safetensors")
    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=str(tmp_path / "imp.safetensors")))
    up = pm.base_model.model.model.layers[2].mlp.up_proj
    assert torch.allclose(up.cofitune_scale["default"], 1 - imp.intermediate[2])
    assert pm.peft_config["default"].to_dict()["importance_source"] == str(tmp_path / "imp.safetensors")
    pm.base_model.set_importance(None)
    assert torch.equal(up.cofitune_scale["default"], torch.ones(48))
    other = sample(5)
    pm.base_model.set_importance(other)
    assert torch.allclose(up.cofitune_scale["default"], 1 - other.intermediate[2])
    stats = pm.base_model.mask_statistics()
    assert 0 < stats["mask_mean_scale"] < 1


def test_validate_for_model():
    sample().validate_for(tiny_model())
    with pytest.raises(CoFiTuneError, match="shape"):
        sample(layers=6).validate_for(tiny_model())
