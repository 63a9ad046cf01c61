"""`cofitune importance`: load a model and a data file, estimate the importance, and save it (and a heatmap).

Models come through `kit.loading.load_model`: a local transformers folder (a GGUF file inside one is dequantised), a
Hugging Face Hub id, or `smollm2` for the embedded SmolLM2; data files are `.txt` (paragraphs, or lines), `.jsonl` /
`.json` examples, or a `datasets.save_to_disk` folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

import torch

from cofitune_peft import CoFiTuneError
from cofitune_peft.architectures import model_layout
from cofitune_peft.errors import import_extra
from cofitune_peft.estimation import ACCUMULATE, RECIPES, estimate_importance
from cofitune_peft.importance import PARTS

from .loading import DTYPES, MODEL_HELP, load_model_for_command

logger = logging.getLogger(__name__)


def add_importance_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cofitune importance`."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantised)")
    parser.add_argument("--data", required=True, help=".txt, .jsonl or .json file, or a datasets.save_to_disk folder")
    parser.add_argument("--out", required=True, help="importance file to write (safetensors)")
    parser.add_argument("--num-samples", type=int, default=512, help="examples to use (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="run each batch in slices of this many examples, gradients summed (less memory, same per-batch "
        "accumulation; e.g. 1 or 2 with --recipe authors)",
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per example (default 256; 512 with --recipe authors)"
    )
    parser.add_argument("--text-field", default=None, help="field with the text or messages (default text/messages)")
    parser.add_argument("--dropout", type=float, default=0.003, help="injected dropout (default 0.003)")
    parser.add_argument(
        "--accumulate", choices=ACCUMULATE, default=None, help="|grad| (DAS; default) or signed (the authors' code)"
    )
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="default",
        help="'authors': the authors' code's estimator (signed, never-zeroed gate gradients, left-padded to 512 with "
        "the KL over padding, dropout on the attention probabilities under eager attention)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="default: every part the model has")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available)")
    parser.add_argument("--plot", default=None, help="also write a heatmap PNG here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_out_path(flag: str, path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CoFiTuneError(f"`{flag}`: the folder {folder!r} of {path!r} does not exist; create it first.")


def _read_data(path: str):
    """A list of texts / examples from a .txt, .jsonl or .json file, or a `datasets` folder."""
    if os.path.isdir(path):
        datasets = import_extra("datasets", "`--data` with a `datasets.save_to_disk` folder", extra="eval")

        try:
            data = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise CoFiTuneError(f"`--data`: {path!r} is not a `datasets.save_to_disk` folder ({err}).") from err
        if isinstance(data, datasets.DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            logger.info("`--data`: using split %r of %s", split, sorted(data))
            data = data[split]
        return data
    if not os.path.isfile(path):
        raise CoFiTuneError(f"`--data`: no file or folder at {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if ext == ".txt":
        blocks = re.split(r"\n\s*\n", content)
        docs = blocks if len(blocks) > 1 else content.splitlines()
        return [d.strip() for d in docs if d.strip()]
    if ext in (".jsonl", ".json"):
        try:
            rows = json.loads(content) if ext == ".json" else None
        except json.JSONDecodeError:
            rows = None  # a JSON-lines file named .json
        if rows is None:
            rows = []
            for number, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise CoFiTuneError(f"`--data`: line {number} of {path!r} is not JSON ({err}).") from err
        if not isinstance(rows, list):
            raise CoFiTuneError(f"`--data`: {path!r} must hold a JSON list of examples, got a {type(rows).__name__}.")
        return rows
    raise CoFiTuneError(
        f"`--data`: unsupported file type {ext or '(none)'!r} of {path!r}; use .txt, .jsonl, .json or a "
        "`datasets.save_to_disk` folder."
    )


def importance_command(args: argparse.Namespace) -> int:
    """`cofitune importance`: estimate the importance and write it with `Importance.save` (and `--plot`)."""
    _check_out_path("--out", args.out)
    _check_out_path("--plot", args.plot)
    data = _read_data(args.data)
    if len(data) == 0:
        raise CoFiTuneError(f"`--data`: {args.data!r} holds no examples.")
    model, tokenizer = load_model_for_command(args.model, args.gguf_file, args.dtype)
    model_layout(model)  # a clear error for a model CoFiTune cannot read, before any work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    importance = estimate_importance(
        model,
        data,
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_length=args.max_length,
        dropout=args.dropout,
        accumulate=args.accumulate,
        recipe=args.recipe,
        seed=args.seed,
        parts=args.parts,
        text_field=args.text_field,
        progress=not args.no_progress,
    )
    importance.metadata["data"] = os.path.abspath(args.data)
    importance.save(args.out)
    if args.plot:
        importance.plot(args.plot, title=f"importance of {os.path.basename(os.path.normpath(args.model))}")
    meta = importance.metadata
    print(f"wrote {args.out} ({meta['num_samples']} examples, {meta['num_tokens']} tokens)")
    return 0
