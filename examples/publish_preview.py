"""What `push_to_hub` would publish for a saved CoFiTune adapter: the card and the files of the commit, offline.

    python examples/publish_preview.py outputs/demo/adapters/<run key> --repo-id you/smollm2-arithmetic-cofitune
    python examples/publish_preview.py --demo outputs/demo --repo-id you/smollm2-arithmetic-cofitune

It loads the adapter onto its base model (`--base`: a folder, a Hub id or `smollm2`; by default the base the adapter
names, and the embedded SmolLM2 for `HuggingFaceTB/SmolLM2-135M-Instruct`), writes with `cofitune_peft.hub.save_for_hub`
exactly the folder that `peft_model.push_to_hub(repo_id)` commits (tests/test_hub.py checks that the two agree), and
prints the file list (with sizes) and the card. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import cofitune_peft  # noqa: F401  (registers CoFiTune with PEFT)
from cofitune_peft import CoFiTuneError
from cofitune_peft.hub import save_for_hub
from cofitune_peft.kit.loading import SMOLLM2_HUB_ID, load_model


def demo_adapter(output_dir: str) -> str:
    """The adapter the demo selected (`demo.json`'s `adapter`)."""
    with open(os.path.join(output_dir, "demo.json"), encoding="utf-8") as f:
        adapter = json.load(f).get("adapter")
    if not adapter:
        raise CoFiTuneError(
            f"`--demo`: {output_dir}/demo.json names no adapter; run `cofitune demo` to the end first."
        )
    return adapter


def preview(adapter: str, repo_id: str, base: str | None = None, base_model_id: str | None = None) -> tuple[list, str]:
    """`([(file, bytes)], card text)` of what `push_to_hub(repo_id)` would commit for the adapter folder `adapter`."""
    from peft import PeftModel

    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        recorded = json.load(f).get("base_model_name_or_path")
    if base is None:
        base = "smollm2" if recorded in (None, SMOLLM2_HUB_ID) else recorded
    model, _ = load_model(base, base_model_id=base_model_id)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with tempfile.TemporaryDirectory() as folder:
        files = save_for_hub(peft_model, folder, repo_id=repo_id, base_model_id=base_model_id)
        sizes = [(name, os.path.getsize(os.path.join(folder, name))) for name in files]
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            card = f.read()
    return sizes, card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", nargs="?", help="a saved CoFiTune adapter folder")
    parser.add_argument("--demo", help="a `cofitune demo` output folder: preview the adapter it selected")
    parser.add_argument("--repo-id", default="your-name/smollm2-arithmetic-cofitune", help="the repository to name")
    parser.add_argument("--base", help="the base model: a folder, a Hub id or 'smollm2' (default: the adapter's)")
    parser.add_argument("--base-model-id", help="the base model's Hub id, when the adapter does not record one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if (args.adapter is None) == (args.demo is None):
        parser.error("pass an adapter folder or --demo OUTPUT_DIR (one of them)")
    adapter = args.adapter or demo_adapter(args.demo)
    sizes, card = preview(adapter, args.repo_id, args.base, args.base_model_id)
    print(f"# push_to_hub({args.repo_id!r}) of {adapter} commits:\n")
    for name, size in sizes:
        print(f"- {name} ({size:,} bytes)")
    print("\n# README.md\n")
    print(card)


if __name__ == "__main__":
    main()
