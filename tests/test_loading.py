"""`kit.loading.load_model`: local folders, the embedded SmolLM2, and a clear error for every path that cannot load."""

from __future__ import annotations

import os

import pytest
import torch
from test_evaluation import char_tokenizer
from tiny_models import tiny_model

from cofitune_peft import CoFiTuneError
from cofitune_peft.kit.loading import load_model, load_model_for_command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Llama whose tokenizer has no pad token."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=2).save_pretrained(folder)
    tok = char_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    return folder


def test_a_local_folder_loads_with_a_pad_token(model_dir):
    model, tok = load_model(model_dir)
    reference = tiny_model("llama", num_layers=2)
    assert model.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert tok.pad_token == tok.eos_token == "</s>"
    half, _ = load_model(str(model_dir), dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert load_model(str(model_dir), dtype=torch.float16)[0].dtype == torch.float16


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (lambda tmp: tmp / "nope", {}, r"`name_or_path`: no folder at '.*nope'; pass a local"),
        (lambda tmp: tmp, {}, r"`name_or_path`: '.*' has no config.json"),
        (lambda tmp: tmp, {"gguf_file": "model.gguf"}, r"`gguf_file`: no file 'model.gguf' in"),
        (lambda tmp: "smollm2", {"gguf_file": "model.gguf"}, r"`gguf_file`: the embedded 'smollm2' takes no GGUF"),
        (lambda tmp: "smollm2", {"dtype": "int8"}, r"`dtype` must be one of \('float32'"),
    ],
)
def test_bad_paths_raise(tmp_path, make, kwargs, match):
    with pytest.raises(CoFiTuneError, match=match):
        load_model(make(tmp_path), **kwargs)


def test_a_folder_with_only_gguf_files_names_them(tmp_path):
    (tmp_path / "weights.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(CoFiTuneError, match=r"no config.json.*\['weights.Q4.gguf'\], pass `gguf_file`"):
        load_model(tmp_path)


def test_a_folder_without_a_tokenizer_raises(tmp_path):
    tiny_model("llama", num_layers=2).save_pretrained(tmp_path)
    with pytest.raises(CoFiTuneError, match="`name_or_path`: could not load a tokenizer"):
        load_model(tmp_path)


def test_command_errors_name_the_flags(tmp_path):
    with pytest.raises(CoFiTuneError, match="`--model`: no folder"):
        load_model_for_command(str(tmp_path / "nope"))
    with pytest.raises(CoFiTuneError, match="`--gguf-file`: no file"):
        load_model_for_command(str(tmp_path), "x.gguf")


def test_cli_search_reports_a_missing_model(tmp_path, capsys):
    from cofitune_peft.kit.cli import main

    argv = ["search", "--model", str(tmp_path / "nope"), "--train", "t.jsonl", "--eval", "e.jsonl",
            "--budget-steps", "1", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "cofitune search: error: `--model`: no folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_smollm2_is_the_embedded_model():
    from cofitune_peft.kit.loading import load_smollm2

    model, tok = load_model("smollm2")
    assert model.config.num_hidden_layers == 30 and tok.pad_token is not None
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the base its adapters name
    reference, _ = load_smollm2()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_base_model_id_names_the_base_that_adapters_record(model_dir, monkeypatch):
    model, _ = load_model(model_dir, base_model_id="org/tiny-llama")
    assert model.name_or_path == "org/tiny-llama"  # what PEFT records as `base_model_name_or_path`
    with pytest.raises(CoFiTuneError, match=r"`base_model_id` must be the base model's Hugging Face Hub id"):
        load_model(model_dir, base_model_id="not an id")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --base-model-id was checked")

    import cofitune_peft.kit.loading as loading

    monkeypatch.setattr(loading, "_load", never)
    with pytest.raises(CoFiTuneError, match=r"`--base-model-id` must be the base model's Hugging Face Hub id"):
        load_model_for_command(str(model_dir), base_model_id=str(model_dir))
