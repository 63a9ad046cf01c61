"""Bit-identity of the importance, the adapters and training against another version of cofitune-peft.

One fixed recipe (importance from fixed texts, then for `ffn` and `ffn+mha`: an adapter with that importance's soft
mask, three AdamW steps, the saved adapter file and the logits), run in a fresh process for each source tree, and
every tensor and loss compared bit for bit:

    python scripts/bit_identity.py --reference /work/main --model tiny      # a tiny Llama (seconds)
    python scripts/bit_identity.py --reference /work/main --model smollm2   # SmolLM2-135M-Instruct (a few minutes)

`--write OUT` runs the recipe with the source tree on `PYTHONPATH` (or this one) and writes OUT (a safetensors file);
`tests/fixtures/bit_identity_v0_2_0.safetensors` was written by 0.2.0 (main at 853b33b) for the tiny Llama, and
`tests/test_bit_identity.py` compares this tree with it. Only the public API that 0.2.0 already had is used.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [f"Example {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs near the river bank." for i in range(16)]


def _model(name: str):
    import torch

    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_model, tiny_tokenizer

        return tiny_model("llama", num_layers=8, seed=0), tiny_tokenizer()
    from cofitune_peft.kit.loading import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    return model.eval(), tokenizer


def run(name: str) -> dict:
    """The recipe's tensors (importance parts, adapter files, logits) and losses, by name."""
    import copy

    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file

    from cofitune_peft import CoFiTuneConfig, estimate_importance

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tokenizer = _model(name)
    out: dict[str, torch.Tensor] = {}
    importance = estimate_importance(
        model, TEXTS, tokenizer=tokenizer, num_samples=8, batch_size=4, max_length=32, progress=False
    )
    out.update({f"importance.{k}": v for k, v in importance.parts().items()})
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True, truncation=True, max_length=24)
    layers = model.config.num_hidden_layers
    for parts in ("ffn", "ffn+mha"):
        torch.manual_seed(0)
        pm = get_peft_model(copy.deepcopy(model), CoFiTuneConfig(target_modules=parts, importance=importance))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        pm.train()
        losses = []
        for _ in range(3):
            loss = pm(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        pm.eval()
        out[f"{parts}.losses"] = torch.stack(losses)
        with torch.no_grad():
            out[f"{parts}.logits"] = pm(**batch).logits
        with tempfile.TemporaryDirectory() as folder:
            pm.save_pretrained(folder)
            for key, value in load_file(os.path.join(folder, "adapter_model.safetensors")).items():
                out[f"{parts}.adapter.{key}"] = value
        assert pm.peft_config["default"].layers == (layers // 4, layers // 2)
    return out


def compare(a: dict, b: dict) -> list[str]:
    """What differs between two results (empty: bit-identical)."""
    import torch

    problems = [f"only in one: {k}" for k in sorted(set(a) ^ set(b))]
    for key in sorted(set(a) & set(b)):
        if a[key].dtype != b[key].dtype or a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].shape == b[key].shape else "shape"
            problems.append(f"{key}: differs (max abs difference {diff})")
    return problems


def _in_tree(tree: pathlib.Path, name: str, out: pathlib.Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--model", name, "--write", str(out)], check=True, env=env, cwd=tree)


def main(argv=None) -> int:
    from safetensors.torch import load_file, save_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--reference", type=pathlib.Path, help="the other source tree (e.g. /work/main)")
    parser.add_argument("--write", type=pathlib.Path, help="write this tree's result to a safetensors file")
    args = parser.parse_args(argv)
    if args.write:
        save_file({k: v.contiguous() for k, v in run(args.model).items()}, str(args.write))
        return 0
    if args.reference is None:
        parser.error("pass --reference TREE (to compare with) or --write OUT")
    with tempfile.TemporaryDirectory() as folder:
        mine, theirs = pathlib.Path(folder, "mine.safetensors"), pathlib.Path(folder, "reference.safetensors")
        _in_tree(ROOT, args.model, mine)
        _in_tree(args.reference.resolve(), args.model, theirs)
        problems = compare(load_file(str(mine)), load_file(str(theirs)))
        count = len(load_file(str(mine)))
    print(json.dumps({"model": args.model, "tensors": count, "bit_identical": not problems, "differences": problems}))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
