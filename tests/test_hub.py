"""Publishing on the Hugging Face Hub, end to end and offline: the base model's Hub id, the card, `push_to_hub` through
huggingface_hub's own commit logic (only the transport is replaced, tests/hub_fake.py), and loading the pushed files
by repo id from the Hub cache with `HF_HUB_OFFLINE=1`: with cofitune-peft, without it (the error the card explains),
and as the exported LoRA with plain PEFT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import yaml
from hub_fake import FakeHub, folder_files, install_snapshot, metadata_errors
from peft import PeftModel, get_peft_model
from safetensors.torch import load as load_safetensors
from tiny_models import batch, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance
from cofitune_peft.hub import check_hub_id, hub_id_of, is_hub_id, save_for_hub, set_base_model_id
from cofitune_peft.model_card import BEGIN, END

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASE_ID = "tiny-org/base-llama"
REPO = "user/adapter"
pytestmark = pytest.mark.filterwarnings("ignore:the importance has no values")


def split_card(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def body_lines(text: str) -> list[str]:
    """The card's text lines after the metadata, blank lines and HTML comments left out."""
    _, body = split_card(text)
    return [line for line in body.splitlines() if line.strip() and not line.startswith("<!--")]


def save_base(tmp_path, name_or_path: str | None = None):
    """A tiny Llama saved to disk (`config.json` gets `_name_or_path` when given, as transformers 4 wrote it)."""
    path = tmp_path / "base"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if name_or_path is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    return path


def trained_adapter(base_path, **config):
    """A CoFiTune adapter with random deltas and a soft mask on the base model in `base_path`, trained two steps by
    the kit's `train_sft` (so its task type and training settings are recorded the way the kit records them)."""
    from cofitune_peft.kit.training import train_sft

    base = AutoModelForCausalLM.from_pretrained(base_path)
    imp = Importance(intermediate=torch.rand(8, 48, generator=torch.Generator().manual_seed(3)))
    config = {"layers": (2, 5), "importance": imp, "init_weights": False, **config}
    model = get_peft_model(base, CoFiTuneConfig(**config))
    data = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(8)]
    train_sft(model, data, tokenizer=tiny_tokenizer(), steps=2, learning_rate=1e-3, batch_size=4, progress=False)
    return model.eval()


# ------------------------------------------------------------------------------------------------ the base model's id


def test_hub_ids_are_told_apart_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("gpt2")
    assert not is_hub_id("models/base")  # an existing relative folder
    assert not is_hub_id("/abs/path") and not is_hub_id("./x") and not is_hub_id("a/b/c") and not is_hub_id("")
    assert not is_hub_id("owner/bad--name")  # the Hub refuses '--'
    with pytest.raises(CoFiTuneError, match=r"`base_model_id` must be the base model's Hugging Face Hub id"):
        check_hub_id("/tmp/base", "base_model_id")
    with pytest.raises(CoFiTuneError, match=r"`--base-model-id`.*got 'gpt2'"):
        check_hub_id("gpt2", "--base-model-id")  # a new id names its owner


def test_hub_id_of_a_local_folder(tmp_path):
    plain = save_base(tmp_path)
    assert hub_id_of(plain) is None  # transformers 5 writes no `_name_or_path`
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": BASE_ID}))
    assert hub_id_of(named) == BASE_ID
    (named / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/checkpoint"}))
    assert hub_id_of(named) is None
    snapshot = install_snapshot(tmp_path / "hub", BASE_ID, {"config.json": b"{}"}, "a" * 40)
    assert hub_id_of(snapshot) == BASE_ID
    assert hub_id_of(BASE_ID) == BASE_ID and hub_id_of(None) is None and hub_id_of(tmp_path / "gone") is None


def test_a_local_base_without_an_id_keeps_its_path_and_the_card_has_no_base_model(tmp_path):
    base_path = save_base(tmp_path)
    model = trained_adapter(base_path)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_path)  # AutoPeftModelForCausalLM still loads it here
    meta, body = split_card((tmp_path / "adapter" / "README.md").read_text())
    assert "base_model" not in meta and not any(str(base_path) in t for t in meta["tags"])
    assert str(base_path) not in body


def test_a_local_folder_whose_config_names_a_hub_id_records_the_id_without_asking_the_hub(tmp_path):
    base_path = save_base(tmp_path, name_or_path=BASE_ID)
    model = trained_adapter(base_path)
    hub = FakeHub()
    with hub.serving():  # any request would be logged: PEFT's vocabulary check reads the local folder instead
        model.save_pretrained(tmp_path / "adapter")
    assert hub.requests == []
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID
    meta, _ = split_card((tmp_path / "adapter" / "README.md").read_text())
    assert meta["base_model"] == BASE_ID and f"base_model:adapter:{BASE_ID}" in meta["tags"]


def test_set_base_model_id_names_the_base_and_the_card_says_how_the_weights_differ(tmp_path):
    model = tiny_model()
    set_base_model_id(model, BASE_ID, weights_note="dequantised from a GGUF file")
    peft_model = get_peft_model(model, CoFiTuneConfig(layers=(1, 3)))
    # no local folder to compare the vocabulary with: PEFT's "auto" would ask the Hub for the base's config
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID
    assert config["training_info"] == {"base_weights": "dequantised from a GGUF file"}
    assert "| base weights | dequantised from a GGUF file |" in (tmp_path / "adapter" / "README.md").read_text()
    with pytest.raises(CoFiTuneError, match="`model_id`"):
        set_base_model_id(model, "not an id")


def test_a_lora_on_a_model_named_by_set_base_model_id_saves_without_asking_the_hub(tmp_path):
    from peft import LoraConfig

    base_path = save_base(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    set_base_model_id(model, BASE_ID)  # what load_smollm2 does: LoRA baselines on it record the id too
    lora = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    hub = FakeHub()
    with hub.serving():
        lora.save_pretrained(tmp_path / "lora")
    assert hub.requests == []  # PEFT's vocabulary check read the local folder
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID


def test_save_pretrained_takes_base_model_id(tmp_path):
    model = trained_adapter(save_base(tmp_path))
    model.save_pretrained(tmp_path / "adapter", base_model_id=BASE_ID)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    with pytest.raises(CoFiTuneError, match="`base_model_id`"):
        model.save_pretrained(tmp_path / "other", base_model_id="./local")


@pytest.mark.slow
def test_the_embedded_smollm2_records_its_hub_id(tmp_path):
    from cofitune_peft.kit.loading import SMOLLM2_HUB_ID, load_smollm2, smollm2_path

    model, _ = load_smollm2()
    peft_model = get_peft_model(model, CoFiTuneConfig(layers=(7, 9)))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["task_type"] == "CAUSAL_LM" and "GGUF" in config["training_info"]["base_weights"]
    meta, body = split_card((tmp_path / "adapter" / "README.md").read_text())
    assert meta["base_model"] == SMOLLM2_HUB_ID and smollm2_path() not in body


# --------------------------------------------------------------------------------------------------------- the card


def test_the_card_is_a_card_for_this_adapter(tmp_path):
    model = trained_adapter(save_base(tmp_path))
    model.save_pretrained(tmp_path / "adapter", base_model_id=BASE_ID)
    text = (tmp_path / "adapter" / "README.md").read_text()
    meta, body = split_card(text)
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_ID
    assert meta["pipeline_tag"] == "text-generation"
    assert {"cofitune", "peft", f"base_model:adapter:{BASE_ID}"} <= set(meta["tags"])
    assert metadata_errors(text) == []
    # its first lines say what to install, and what to do on a stack that only takes LoRA
    first = " ".join(body_lines(text)[:2])
    assert "pip install cofitune-peft" in first and "import cofitune_peft" in first
    assert "cofitune export --to lora" in first and "KeyError: 'COFITUNE'" in first
    # what it was trained for
    for row in (
        "| task type | `CAUSAL_LM` |",
        '| window | decoder layers 2..4 of 8 (the paper\'s "(2, 5]") |',
        "| parts | `ffn`: `mlp.down_proj`, `mlp.up_proj` (6 modules) |",
        "| trained with | cofitune-peft train_sft |",
        "| optimizer steps | 2 |",
        "| peak learning rate | 0.001 |",
        "| examples per optimizer step | 4 |",
    ):
        assert row in body, row
    assert re.search(r"\| soft mask \| `update` mode, `raw` budget; importance from in-memory Importance; mean", body)
    # how to load it and how to serve it without cofitune-peft
    assert 'AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")' in body
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_ID}")' in body
    assert "cofitune export path/to/this/adapter --to lora --rank 64 --out adapter-lora" in body
    # PEFT's empty template is gone, its metadata stays
    assert "[More Information Needed]" not in text and "Model Card for Model ID" not in text
    assert body.count(BEGIN) == 1 and body.count(END) == 1


def test_the_card_shows_no_local_path(tmp_path):
    base_path = save_base(tmp_path)
    imp = Importance(intermediate=torch.rand(8, 48), metadata={"model": str(base_path), "num_tokens": 10})
    imp.save(tmp_path / "importance.safetensors")
    for source, shown in ((imp, f"model={BASE_ID}, num_tokens=10"), (str(tmp_path / "importance.safetensors"), None)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), CoFiTuneConfig(importance=source))
        model.save_pretrained(tmp_path / "adapter", base_model_id=BASE_ID)
        card = (tmp_path / "adapter" / "README.md").read_text()
        assert str(tmp_path) not in card
        assert (shown or "importance from `importance.safetensors`") in card


def test_text_written_into_the_card_survives_the_next_save(tmp_path):
    model = trained_adapter(save_base(tmp_path))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    readme = folder / "README.md"
    readme.write_text(
        readme.read_text().replace("library_name: peft", "library_name: peft\nlicense: apache-2.0")
        + "\n## Evaluation\n\nExact match 0.55 on our test split.\n\n## Uses\n\n[More Information Needed]\n"
    )
    model.save_pretrained(folder, base_model_id=BASE_ID)
    meta, body = split_card(readme.read_text())
    assert meta["license"] == "apache-2.0" and meta["base_model"] == BASE_ID
    assert "## Evaluation\n\nExact match 0.55 on our test split." in body
    assert "## Uses" not in body and body.count(BEGIN) == 1
    assert body.index(BEGIN) < body.index("## Evaluation")  # the install line stays first


def test_a_card_of_cofitune_peft_0_2_0_is_rewritten(tmp_path):
    model = trained_adapter(save_base(tmp_path))
    folder = tmp_path / "adapter"
    folder.mkdir()
    old = (
        "---\nlibrary_name: peft\ntags:\n- cofitune\n---\n\n# Model Card for Model ID\n\n## Model Details\n\n"
        "- **Developed by:** [More Information Needed]\n\n### Framework versions\n\n- PEFT 0.21.2\n\n"
        "## CoFiTune\n\nThis adapter was trained with cofitune-peft.\n\n- Base model: `/tmp/x`\n"
    )
    (folder / "README.md").write_text(old)
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "## CoFiTune\n" not in text and "/tmp/x" not in text and "Model Details" not in text
    assert text.count("- PEFT ") == 1 and text.count(BEGIN) == 1


# ------------------------------------------------------------------------------------------------------ push_to_hub


def test_push_to_hub_commits_the_adapter_and_its_card(tmp_path):
    base_path = save_base(tmp_path)
    model = trained_adapter(base_path)
    hub = FakeHub()
    with hub.serving():
        url = model.push_to_hub(REPO, token="hf_test", base_model_id=BASE_ID)
    assert url.endswith(hub.repos[REPO].commits[-1].oid)
    (commit,) = hub.repos[REPO].commits
    # exactly these files, the small ones inline, the weights through LFS
    assert sorted(commit.regular) == ["README.md", "adapter_config.json"]
    assert sorted(commit.lfs) == ["adapter_model.safetensors"]
    assert commit.message == "Upload CoFiTune adapter"
    # ... with exactly what save_for_hub writes
    expected = tmp_path / "expected"
    assert save_for_hub(model, expected, repo_id=REPO) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert {**commit.regular, **commit.lfs} == folder_files(expected)
    config = json.loads(commit.regular["adapter_config.json"])
    assert config["peft_type"] == "COFITUNE" and config["base_model_name_or_path"] == BASE_ID
    assert config["task_type"] == "CAUSAL_LM" and config["layers"] == [2, 5]
    assert config["training_info"]["trainer"] == "cofitune-peft train_sft"
    tensors = load_safetensors(commit.lfs["adapter_model.safetensors"])
    state = {k: v for k, v in model.state_dict().items() if "cofitune_" in k}
    assert len(tensors) == len(state) == 2 * 3 * 2  # (up, down) x 3 layers x (delta, scale)
    for key, value in tensors.items():
        full = next(k for k in state if k.replace(".default", "") == key)
        assert torch.equal(value, state[full]), key
    card = commit.regular["README.md"].decode()
    assert metadata_errors(card) == [] and split_card(card)[0]["base_model"] == BASE_ID
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO}")' in card
    assert f"cofitune export {REPO} --to lora" in card


def test_push_without_a_hub_id_warns_once_naming_base_model_id(tmp_path):
    model = trained_adapter(save_base(tmp_path))
    hub = FakeHub()
    with hub.serving(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.push_to_hub("user/no-base-id", token="hf_test")
        model.push_to_hub("user/no-base-id", token="hf_test")
    mine = [w for w in caught if "does not know its base model's Hub id" in str(w.message)]
    assert len(mine) == 1 and "pass `base_model_id='owner/name'` to push_to_hub" in str(mine[0].message)
    card = hub.repos["user/no-base-id"].files["README.md"].decode()
    assert "base_model" not in split_card(card)[0] and metadata_errors(card) == []


def test_push_keeps_what_someone_wrote_into_the_card_on_the_hub(tmp_path):
    model = trained_adapter(save_base(tmp_path))
    hub = FakeHub()
    with hub.serving():
        model.push_to_hub(REPO, token="hf_test", base_model_id=BASE_ID)
        hub.repos[REPO].files["README.md"] += b"\n## Evaluation\n\nWritten on the Hub.\n"
        model.push_to_hub(REPO, token="hf_test", tags=["arithmetic"])
    meta, body = split_card(hub.repos[REPO].files["README.md"].decode())
    assert "Written on the Hub." in body and body.count(BEGIN) == 1 and "arithmetic" in meta["tags"]


# ----------------------------------------------------------------------------- loading the pushed files by repo id


def run_offline(code: str, cache, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    script = "import torch; torch.set_num_threads(1)\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=check)


@pytest.fixture
def published(tmp_path):
    """An adapter pushed to the fake Hub, its files and its base model's laid out in a Hub cache, and the logits."""
    base_path = save_base(tmp_path)
    model = trained_adapter(base_path)
    hub = FakeHub()
    with hub.serving():
        model.push_to_hub(REPO, token="hf_test", base_model_id=BASE_ID)
    cache = tmp_path / "hub-cache"
    install_snapshot(cache, BASE_ID, folder_files(base_path), "b" * 40)
    repo = hub.repos[REPO]
    install_snapshot(cache, REPO, repo.files, repo.commits[-1].oid)
    x = batch()
    torch.save({"x": x, "logits": model(x).logits.detach()}, tmp_path / "expected.pt")
    return tmp_path, cache, hub


def test_the_pushed_adapter_loads_by_repo_id_offline(published):
    tmp_path, cache, _ = published
    out = run_offline(
        f"""
        import torch, cofitune_peft
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        auto = AutoPeftModelForCausalLM.from_pretrained({REPO!r}).eval()
        base = AutoModelForCausalLM.from_pretrained({BASE_ID!r})
        manual = PeftModel.from_pretrained(base, {REPO!r}).eval()
        with torch.no_grad():
            for model in (auto, manual):
                assert torch.equal(model(expected["x"]).logits, expected["logits"])
        print(type(auto).__name__, auto.peft_config["default"].base_model_name_or_path)
        """,
        cache,
    )
    assert out.stdout.split() == ["PeftModelForCausalLM", BASE_ID]


def test_without_cofitune_peft_the_error_is_the_one_the_card_explains(published):
    _tmp_path, cache, hub = published
    out = run_offline(
        f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({BASE_ID!r}), {REPO!r})
        """,
        cache,
        check=False,
    )
    assert out.returncode != 0 and "KeyError: 'COFITUNE'" in out.stderr
    first = " ".join(body_lines(hub.repos[REPO].files["README.md"].decode())[:2])
    assert "KeyError: 'COFITUNE'" in first and "pip install cofitune-peft" in first


def test_the_exported_lora_loads_by_repo_id_with_plain_peft(published):
    tmp_path, cache, hub = published
    lora = tmp_path / "lora"
    run_offline(
        f"""
        import sys
        from cofitune_peft.kit.cli import main
        sys.exit(main(["export", {REPO!r}, "--to", "lora", "--rank", "1000", "--out", {str(lora)!r}]))
        """,
        cache,
    )
    assert sorted(os.listdir(lora)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    card = (lora / "README.md").read_text()
    assert split_card(card)[0]["base_model"] == BASE_ID and metadata_errors(card) == []
    from huggingface_hub import HfApi

    with hub.serving():
        HfApi(token="hf_test").create_repo("user/adapter-lora")
        HfApi(token="hf_test").upload_folder(repo_id="user/adapter-lora", folder_path=lora)
    repo = hub.repos["user/adapter-lora"]
    install_snapshot(cache, "user/adapter-lora", repo.files, repo.commits[-1].oid)
    out = run_offline(
        f"""
        import sys, torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({BASE_ID!r})
        models = [PeftModel.from_pretrained(base, "user/adapter-lora"), AutoPeftModelForCausalLM.from_pretrained("user/adapter-lora")]
        with torch.no_grad():
            for model in models:
                torch.testing.assert_close(model.eval()(expected["x"]).logits, expected["logits"], rtol=0, atol=1e-4)
        print(models[0].peft_config["default"].peft_type.value, sorted(m for m in sys.modules if m.startswith("cofitune")))
        """,
        cache,
    )
    assert out.stdout.split() == ["LORA", "[]"]


def test_the_publish_preview_script_shows_what_a_push_commits(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "publish_preview", os.path.join(ROOT, "examples", "publish_preview.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base_path = save_base(tmp_path)
    trained_adapter(base_path).save_pretrained(tmp_path / "adapter", base_model_id=BASE_ID)
    sizes, card = script.preview(str(tmp_path / "adapter"), REPO, base=str(base_path))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / "adapter")
    hub = FakeHub()
    with hub.serving():
        model.push_to_hub(REPO, token="hf_test")
    assert [name for name, _ in sizes] == sorted(hub.repos[REPO].files)
    assert card.encode() == hub.repos[REPO].files["README.md"]
    assert dict(sizes) == {name: len(content) for name, content in hub.repos[REPO].files.items()}
