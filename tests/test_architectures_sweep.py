"""The architecture sweep (`tests/sweep.py`): every causal-LM family of the installed transformers through CoFiTune's
five steps for `parts="ffn"` and `parts="mha"`, and docs/architectures.md (with the README's list) matching it.

Every family must pass every step unless it is listed below with the reason CoFiTune gives (a pattern of its
message): a refusal by name, the coarse level only, or a tiny model the sweep cannot build offline. Nothing may fail
any other way.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
from families import FAMILIES
from sweep import PARTS, outcome

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PURE_SSM = ("refused", "has no attention or feed-forward layer")
_STACKS = ("refused", "several stacks of layers")
_TIED = ("refused", "shares its weights with other decoder layers")
_NO_ATTENTION = ("refused", "matched no module")
_BUILD = ("not built", "")
EXPECTED = {
    **{(f, p): _PURE_SSM for f in ("mamba", "mamba2", "falcon_mamba") for p in PARTS},
    **{(f, p): _STACKS for f in ("blt", "hrm_text", "xlm") for p in PARTS},
    **{(f, p): _TIED for f in ("zamba", "zamba2") for p in PARTS},
    **{
        (f, p): _BUILD
        for f in (
            "dots3_note",
            "gemma3n",
            "gemma4_assistant",
            "gemma4_unified_assistant",
            "musicgen",
            "musicgen_melody",
        )
        for p in PARTS
    },
    # attention CoFiTune cannot read (named in the message) or none at all: the FFN trains
    ("deepseek_v4", "mha"): ("refused", r"DeepseekV4Attention\): no output projection"),
    ("jetmoe", "mha"): ("refused", r"JetMoeAttention\): its projections are experts"),
    ("xlnet", "mha"): ("refused", r"XLNetRelativeAttention\): no Linear projections"),
    ("zaya", "mha"): ("refused", r"ZayaAttention\): no value projection"),
    ("rwkv", "mha"): ("refused", r"RwkvSelfAttention\): neither the module nor the config gives a head count"),
    ("xlstm", "mha"): ("refused", "recurrent"),
    **{("reformer", p): ("coarse only", "reversible layers") for p in PARTS},
}


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, part):
    result = outcome(family, part)
    status, pattern = EXPECTED.get((family, part), ("ok", ""))
    assert result.status == status, f"{family} {part}: {result.status}: {result.detail}"
    assert re.search(pattern, result.detail), result.detail


def test_every_expected_outcome_names_a_family_of_the_installed_transformers():
    assert {family for family, _ in EXPECTED} <= set(FAMILIES)


def test_docs_and_readme_match_the_sweep():
    spec = importlib.util.spec_from_file_location("architectures_table", ROOT / "scripts" / "architectures_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc, section = script.render()
    assert (ROOT / "docs" / "architectures.md").read_text(encoding="utf-8") == doc, (
        "docs/architectures.md is stale: run `python scripts/architectures_table.py`"
    )
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert script.replace_section(readme, section) == readme, "the README's architecture list is stale: run the script"
