"""Why the soft mask must act on the update: movement of a masked unit over an unmasked one, per placement.

A unit (FFN intermediate neuron) gets soft-mask factor s = 1 - I. A working mask moves its weights s times as far as
an unmasked twin run (same data, same seed). This script trains a tiny Llama (8 layers, window 2..3) for 50 steps with
each placement x optimizer and prints the ratio; it is deterministic (no timing), so it can run anywhere.

    python benchmarks/bench_mask_placement.py [--out benchmarks/results/mask_placement.json]
"""

from __future__ import annotations

import argparse

import torch
import transformers as T
from _common import markdown, write_json
from peft import get_peft_model

from cofitune_peft import CoFiTuneConfig, Importance

SCALES = (0.5, 0.1, 0.01, 1e-4)
UNIT = 7
KEY = "base_model.model.model.layers.2.mlp.up_proj"


def tiny():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    return T.AutoModelForCausalLM.from_config(cfg)


def importance(scale: float | None) -> Importance:
    inter = torch.zeros(8, 48)
    if scale is not None:
        inter[2, UNIT] = 1 - scale
    return Importance(intermediate=inter, output=torch.zeros(8, 32), normalized=True)


def movement(mode: str, optimizer: str, scale: float | None, steps: int) -> float:
    pm = get_peft_model(tiny(), CoFiTuneConfig(layers=(2, 4), importance=importance(scale), softmask_mode=mode))
    layer = pm.get_submodule(KEY)
    start = (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach().clone()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        if optimizer == "AdamW"
        else torch.optim.SGD(params, lr=1e-1)
    )
    pm.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(3, 128, (4, 12), generator=g)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    end = layer.get_base_layer().weight + layer.get_delta_weight("default")
    return float((end - start)[UNIT].norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/mask_placement.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for mode, optimizer, label in [
        ("gradient", "AdamW", "gradient scaled (the paper's placement), AdamW"),
        ("gradient", "SGD", "gradient scaled, SGD"),
        ("update", "AdamW", "update scaled (the step on W times s; default), AdamW"),
        ("update", "SGD", "update scaled, SGD"),
    ]:
        free = movement(mode, optimizer, None, args.steps)
        ratios = [movement(mode, optimizer, s, args.steps) / free for s in SCALES]
        rows.append({"placement": label, **{f"s={s:g}": r for s, r in zip(SCALES, ratios)}})
    print(markdown(rows, float_format=".4g"))
    write_json(args.out, {"steps": args.steps, "unit": UNIT, "rows": rows})


if __name__ == "__main__":
    main()
