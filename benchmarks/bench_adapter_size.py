"""Adapter size on disk: CoFiTune (several windows, modules and save dtypes) vs LoRA r16 (all linear) vs the full model.

SmolLM2-135M-Instruct (30 layers, fp32). Each adapter is built on a freshly loaded model and written with
`save_pretrained`; nothing is trained (the file size does not depend on the values). The file is
`adapter_model.safetensors`; the "full model" reference is the fp32 `model.safetensors` of the cached checkpoint that
`load_smollm2` loads (tied embeddings are stored once). A CoFiTune adapter holds, per trained module, the delta (in
the weight's layout, in `save_dtype` when set) and the per-row fp32 mask factors `1 - I`; the factors are stored with
or without an importance, so the mask adds nothing to the file.

    python benchmarks/bench_adapter_size.py [--windows 7:9 7:11 0:15 0:30] [--out benchmarks/results/adapter_size.json]

It also states the size at larger shapes (`--shapes`, default Llama-3-8B) without weights: the tensors of the default
window's adapter (`get_peft_model` on a meta model, each delta in fp32 or bf16 plus its fp32 row factors) and of LoRA
r16 all-linear, counted from the shapes (the safetensors header adds a few kilobytes).

Estimate, not a measurement: the default run takes well under a minute (about 11 model loads and ~0.8 GB of writes,
to a temporary folder that is deleted afterwards). Sizes do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import markdown, random_importance, write_json

DEFAULT_WINDOWS = ["7:9", "7:11", "0:15", "0:30"]  # the default window (7, 15) is measured anyway


def dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def stored_dtypes(path: str) -> str:
    """The dtypes of the tensors in an adapter file, with how many tensors of each."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            dtype = str(f.get_slice(key).get_dtype())
            counts[dtype] = counts.get(dtype, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def configurations(windows: list[tuple[int, int]]) -> dict[str, tuple[str, dict | None]]:
    """name -> (description, CoFiTuneConfig kwargs; None for LoRA)."""
    configs: dict[str, tuple[str, dict | None]] = {
        "lora_r16": ("LoRA r16, all linear (fp32)", None),
        "cofitune_default": ("CoFiTune, default window, ffn, fp32", {}),
        "cofitune_default_mask": ("CoFiTune, default window, ffn, fp32, with mask", {"importance": "random"}),
        "cofitune_default_bf16": ("CoFiTune, default window, ffn, save_dtype=bfloat16", {"save_dtype": "bfloat16"}),
        "cofitune_default_fp16": ("CoFiTune, default window, ffn, save_dtype=float16", {"save_dtype": "float16"}),
        "cofitune_default_delta_bf16": (
            "CoFiTune, default window, ffn, delta_dtype=bfloat16 (trained in bf16)",
            {"delta_dtype": "bfloat16"},
        ),
        "cofitune_ffn_mha": ("CoFiTune, default window, ffn+mha, fp32", {"target_modules": "ffn+mha"}),
        "cofitune_all": ("CoFiTune, default window, all linear, fp32", {"target_modules": "all"}),
    }
    for a, b in windows:
        configs[f"cofitune_window_{a}_{b}"] = (
            f"CoFiTune, window ({a}, {b}) = {b - a} layers, ffn, fp32",
            {"layers": (a, b)},
        )
    return configs


def measure(name: str, kwargs: dict | None, folder: str) -> dict:
    from peft import LoraConfig, get_peft_model

    import cofitune_peft  # noqa: F401
    from cofitune_peft import CoFiTuneConfig
    from cofitune_peft.kit.loading import load_smollm2

    model, _ = load_smollm2()
    if kwargs is None:
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    else:
        kwargs = dict(kwargs)
        if kwargs.get("importance") == "random":
            kwargs["importance"] = random_importance(model.config)
        peft_config = CoFiTuneConfig(**kwargs)
    peft_model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    out = os.path.join(folder, name)
    peft_model.save_pretrained(out)
    file = os.path.join(out, "adapter_model.safetensors")
    resolved = getattr(peft_model.peft_config["default"], "layers", None)
    return {
        "name": name,
        "trainable_params": trainable,
        "file_mb": os.path.getsize(file) / 1e6,
        "folder_mb": dir_mb(out),
        "stored_dtypes": stored_dtypes(file),
        "window": list(resolved) if resolved is not None else None,
    }


def shape_estimate(shape: str) -> list[dict]:
    """Adapter bytes at a `KNOWN_SHAPES` shape, from the real plan on a meta model: CoFiTune's default window (its
    deltas in fp32 and bf16, plus one fp32 factor per row) and LoRA r16 all-linear (fp32 and bf16)."""
    from cofitune_peft.kit.memory import Shapes, cofitune_plan, load_config, meta_model

    config = load_config(shape)
    shapes = Shapes.from_model(meta_model(config))
    trainable, window, wrapped = cofitune_plan(config)[:3]
    rows = sum(o for layer, names in wrapped.items() for n, _, o in shapes.linears[layer] if n in names)
    lora = sum(16 * (i + o) for lin in shapes.linears for _, i, o in lin)
    out = []
    for label, params, per, extra in (
        (f"CoFiTune, default window {tuple(window)}, ffn, fp32", trainable, 4, 4 * rows),
        (f"CoFiTune, default window {tuple(window)}, ffn, bf16 (delta_dtype or save_dtype)", trainable, 2, 4 * rows),
        ("LoRA r16, all linear, fp32 (PEFT's default)", lora, 4, 0),
        ("LoRA r16, all linear, bf16", lora, 2, 0),
    ):
        out.append({"shape": shape, "configuration": label, "params M": params / 1e6,
                    "file MB": (params * per + extra) / 1e6})  # fmt: skip
    lora_fp32 = out[2]["file MB"]
    for row in out:
        row["/ LoRA fp32"] = row["file MB"] / lora_fp32
    return out


def parse_window(text: str) -> tuple[int, int]:
    a, b = (int(x) for x in text.split(":"))
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--windows", nargs="*", default=DEFAULT_WINDOWS, help="extra CoFiTune windows a:b (layers a..b-1), ffn"
    )
    parser.add_argument("--configs", nargs="*", default=None, help="only these configuration names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (building adapters needs little)")
    parser.add_argument("--shapes", nargs="*", default=["llama-3-8b"], help="KNOWN_SHAPES to state the size at")
    parser.add_argument("--out", default="benchmarks/results/adapter_size.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from cofitune_peft.kit.loading import smollm2_path

    full_file = os.path.join(smollm2_path(), "model.safetensors")
    full_mb = os.path.getsize(full_file) / 1e6
    from safetensors import safe_open

    with safe_open(full_file, framework="pt") as f:
        full_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118

    configs = configurations([parse_window(w) for w in args.windows])
    if args.configs:
        unknown = sorted(set(args.configs) - set(configs))
        if unknown:
            parser.error(f"unknown configurations {unknown}; known: {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.configs}

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_adapter_size-") as folder:
        for name, (_, kwargs) in tqdm(configs.items(), desc="adapters"):
            results[name] = measure(name, kwargs, folder)

    lora_mb = results["lora_r16"]["file_mb"] if "lora_r16" in results else float("nan")
    rows = [
        {
            "configuration": "full model (model.safetensors, fp32)",
            "params M": full_params / 1e6,
            "file MB": full_mb,
            "stored": stored_dtypes(full_file),
            "/ LoRA": full_mb / lora_mb,
            "/ full model": 1.0,
        }
    ]
    for name, r in results.items():
        rows.append(
            {
                "configuration": configs[name][0],
                "params M": r["trainable_params"] / 1e6,
                "file MB": r["file_mb"],
                "stored": r["stored_dtypes"],
                "/ LoRA": r["file_mb"] / lora_mb,
                "/ full model": r["file_mb"] / full_mb,
            }
        )
    table = markdown(rows)
    print("SmolLM2-135M-Instruct (30 layers); params M: trainable parameters (the full model: all of them)")
    print(table)
    full_model = {"file": "model.safetensors", "file_mb": full_mb, "params": full_params}
    estimates = [row for shape in args.shapes for row in shape_estimate(shape)]
    shape_table = markdown(estimates) if estimates else ""
    if estimates:
        print("\nFrom the shapes (no weights): adapter tensors' bytes")
        print(shape_table)
    write_json(args.out, {"args": vars(args), "full_model": full_model, "results": results, "table": table,
                          "shape_estimates": estimates, "shape_table": shape_table})  # fmt: skip
    print(f"wrote {args.out}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
