"""A Llama's importance, adapters and training are bit-identical to those of 0.2.0 (main at 853b33b).

`tests/fixtures/bit_identity_v0_2_0.safetensors` holds what `scripts/bit_identity.py --model tiny --write` gave with
0.2.0's code: the importance estimated from fixed texts, and for `ffn` and `ffn+mha` the saved adapter (deltas and
soft-mask scales) after three AdamW steps, the losses and the logits. Reading layouts from the model must not change
a single bit of that on the architectures 0.2.0 supported.
"""

from __future__ import annotations

import importlib.util
import pathlib

from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_llama_is_bit_identical_to_version_0_2_0():
    spec = importlib.util.spec_from_file_location("bit_identity", ROOT / "scripts" / "bit_identity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = load_file(str(ROOT / "tests" / "fixtures" / "bit_identity_v0_2_0.safetensors"))
    assert script.compare(script.run("tiny"), expected) == []
