"""How far does the project's importance estimator rank units from the authors' code, deviation by deviation?

`estimate_importance(..., recipe="authors")` is the authors' code choice by choice (signed sums, gate gradients never
zeroed, every batch left-padded to `max_length` with the KL over the padded positions too, the attention dropout on the
attention probabilities, eager attention); the default recipe differs in each. For every deviation this script
estimates

- the default with that one choice switched to the authors' (`default + it`), and
- the authors' recipe with that one choice switched back to the default (`authors - it`),

and reports the Spearman correlation of their normalised scores with the full authors' recipe, per part (attention
heads, FFN intermediate units, FFN outputs; all units of all layers ranked together). The reference is the authors'
recipe at seed 0 and every other configuration runs at seed 1 (other dropout masks), so that the noise ceiling, the
same correlation between the authors' recipe at seeds 1 and 0, is the yardstick of every row: a configuration at the
ceiling ranks like the authors' code up to the estimate's own noise. `default` (every deviation at once) is reported
too, and the default's own ceiling (its seeds 1 and 0).

Every configuration runs on the same texts, in the same order, with the same `max_length` (a data setting here, not a
deviation: the texts are shorter, so only the padded width depends on it). The model starts with its default SDPA
attention, as a user's loaded model does; configurations that need eager attention switch to it for the estimate.

- `--model tiny` (default): a random 4-layer Llama (hidden 64, 4 heads, intermediate 256) with a character tokenizer,
  on windows of the kit's general text (importance split) of random lengths, so that left padding to `--max-length`
  fills about 44% of the positions; 384 batches of 4 at 256 tokens. Random weights give near-uniform attention, where
  the dropout's placement matters most.
- `--model smollm2`: SmolLM2-135M-Instruct on the kit's general texts (importance split, whole chunks, ~200 tokens
  each; `--batches` cycles through them if it needs more than 380); 32 batches of 2 at 512 tokens, the authors'
  length.

    OMP_NUM_THREADS=1 python benchmarks/bench_estimator_fidelity.py [--model tiny|smollm2] [--batches N]
        [--batch-size B] [--max-length L] [--threads 1] [--sides both|authors_minus|default_plus]
        [--cache-dir DIR] [--out PATH] [--no-progress]

17 estimates: the default and the authors' recipe at two seeds, 7 configurations `default + it`, 6 `authors - it`
(`--sides authors_minus`: 10). On one thread of the project's shared 2-core machine: tiny, 128 batches ~10 min (384:
~30 min); SmolLM2 at 512 tokens needs ~10 GB at batch 2 (batch 8 does not fit in 23 GB), and one batch of 2 takes
~15 s (right-padded) to ~60 s (padded to 512, eager) per configuration, so `--model smollm2 --batch-size 2
--batches 32 --sides authors_minus` is ~2-4 h.

Writes the JSON to `--out` (default `benchmarks/results/estimator_fidelity_<model>.json`) and a bar chart next to it
(same name, `.png`). `--cache-dir` keeps each configuration's importance (safetensors) so that an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from _common import markdown, write_json

from cofitune_peft import Importance, estimate_importance
from cofitune_peft.estimation import RECIPES

PARTS = ("heads", "intermediate", "output")
MODEL_DEFAULTS = {
    "tiny": {"batches": 384, "batch_size": 4, "max_length": 256},
    "smollm2": {"batches": 32, "batch_size": 2, "max_length": 512},
}
DEFAULT, AUTHORS = RECIPES["default"], RECIPES["authors"]
# name -> (the authors' choice, the options it sets, whether it needs eager attention). `default + it` switches these
# options of the default to the authors'; `authors - it` switches them back to the default's in the authors' recipe.
DEVIATIONS: dict[str, tuple[str, dict, bool]] = {
    "signed": ("signed sums (`accumulate`)", {"accumulate": "signed"}, False),
    "never_zeroed": ("gate gradients never zeroed (`gate_grads`)", {"gate_grads": "never_zeroed"}, False),
    "kl_all": ("KL over every position (`kl_positions`)", {"kl_positions": "all"}, False),
    "padding": (
        "left padding to max_length (`padding`, `padding_side`)",
        {"padding": "max_length", "padding_side": "left"},
        False,
    ),
    "kl_padding": (
        "KL over left padding to max_length, eager (`kl_positions`, `padding`, `padding_side`)",
        {"kl_positions": "all", "padding": "max_length", "padding_side": "left"},
        True,
    ),
    "probabilities": (
        "attention dropout on the probabilities, eager (`attention_dropout`)",
        {"attention_dropout": "probabilities"},
        True,
    ),
    "eager": ("eager attention (`attn_implementation`)", {}, True),
}


def configurations(max_length: int, sides: str = "both") -> dict[str, dict]:
    """Every configuration as complete `estimate_importance` options (`recipe` options, `max_length` fixed); `sides`
    keeps the `default + it` ones, the `authors - it` ones, or both."""
    default = {**DEFAULT, "max_length": max_length}
    authors = {**AUTHORS, "max_length": max_length}
    out = {"default": default, "authors": authors}
    for name, (_, switch, eager) in DEVIATIONS.items():
        if sides in ("both", "default_plus"):
            out[f"default+{name}"] = {**default, **switch, **({"attn_implementation": "eager"} if eager else {})}
        if name != "eager" and sides in ("both", "authors_minus"):  # the probabilities need eager attention
            out[f"authors-{name}"] = {**authors, **{k: DEFAULT[k] for k in switch}}
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two tensors of the same shape (all elements; ties get their average rank)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        values, order = x.flatten().double().sort()
        _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        average = ends - (counts.double() - 1) / 2  # 1-based average rank of each group of ties
        out = torch.empty_like(values)
        out[order] = average[inverse]
        return out

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < 128), `<s>` before each text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_setup(count: int, max_length: int, seed: int = 0):
    """`(model, tokenizer, texts)`: a random tiny Llama, the character tokenizer, `count` windows of general text of
    random lengths between max_length / 8 and max_length - 1 characters (one token each, plus `<s>`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cofitune_peft.kit.data import general_texts

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(1024, max_length),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    corpus = " ".join(general_texts(split="importance", source="all")["text"])
    corpus = "".join(c if 32 <= ord(c) < 127 else " " for c in corpus)
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        length = rng.randint(max_length // 8, max_length - 1)
        start = rng.randrange(len(corpus) - length)
        texts.append(corpus[start : start + length])
    return model, char_tokenizer(), texts


def smollm2_setup(count: int):
    """`(model, tokenizer, texts)`: SmolLM2-135M-Instruct and the kit's general texts (importance split), cycled."""
    from cofitune_peft.kit.data import general_texts
    from cofitune_peft.kit.loading import load_smollm2

    model, tokenizer = load_smollm2()
    rows = list(general_texts(split="importance", source="all")["text"])
    return model.eval(), tokenizer, [rows[i % len(rows)] for i in range(count)]


def padding_fraction(tokenizer, texts: list[str], max_length: int) -> float:
    """Share of the positions of batches left-padded to `max_length` that are padding."""
    real = sum(min(len(tokenizer(t)["input_ids"]), max_length) for t in texts)
    return 1 - real / (len(texts) * max_length)


def estimate(
    model, tokenizer, texts, options: dict, seed: int, args, cache: str | None
) -> tuple[Importance, float | None]:
    """The normalised importance of one configuration (from `cache` when it holds it: seconds None)."""
    if cache is not None and os.path.isfile(cache):
        return Importance.load(cache), None
    start = time.perf_counter()
    imp = estimate_importance(
        model,
        texts,
        tokenizer=tokenizer,
        num_samples=None,
        batch_size=args.batch_size,
        seed=seed,
        progress=args.progress,
        **options,
    )
    seconds = time.perf_counter() - start
    if cache is not None:
        imp.save(cache)
    return imp, seconds


def run(model, tokenizer, texts, args, label: str) -> dict:
    """Estimate every configuration at seed 1, and `authors` and `default` at seed 0 too; compare with `authors`."""
    configs = configurations(args.max_length, args.sides)
    jobs = [("authors", 0), ("default", 0)] + [(name, 1) for name in configs]
    scores, seconds = {}, {}
    for name, seed in jobs:
        cache = None
        if args.cache_dir:
            os.makedirs(args.cache_dir, exist_ok=True)
            tag = f"{label}-b{args.batches}x{args.batch_size}-L{args.max_length}"
            cache = os.path.join(args.cache_dir, f"{tag}-{name}-s{seed}.safetensors")
        imp, secs = estimate(model, tokenizer, texts, configs[name], seed, args, cache)
        scores[(name, seed)] = imp.parts()
        seconds[f"{name}/s{seed}"] = secs
        print(f"  {name} seed {seed}: " + ("cached" if secs is None else f"{secs:.0f} s"), flush=True)
    reference = scores[("authors", 0)]

    def against(key) -> dict[str, float]:
        return {part: spearman(scores[key][part], reference[part]) for part in PARTS}

    rows = [
        {"comparison": "noise ceiling: authors seed 1", **against(("authors", 1))},
        {"comparison": "default (every deviation)", **against(("default", 1))},
        {
            "comparison": "default seed 1 vs default seed 0",
            **{p: spearman(scores[("default", 1)][p], scores[("default", 0)][p]) for p in PARTS},
        },
    ]
    deviations = []
    for name, (text, switch, eager) in DEVIATIONS.items():
        plus = against((f"default+{name}", 1)) if f"default+{name}" in configs else None
        minus = against((f"authors-{name}", 1)) if f"authors-{name}" in configs else None
        deviations.append({"deviation": name, "label": text, "options": switch, "eager": eager,
                           "default_plus": plus, "authors_minus": minus})  # fmt: skip
    return {"reference_rows": rows, "deviations": deviations, "seconds": seconds, "configurations": configs}


def table(result: dict) -> str:
    column = "configuration at seed 1: Spearman with the authors' recipe at seed 0"
    rows = [{column: r["comparison"], **{p: r[p] for p in PARTS}} for r in result["reference_rows"]]
    rows += [
        {column: f"default + {d['label']}", **d["default_plus"]} for d in result["deviations"] if d["default_plus"]
    ]
    rows += [
        {column: f"authors - {d['label']}", **d["authors_minus"]} for d in result["deviations"] if d["authors_minus"]
    ]
    return markdown(rows)


def plot(result: dict, path: str, title: str) -> None:
    from cofitune_peft.kit.plotting import new_figure, save_figure

    devs = result["deviations"]
    fig = new_figure((11, 4.5))
    axes = fig.subplots(1, len(PARTS), sharey=True)
    ceiling = result["reference_rows"][0]
    default = result["reference_rows"][1]
    y = range(len(devs))
    for ax, part in zip(axes, PARTS):
        plus = [d["default_plus"][part] if d["default_plus"] else float("nan") for d in devs]
        minus = [d["authors_minus"][part] if d["authors_minus"] else float("nan") for d in devs]
        ax.barh([i + 0.2 for i in y], plus, height=0.4, label="default + it")
        ax.barh([i - 0.2 for i in y], minus, height=0.4, label="authors - it")
        ax.axvline(ceiling[part], color="k", ls="--", lw=1, label="ceiling (authors, 2 seeds)")
        ax.axvline(default[part], color="r", ls=":", lw=1, label="default")
        ax.set_title(part)
        ax.set_xlabel("Spearman vs authors' recipe")
        values = [v for v in plus + minus if v == v]
        ax.set_xlim(min(0.0, *values) - 0.05, 1.0)
    axes[0].set_yticks(list(y), [d["deviation"] for d in devs])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--batches", type=int, default=None, help="tiny: 384; smollm2: 32")
    parser.add_argument("--batch-size", type=int, default=None, help="tiny: 4; smollm2: 2 (memory)")
    parser.add_argument("--max-length", type=int, default=None, help="tiny: 256; smollm2: 512 (the authors')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sides",
        choices=("both", "authors_minus", "default_plus"),
        default="both",
        help="which one-deviation configurations to estimate (authors_minus: 10 estimates instead of 17)",
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"estimator_fidelity_{args.model}.json"
    )
    count = args.batches * args.batch_size
    if args.model == "tiny":
        model, tokenizer, texts = tiny_setup(count, args.max_length)
    else:
        model, tokenizer, texts = smollm2_setup(count)
    start = time.perf_counter()
    result = run(model, tokenizer, texts, args, args.model)
    result.update(
        model=args.model,
        batches=args.batches,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
        sides=args.sides,
        padding_fraction=padding_fraction(tokenizer, texts, args.max_length),
        total_seconds=time.perf_counter() - start,
    )
    text = table(result)
    print(text)
    print(f"padding at max_length {args.max_length}: {result['padding_fraction']:.0%} of the positions")
    write_json(out, result)
    title = (f"{args.model}: {args.batches} batches of {args.batch_size}, max_length {args.max_length}, "
             f"{result['padding_fraction']:.0%} padding")  # fmt: skip
    plot(result, os.path.splitext(out)[0] + ".png", title)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
