"""Adapter and importance files: atomic saves, and damaged or mismatched files refused with an error naming the file."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapted(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    imp = Importance(intermediate=torch.rand(8, 48, generator=g), output=torch.rand(8, 32, generator=g))
    torch.manual_seed(seed)
    return get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=imp, init_weights=False))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch(5)).logits


def snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".cofitune-save-")]


@pytest.fixture
def saved(tmp_path):
    """An adapter on disk, with the logits of the model that wrote it."""
    model = adapted(0)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", logits(model)


# ---------------------------------------------------------------------------------------------------------- atomic


def _partial_writer(real):
    """A stand-in for a writer `real(obj, path, ...)` that writes half of the real output to `path`, then fails."""

    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device (simulated)")

    return write


@pytest.mark.parametrize("crash_in", ["weights", "config"])
def test_crash_mid_save_leaves_the_old_adapter(saved, monkeypatch, crash_in):
    folder, old_logits = saved
    before = snapshot(folder)
    if crash_in == "weights":
        import peft.peft_model

        monkeypatch.setattr(peft.peft_model, "safe_save_file", _partial_writer(peft.peft_model.safe_save_file))
    else:
        real = CoFiTuneConfig.save_pretrained

        def save_pretrained(self, save_directory, **kwargs):
            real(self, save_directory, **kwargs)
            path = os.path.join(save_directory, CONFIG)
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(text[: len(text) // 2])
            raise OSError(28, "No space left on device (simulated)")

        monkeypatch.setattr(CoFiTuneConfig, "save_pretrained", save_pretrained)
    newer = adapted(1)
    with pytest.raises(OSError, match="simulated"):
        newer.save_pretrained(folder)
    monkeypatch.undo()
    assert snapshot(folder) == before, "a failed save changed the existing adapter"
    assert leftovers(folder.parent) == [], "a failed save left its temp dir behind"
    loaded = PeftModel.from_pretrained(tiny_model(), folder)
    assert torch.equal(logits(loaded), old_logits)


def test_save_over_an_existing_adapter_replaces_it_and_cleans_up(saved):
    folder, old_logits = saved
    newer = adapted(1)
    newer.save_pretrained(folder)
    assert leftovers(folder.parent) == []
    assert sorted(os.listdir(folder)) == ["README.md", CONFIG, WEIGHTS]
    loaded = logits(PeftModel.from_pretrained(tiny_model(), folder))
    assert torch.equal(loaded, logits(newer)) and not torch.equal(loaded, old_logits)


# ---------------------------------------------------------------------------------------------------------- damaged


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "truncated-tail":
        data = data[:-4]
    elif how == "empty":
        data = b""
    elif how == "garbled-header":
        data = data[:10] + b"x" * 30 + data[40:]
    elif how == "nan-data":  # the tail holds the last tensor's bytes: 0xff... is a float32 NaN
        data = data[:-64] + b"\xff" * 64
    path.write_bytes(data)


DAMAGE = ["truncated", "truncated-tail", "empty", "garbled-header", "nan-data"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_adapter_is_refused(saved, how):
    """A damaged file never loads."""
    folder, _ = saved
    _damage(folder / WEIGHTS, how)
    with pytest.raises(Exception, match=r"truncated or corrupt|NaN/inf"):
        PeftModel.from_pretrained(tiny_model(), folder)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_adapter_error_names_the_file(saved, how):
    folder, _ = saved
    _damage(folder / WEIGHTS, how)
    with pytest.raises(CoFiTuneError, match=re.escape(str(folder / WEIGHTS))) as err:
        PeftModel.from_pretrained(tiny_model(), folder)
    problem = "NaN/inf" if how == "nan-data" else r"truncated or corrupt"
    assert re.search(problem, str(err.value)), str(err.value)


# ---------------------------------------------------------------------------------------------------------- mismatch


@pytest.mark.parametrize(
    ("other", "shapes"),
    [({"intermediate_size": 64}, ("(32, 48)", "(32, 64)")), ({"hidden_size": 64}, ("(32, 48)", "(64, 48)"))],
    ids=["intermediate", "hidden"],
)
def test_adapter_for_another_base_is_refused_with_the_shapes(saved, other, shapes):
    folder, _ = saved
    with pytest.raises(CoFiTuneError, match="other dimensions") as err:
        PeftModel.from_pretrained(tiny_model(**other), folder)
    assert all(s in str(err.value) for s in shapes), str(err.value)
    assert "cofitune_delta" in str(err.value)  # the tensor


def test_adapter_for_another_base_error_names_the_file(saved):
    folder, _ = saved
    with pytest.raises(CoFiTuneError, match=re.escape(str(folder / WEIGHTS))):
        PeftModel.from_pretrained(tiny_model(intermediate_size=64), folder)


def test_adapter_config_for_another_window_is_refused(saved):
    """A config whose window lies outside the base model fails before any weight is read."""
    folder, _ = saved
    config = json.loads((folder / CONFIG).read_text())
    config["layers"], config["layers_to_transform"] = [6, 10], [6, 7, 8, 9]
    (folder / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CoFiTuneError, match=r"within \[0, 8\)"):
        PeftModel.from_pretrained(tiny_model(), folder)


@pytest.fixture
def foreign_importance(tmp_path):
    """An importance file estimated on a model with a 64-wide FFN (this tiny model's is 48)."""
    path = tmp_path / "other-model-importance.safetensors"
    Importance(intermediate=torch.rand(8, 64), output=torch.rand(8, 32), metadata={"model": "other/model"}).save(path)
    return path


def test_importance_from_another_model_is_refused_with_the_shapes(foreign_importance):
    with pytest.raises(CoFiTuneError, match=r"\(8, 64\).*\(8, 48\)") as err:
        get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=str(foreign_importance)))
    assert "other/model" in str(err.value) and "intermediate" in str(err.value)


def test_importance_from_another_model_error_names_the_file(foreign_importance):
    with pytest.raises(CoFiTuneError, match=re.escape(str(foreign_importance))):
        get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), importance=str(foreign_importance)))


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Temp-file writes (mkstemp: 0600) must not leave adapters or importance files unreadable to others."""
    from cofitune_peft.utils import file_mode

    pm = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(2, 4), init_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    Importance(intermediate=torch.rand(8, 48)).save(tmp_path / "importance.safetensors")
    files = [*(tmp_path / "adapter").iterdir(), tmp_path / "importance.safetensors"]
    assert {f.stat().st_mode & 0o777 for f in files} == {file_mode()}
