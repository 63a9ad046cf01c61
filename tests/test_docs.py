"""The documentation stays true to the code: API coverage, links and anchors, code that parses, a quickstart that runs.

Fast: nothing here loads a real model. The one slow-ish test runs the quickstart's tiny-model block (a random 8-layer
Llama, a few seconds on one thread) in a fresh process, exactly as a reader would paste it.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cofitune_peft
from cofitune_peft.kit.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.md"
QUICKSTART = DOCS / "quickstart.md"
MARKDOWN_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# Docs pages that other people are still writing: a link to one of them is skipped (with this reason) while the file
# does not exist, instead of failing or passing silently. Once the file exists it is checked like any other.
PENDING = {
    "docs/results.md": "docs/results.md (the measured results) is being written separately and does not exist yet",
}
RUNNABLE_MARKER = "<!-- docs-test: run -->"

_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def _split_fences(text: str) -> tuple[list[str], list[tuple[str, str, int]]]:
    """The lines outside fenced code blocks (fenced lines blanked), and the blocks as `(info, code, line number)`."""
    prose, blocks = [], []
    fence, info, start, body = None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line.strip())
        if fence is None and match:
            fence, info, start, body = match.group(1), match.group(2).strip(), number, []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence) :].strip():
            blocks.append((info, "\n".join(body), start))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's `-1`, `-2` suffixes for repeated headings."""
    prose, _ = _split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code blocks and inline code."""
    prose, _ = _split_fences(path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "code", "\n".join(prose))
    return [m.group(1) for m in _LINK.finditer(text)]


def _relative_links() -> list[tuple[str, str]]:
    out = []
    for path in MARKDOWN_FILES:
        for target in links(path):
            if not _SCHEME.match(target):
                out.append((_rel(path), target))
    return list(dict.fromkeys(out))


def _python_blocks(path: Path) -> list[tuple[str, int]]:
    _, blocks = _split_fences(path.read_text(encoding="utf-8"))
    return [(code, line) for info, code, line in blocks if info.split()[:1] == ["python"]]


# ----------------------------------------------------------------------------------------------------- API coverage


@pytest.mark.parametrize("name", cofitune_peft.__all__)
def test_every_public_name_has_a_heading_in_the_api_reference(name):
    text = API.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if re.match(r"^#{2,3}\s", line)]
    assert any(f"`{name}`" in h for h in headings), f"docs/api.md has no `## `{name}`` or `### `{name}`` heading"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_cli_subcommand_and_flag_is_in_the_api_reference(command):
    text = API.read_text(encoding="utf-8")
    assert re.search(rf"^#{{2,3}}\s+`cofitune {command}`", text, re.M), f"no heading for `cofitune {command}`"
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and command in a.choices)
    flags = [s for action in sub.choices[command]._actions for s in action.option_strings if s.startswith("--")]
    missing = [f for f in flags if f != "--help" and f not in text]
    assert not missing, f"docs/api.md does not mention these `cofitune {command}` flags: {missing}"


def _documented_callables() -> dict[str, object]:
    from cofitune_peft.kit.data import answer_matches, arithmetic_task, capital_probes, general_texts, to_messages
    from cofitune_peft.kit.evaluation import speciality_score, unified_score, versatility_score
    from cofitune_peft.kit.loading import load_smollm2

    # CoFiTuneModel and CoFiTuneLayer are built by PEFT (get_peft_model), and an exception takes only a message:
    # their constructors are not user API.
    not_constructed = {"CoFiTuneModel", "CoFiTuneLayer", "CoFiTuneError"}
    out = {name: getattr(cofitune_peft, name) for name in cofitune_peft.__all__ if name not in not_constructed}
    out = {name: obj for name, obj in out.items() if callable(obj)}
    for owner, method in [
        ("Importance", "save"),
        ("Importance", "load"),
        ("Importance", "plot"),
        ("Importance", "combine"),
        ("Importance", "validate_for"),
        ("CoFiTuneModel", "set_importance"),
        ("CoFiTuneModel", "mask_statistics"),
        ("SearchResult", "load"),
        ("SearchResult", "to_markdown"),
        ("SearchResult", "plot"),
        ("SpecialityEval", "exact_match"),
        ("SpecialityEval", "multiple_choice"),
        ("VersatilityEval", "default"),
    ]:
        out[f"{owner}.{method}"] = getattr(getattr(cofitune_peft, owner), method)
    for func in (answer_matches, arithmetic_task, capital_probes, general_texts, to_messages, load_smollm2):
        out[func.__name__] = func
    for func in (speciality_score, versatility_score, unified_score):
        out[func.__name__] = func
    return out


_SKIPPED_PARAMETERS = {"self", "cls", "args", "kwargs"}


def _signatures_in(text: str, name: str) -> list[str]:
    """The argument lists written after `name(` in `text` (balanced parentheses), e.g. in a signature block."""
    out = []
    for match in re.finditer(rf"\b{re.escape(name)}\(", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                out.append(text[start:i])
                break
    return out


@pytest.mark.parametrize(("name", "obj"), sorted(_documented_callables().items()))
def test_documented_parameters_match_the_signatures(name, obj):
    """A parameter added to the code, or renamed, must show up in docs/api.md: in the function's written signature,
    as `param`, or as param= / param: ."""
    import dataclasses

    from peft import PeftConfig

    text = API.read_text(encoding="utf-8")
    if name == "CoFiTuneConfig":
        inherited = {f.name for f in dataclasses.fields(PeftConfig)}
        params = [f.name for f in dataclasses.fields(obj) if f.name not in inherited]
    else:
        params = [p for p in inspect.signature(obj).parameters if p not in _SKIPPED_PARAMETERS]
    written = " ".join(_signatures_in(text, name.rsplit(".", 1)[-1]))
    missing = [
        p for p in params if not re.search(rf"`{p}`|\b{p}\s*[=:]", text) and not re.search(rf"\b{p}\b", written)
    ]
    assert not missing, f"docs/api.md does not document these parameters of {name}: {missing}"


# ------------------------------------------------------------------------------------------------------------ links


def test_the_link_checker_follows_github_rules(tmp_path):
    assert (
        github_slug("Why the mask must act on the update under AdamW")
        == "why-the-mask-must-act-on-the-update-under-adamw"
    )
    assert github_slug("Coarse level: which modules, which layers") == "coarse-level-which-modules-which-layers"
    assert github_slug("`Importance.save`") == "importancesave"
    assert github_slug("`__version__`") == "__version__"
    assert github_slug("Why does CoFiTune train layers N//4 .. N//2-1?") == "why-does-cofitune-train-layers-n4--n2-1"
    page = tmp_path / "page.md"
    page.write_text(
        '# Title\n\nSee [a](a.md#x), [`b`](../b.md) and ![c](c.png "title"); `[not](code.md)`.\n\n'
        "```python\nx = [y](z)  # [not](a link.md)\n```\n\n## Title\n",
        encoding="utf-8",
    )
    assert links(page) == ["a.md#x", "../b.md", "c.png"]
    assert anchors(page) == {"title", "title-1"}
    assert _relative_links(), "found no relative links in the docs at all; the link pattern is broken"


@pytest.mark.parametrize(("source", "target"), _relative_links())
def test_relative_links_point_to_existing_files_and_headings(source, target):
    path_part, _, anchor = target.partition("#")
    resolved = (ROOT / source).parent / path_part if path_part else ROOT / source
    rel = os.path.normpath(os.path.relpath(resolved, ROOT)).replace(os.sep, "/")
    if rel in PENDING and not resolved.exists():
        pytest.skip(f"link from {source} to {rel} not checked: {PENDING[rel]}")
    assert resolved.exists(), f"{source} links to {target!r}, but {rel} does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), f"{source} links to {target!r}, but {rel} has no heading #{anchor}"


_REPO_PATH = re.compile(r"`((?:cofitune_peft|tests|examples|benchmarks|scripts|docs)/[^`\s*{}<>]*)`")


def _repository_paths() -> list[tuple[str, str]]:
    out = []
    for path in MARKDOWN_FILES:
        prose, _ = _split_fences(path.read_text(encoding="utf-8"))
        out += [(_rel(path), m.group(1)) for m in _REPO_PATH.finditer("\n".join(prose))]
    return list(dict.fromkeys(out))


@pytest.mark.parametrize(("source", "path"), _repository_paths())
def test_repository_paths_named_in_the_docs_exist(source, path):
    if path in PENDING and not (ROOT / path).exists():
        pytest.skip(f"{source} names {path}, not checked: {PENDING[path]}")
    assert (ROOT / path).exists(), f"{source} names `{path}`, which does not exist (moved or renamed?)"


# ------------------------------------------------------------------------------------------------------- code blocks


@pytest.mark.parametrize("page", ["quickstart.md", "api.md", "faq.md"])
def test_python_blocks_parse(page):
    blocks = _python_blocks(DOCS / page)
    assert blocks, f"docs/{page} has no python block"
    for code, line in blocks:
        try:
            ast.parse(code)
        except SyntaxError as err:
            pytest.fail(f"docs/{page}: the python block at line {line} does not parse: {err}")


def _runnable_blocks(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() == RUNNABLE_MARKER:
            rest = "\n".join(lines[i + 1 :])
            _, blocks = _split_fences(rest)
            assert blocks and blocks[0][0] == "python" and blocks[0][2] == 1, (
                f"{RUNNABLE_MARKER} in {_rel(path)} (line {i + 1}) must sit right above a ```python block"
            )
            found.append(blocks[0][1])
    return found


def test_quickstart_tiny_model_block_runs(tmp_path):
    blocks = _runnable_blocks(QUICKSTART)
    assert len(blocks) == 1, f"docs/quickstart.md should mark exactly one block with {RUNNABLE_MARKER}"
    script = tmp_path / "quickstart_tiny.py"
    script.write_text("import torch\n\ntorch.set_num_threads(1)\n\n" + blocks[0] + "\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"the quickstart block failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "window: (2, 4)" in result.stdout
    assert "match the trained adapter" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart_tiny.py"], "the block left files behind"
