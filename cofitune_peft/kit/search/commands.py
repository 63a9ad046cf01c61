"""`cofitune search` and `cofitune report`: the coarse search from files on disk, and its table and plot.

`cofitune search` loads `--model` with `kit.loading` (a local folder, a Hub id, or the embedded `smollm2`), reads the
training and eval sets as JSON lines and the general text as paragraphs, builds the evaluators, runs `search_layers`
and prints the result; `cofitune report` prints a finished or partial search again.
"""

from __future__ import annotations

import argparse
import logging
import os

from cofitune_peft import CoFiTuneError

from .._cli_common import read_jsonl, read_text_chunks
from ..evaluation import VersatilityEval
from ..evaluation.speciality import speciality_for_examples
from ..loading import MODEL_HELP, load_model_for_command
from .result import SearchResult
from .tree import LEVELS, search_layers


def read_general_text(path: str, min_chars: int = 800) -> list[str]:
    """Paragraphs (blank-line separated) of a text file, merged into chunks of at least `min_chars` characters."""
    chunks = read_text_chunks(path, min_chars)
    if not chunks:
        raise CoFiTuneError(f"{path!r} holds no text.")
    return chunks


def _model_loader(name: str, gguf_file: str | None):
    """`(loader, tokenizer)`: `loader()` hands out the model loaded with the tokenizer first, then fresh ones."""
    model, tokenizer = load_model_for_command(name, gguf_file)
    first = [model]
    del model

    def loader():
        return first.pop() if first else load_model_for_command(name, gguf_file)[0]

    return loader, tokenizer


def _parse_windows(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    try:
        return [tuple(int(x) for x in part.split(":")) for part in text.split(",")]
    except ValueError:
        raise CoFiTuneError(f"`--windows` takes 'a:b,c:d' (0-based, b exclusive), got {text!r}.") from None


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help=f"{MODEL_HELP}; default smollm2")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load (dequantised)")
    parser.add_argument("--train", required=True, help="training JSONL: prompt/completion, messages or text")
    parser.add_argument("--eval", required=True, help="speciality JSONL: prompt/answer (or prompt/options/answer)")
    parser.add_argument("--general", help="general text file for versatility (CE drift and KL)")
    parser.add_argument("--probes", help="versatility probes JSONL: prompt/answer or prompt/options/answer")
    parser.add_argument("--budget-steps", type=int, required=True, help="optimizer steps of every fine-tune")
    parser.add_argument("--output-dir", required=True, help="results directory (re-run to resume)")
    parser.add_argument("--lr", type=float, default=1e-4, help="CoFiTune candidates' learning rate")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning reference's learning rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length of exact-match evals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated subset of window,module,refine")
    parser.add_argument("--width", type=int, default=2, help="level-1 windows that get other modules in level 2")
    parser.add_argument("--windows", help="level-1 windows instead of the paper's, e.g. '7:15,15:22'")
    parser.add_argument("--weight", type=float, default=0.5, help="weight of Spec. in Uni.")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def search_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    loader, tokenizer = _model_loader(args.model, args.gguf_file)
    evals = read_jsonl(args.eval)
    progress = not args.no_progress
    speciality = speciality_for_examples(
        evals, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, progress=progress
    )
    general = read_general_text(args.general) if args.general else None
    probes = read_jsonl(args.probes) if args.probes else None
    versatility = VersatilityEval.default(
        general, probes, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, progress=progress
    )
    result = search_layers(
        loader,
        read_jsonl(args.train),
        speciality,
        versatility,
        tokenizer=tokenizer,
        budget_steps=args.budget_steps,
        output_dir=args.output_dir,
        learning_rate=args.lr,
        full_ft_learning_rate=args.full_lr,
        windows=_parse_windows(args.windows),
        levels=[x.strip() for x in args.levels.split(",") if x.strip()],
        width=args.width,
        seed=args.seed,
        progress=progress,
        weight=args.weight,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    _print_report(result, os.path.join(args.output_dir, "search.png"))
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a search's output directory (finished or partial)")
    parser.add_argument("--weight", type=float, help="weight of Spec. in Uni. (default: the search's)")
    parser.add_argument("--plot", help="where to write the plot (default: OUTPUT_DIR/search.png)")


def report_command(args: argparse.Namespace) -> int:
    result = SearchResult.load(args.output_dir, weight=args.weight)
    _print_report(result, args.plot or os.path.join(args.output_dir, "search.png"))
    return 0


def _print_report(result: SearchResult, plot_path: str) -> None:
    print(result.to_markdown())
    if result.candidates():
        best = result.best
        print(f"\nbest: CoFiTuneConfig(layers={tuple(best['window'])}, parts={best['modules']!r})")
    print(f"plot: {result.plot(plot_path)}")
