"""Does the importance estimate mean something? Zero the FFN units it ranks highest and watch versatility fall.

CoFiTune (Zhang et al., arXiv 2404.10306) protects the FFN units that an importance estimate marks as important for
general ability. If the estimate is real, zeroing its top-k units must hurt the model's general behaviour more than
zeroing k random units, and far more than zeroing the k units it ranks lowest.

Units are FFN intermediate units: zeroing unit j of layer l multiplies the j-th input of that layer's down projection
by 0 (a forward pre-hook, the place where `estimate_importance` puts its intermediate gate; removed after each point).
Units are ranked **globally across all layers by their raw (un-normalised) score**: the raw score of every unit is the
same quantity (the per-token gradient of one loss with respect to a gate on that unit), so scores of different layers
are comparable, whereas the normalised importance (per-layer |tanh(z-score)|) carries no information across layers.
The global top-k may therefore gather in a few layers (it does: on SmolLM2 the top 64 sit in layers 0-2 and 7-11,
but for 2 units in layers 28-29), so a layer-matched random control separates "these layers matter" from "these units
matter"; each point records how many layers it touches.

Selection rules, for each k:
- `top: general (KL)`: the k highest raw KL-proxy scores, estimated on general text (`general_texts`, split
  "importance");
- `top: domain (KL)`: the same estimated on the domain data (arithmetic prompts and completions, chat-rendered);
- `top: general (Fisher)`: the k highest `signal="fisher"` scores on the same general text (`--no-fisher` drops it);
- `bottom: general (KL)`: the k lowest general KL-proxy scores;
- `random`: k units drawn uniformly from all units, one line per seed (`--seeds`);
- `random, layers of top: general (KL)`: in each layer, as many random units of that layer as the general top-k
  takes there (same seeds): the same layers hit as hard, but not the chosen units.

Versatility measures, on data disjoint from the importance data: the mean per-token KL(base || ablated) of the
next-token distributions on held-out general text (split "eval"; top-`--kl-top-k` tokens plus a rest bucket, a lower
bound of the exact KL), the increase of the token cross-entropy there, and the accuracy of greedy short answers to
country-capital probes (`capital_probes`, answer contained in the reply), all through `VersatilityEval`.

    OMP_NUM_THREADS=1 python benchmarks/bench_importance_ablation.py [--ks 16 64 256 1024 4096] [--seeds 0 1 2]
        [--n-importance 32] [--n-domain 64] [--n-eval 24] [--n-probes 40] [--threads 1] [--no-fisher] [--extend]
        [--out benchmarks/results/importance_ablation.json]

On one thread of a 2-core machine: ~5 min for the three importance estimates, ~37 s per ablation point (24 texts x
256 tokens of KL and cross-entropy, 40 greedy probe answers); the default grid has 5 k x 10 selections = 50 points.

Writes the JSON to `--out` and a two-panel plot (KL and probe accuracy against k) next to it (same name, `.png`).
`--extend` keeps the points already in `--out` (same settings) and measures only the missing (rule, seed, k); the
importance is re-estimated (it is deterministic: same texts, seeded dropout) and the unablated model re-measured, and
both are checked against the stored values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence

import torch
from _common import markdown, write_json

LABELS = {
    "top_general_kl": "top: general (KL)",
    "top_domain_kl": "top: domain (KL)",
    "top_general_fisher": "top: general (Fisher)",
    "bottom_general_kl": "bottom: general (KL)",
    "random": "random",
    "random_matched": "random, layers of top: general (KL)",
}
# rule -> (importance source, how units are picked from it); "random" only takes the shape of its source
RULES = {
    "top_general_kl": ("general_kl", "top"),
    "top_domain_kl": ("domain_kl", "top"),
    "top_general_fisher": ("general_fisher", "top"),
    "bottom_general_kl": ("general_kl", "bottom"),
    "random": ("general_kl", "random"),
    "random_matched": ("general_kl", "matched"),
}
SEEDED = ("random", "matched")


def down_projections(model) -> list[torch.nn.Module]:
    """Each decoder layer's FFN down projection: the modules whose input `estimate_importance` gates."""
    from cofitune_peft.architectures import base_of, model_layout

    layout = model_layout(model)
    return [
        base_of(model.get_submodule(layout.key(layer.index, gate.module)))
        for layer in layout.layers
        for gate in layer.gates
        if gate.kind == "ffn"
    ]


def select_units(scores: torch.Tensor, k: int, end: str = "top", seed: int | None = None) -> torch.Tensor:
    """A `[layers, intermediate]` bool mask of the k units to zero, ranked globally over all layers.

    `end="top"` takes the k highest scores, `"bottom"` the k lowest, `"random"` k units drawn with `seed` (scores
    give only the shape), `"matched"` in each layer as many units drawn with `seed` as the top k have there.
    """
    flat = scores.flatten()  # [layers * intermediate]
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must lie in [0, {flat.numel()}], got {k}")
    gen = torch.Generator().manual_seed(seed) if end in SEEDED else None
    if end == "matched":
        counts = select_units(scores, k, "top").sum(-1)  # [layers]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for layer, count in enumerate(counts.tolist()):
            mask[layer, torch.randperm(scores.shape[1], generator=gen)[:count]] = True
        return mask
    if end == "random":
        chosen = torch.randperm(flat.numel(), generator=gen)[:k]
    elif end in ("top", "bottom"):
        chosen = torch.topk(flat, k, largest=end == "top").indices
    else:
        raise ValueError(f"end must be 'top', 'bottom', 'random' or 'matched', got {end!r}")
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.view_as(scores)


@contextlib.contextmanager
def ablated(model, zeroed: torch.Tensor):
    """Zero the FFN intermediate units marked in `zeroed` (`[layers, intermediate]`, bool) while inside the block."""
    handles = []
    try:
        for layer, down in enumerate(down_projections(model)):
            if not zeroed[layer].any():
                continue
            keep = (~zeroed[layer]).to(down.weight.device)  # [intermediate]

            def hook(_module, args, keep=keep):
                return (args[0] * keep.to(args[0].dtype), *args[1:])

            handles.append(down.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def raw_scores(model, tokenizer, sources: Mapping[str, tuple[Sequence, str]], **kwargs) -> dict[str, torch.Tensor]:
    """Raw intermediate-unit scores `[layers, intermediate]` per source `name -> (data, signal)`."""
    from cofitune_peft.estimation import _estimate_raw

    out = {}
    for name, (data, signal) in sources.items():
        start = time.perf_counter()
        raw = _estimate_raw(
            model, data, tokenizer=tokenizer, num_samples=None, parts=("intermediate",), signal=signal, **kwargs
        )
        out[name] = raw.parts["intermediate"]
        print(
            f"importance {name}: {raw.num_samples} examples, {raw.num_tokens} tokens, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return out


def rank_agreement(a: torch.Tensor, b: torch.Tensor, ks: Sequence[int]) -> dict:
    """Spearman correlation of two score tensors over all units, and the overlap of their top-k sets."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    spearman = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    overlap = {str(k): int((select_units(a, k) & select_units(b, k)).sum()) / k for k in ks if 0 < k <= a.numel()}
    return {"spearman": spearman, "top_k_overlap": overlap}


def _rules(scores: Mapping[str, torch.Tensor], seeds: Sequence[int]) -> list[tuple[str, str, str, int | None]]:
    """`(rule, source, end, seed)` for every selection rule whose importance source was estimated."""
    out = []
    for rule, (source, end) in RULES.items():
        if source in scores:
            out += [(rule, source, end, seed) for seed in (seeds if end in SEEDED else [None])]
    return out


def run_ablation(
    model,
    tokenizer,
    *,
    sources: Mapping[str, tuple[Sequence, str]],
    eval_texts: Sequence[str],
    probes: Sequence[Mapping],
    ks: Sequence[int],
    seeds: Sequence[int] = (0, 1, 2),
    max_length: int = 256,
    batch_size: int = 4,
    kl_top_k: int = 1024,
    max_new_tokens: int = 16,
    progress: bool = True,
    previous: Mapping | None = None,
) -> dict:
    """Estimate raw importance per source, then measure versatility with the top/bottom/random k units zeroed.

    Args:
        sources: `name -> (data, signal)`, e.g. `{"general_kl": (texts, "kl"), "domain_kl": (chats, "kl")}`; the
            rules of `RULES` whose source is present are run.
        eval_texts: held-out general text for KL and cross-entropy drift.
        probes: short-answer probes (`prompt`, `answer`, `aliases`).
        ks: numbers of units to zero (0 is the unablated model, measured once).
        previous: an earlier result of the same settings: its points are kept and only missing (rule, seed, k) are
            measured; its unablated measures and importance agreement must come out the same again.

    Returns:
        `dict` with `"base"` (the unablated measures), `"points"` (one row per rule, seed and k), `"agreement"` and
        `"layers"` (per source, how many of each layer's units are in its top-k).
    """
    from tqdm.auto import tqdm

    from cofitune_peft.kit.evaluation import VersatilityEval

    importance_kwargs = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
    scores = raw_scores(model, tokenizer, sources, **importance_kwargs)
    vers = VersatilityEval(
        list(eval_texts),
        list(probes),
        tokenizer=tokenizer,
        max_length=max_length,
        batch_size=batch_size,
        kl_top_k=kl_top_k,
        max_new_tokens=max_new_tokens,
        progress=False,
    )
    model.eval()
    vers.prepare(model)
    base = _measure(vers, model)
    points = list(previous["points"]) if previous else []
    ks = sorted({int(k) for k in ks if k > 0} | {p["k"] for p in points})
    agreement = {}
    if "general_kl" in scores:
        agreement = {name: rank_agreement(scores["general_kl"], s, ks) for name, s in scores.items()}
        agreement.pop("general_kl")
    if previous:
        _check_same(previous, base, agreement)
    done = {(p["rule"], p["seed"], p["k"]) for p in points}
    jobs = [(rule, k) for rule in _rules(scores, seeds) for k in ks if (rule[0], rule[3], k) not in done]
    for (rule, source, end, seed), k in tqdm(jobs, desc="ablations", disable=not progress):
        zeroed = select_units(scores[source], k, end, seed)
        start = time.perf_counter()
        with ablated(model, zeroed):
            measured = _measure(vers, model)
        per_layer = zeroed.sum(-1)  # [layers]
        points.append(
            {
                "rule": rule,
                "label": LABELS[rule],
                "source": None if end == "random" else source,
                "seed": seed,
                "k": k,
                **measured,
                "layers_touched": int((per_layer > 0).sum()),
                "max_units_in_one_layer": int(per_layer.max()),
                "seconds": time.perf_counter() - start,
            }
        )
    order = {rule: i for i, rule in enumerate(RULES)}
    points.sort(key=lambda p: (order[p["rule"]], -1 if p["seed"] is None else p["seed"], p["k"]))
    layers = {name: {str(k): select_units(s, k).sum(-1).tolist() for k in ks} for name, s in scores.items()}
    return {"base": base, "points": points, "agreement": agreement, "layers": layers}


def _check_same(previous: Mapping, base: Mapping, agreement: Mapping) -> None:
    """An extended run must see the same unablated model and the same importance ranking as the stored one."""
    problems = [f"base {key}: stored {previous['base'][key]}, now {value}" for key, value in base.items()
                if value is not None and abs(value - previous["base"][key]) > 1e-6]  # fmt: skip
    for name, agree in agreement.items():
        stored = previous["agreement"].get(name, {}).get("spearman")
        if stored is not None and abs(stored - agree["spearman"]) > 1e-9:
            problems.append(f"Spearman general_kl vs {name}: stored {stored}, now {agree['spearman']}")
    if problems:
        raise SystemExit("--extend: this run differs from the stored one (" + "; ".join(problems) + ")")


def _measure(vers, model) -> dict:
    result = vers.evaluate(model)
    return {
        "kl": result["kl"],
        "ce_increase": result["ce_increase"],
        "probe_accuracy": result.get("probes_gen_accuracy"),
    }


MEASURES = {
    "kl": ("KL per token", ".3g"),
    "ce_increase": ("CE increase", ".3g"),
    "probe_accuracy": ("probe acc.", ".3f"),
}


def table_rows(result: dict, key: str) -> list[dict]:
    """One row per rule, one column per k, of measure `key`; seeded rules as mean (min..max) over their seeds."""
    _, spec = MEASURES[key]
    ks = sorted({p["k"] for p in result["points"]})
    base = result["base"][key]
    rows = []
    for rule in RULES:
        by_k: dict[int, list[float]] = {}
        for p in result["points"]:
            if p["rule"] == rule and p[key] is not None:
                by_k.setdefault(p["k"], []).append(p[key])
        if not by_k:
            continue
        seeds = {p["seed"] for p in result["points"] if p["rule"] == rule}
        label = LABELS[rule] + (f" ({len(seeds)} seeds: mean (min..max))" if None not in seeds else "")
        cells = {f"k={k}": _spread(by_k[k], spec) if k in by_k else "" for k in ks}
        rows.append({"rule": label, "k=0": "-" if base is None else format(base, spec), **cells})
    return rows


def _spread(values: Sequence, spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    mean = sum(values) / len(values)
    return f"{format(mean, spec)} ({format(min(values), spec)}..{format(max(values), spec)})"


def plot(result: dict, path: str, num_units: int, title: str) -> None:
    """Two panels, KL per token and probe accuracy against k; one line per rule, random as mean with its range."""
    from matplotlib.figure import Figure

    ks = sorted({p["k"] for p in result["points"]})
    pos = {k: i for i, k in enumerate([0, *ks])}  # the k grid is geometric: equal spacing reads like a log axis
    styles = {
        "top_general_kl": ("tab:red", "o-"),
        "top_domain_kl": ("tab:purple", "s-"),
        "top_general_fisher": ("tab:orange", "^--"),
        "bottom_general_kl": ("tab:green", "v-"),
        "random": ("tab:gray", "d-"),
        "random_matched": ("tab:blue", "D:"),
    }
    fig = Figure(figsize=(12, 5.4), layout="constrained")
    panels = [
        ("kl", "KL(base || ablated) per token, held-out text (log)"),
        ("probe_accuracy", "capital probes, generated answer accuracy"),
    ]
    for i, (key, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        # KL is 0 at k = 0 by construction and goes on a log axis, so its panel starts at the first k > 0.
        xs = ks if key == "kl" else [0, *ks]
        base = result["base"][key]
        for rule, (color, style) in styles.items():
            by_k: dict[int, list[float]] = {}
            for p in result["points"]:
                if p["rule"] == rule and p[key] is not None:
                    by_k.setdefault(p["k"], []).append(p[key])
            if not by_k:
                continue
            by_k[0] = [base]
            at = [k for k in xs if k in by_k]
            seeded = RULES[rule][1] in SEEDED
            mean = [sum(by_k[k]) / len(by_k[k]) for k in at]
            seeds = max(len(v) for v in by_k.values())
            label = LABELS[rule] + (f" (mean; band: min..max of {seeds} seeds)" if seeded else "")
            ax.plot([pos[k] for k in at], mean, style, color=color, label=label, markersize=5)
            if seeded:
                low, high = [min(by_k[k]) for k in at], [max(by_k[k]) for k in at]
                ax.fill_between([pos[k] for k in at], low, high, color=color, alpha=0.2, linewidth=0)
        if key == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(base, color="black", linewidth=0.8, linestyle=":", label="unablated model")
            ax.set_ylim(-0.02, max(1.0, base) + 0.02)
        ax.set_xticks([pos[k] for k in xs], [f"{k}\n({100 * k / num_units:.2g}%)" if k else "0" for k in xs])
        ax.set_xlabel(f"k, FFN units zeroed (of {num_units}; share in brackets)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both" if key == "kl" else "major")
    handles, labels = fig.axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random selections")
    parser.add_argument("--n-importance", type=int, default=32, help="general texts (split 'importance')")
    parser.add_argument("--n-domain", type=int, default=64, help="arithmetic examples (prompt + completion)")
    parser.add_argument("--n-eval", type=int, default=24, help="held-out general texts (split 'eval')")
    parser.add_argument("--n-probes", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--kl-top-k", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-fisher", action="store_true", help="skip the Fisher importance on general text")
    parser.add_argument("--extend", action="store_true", help="keep the points in --out, measure the missing ones")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "importance_ablation.json")
    )
    return parser.parse_args(argv)


SAME = ("n_importance", "n_domain", "n_eval", "n_probes", "max_length", "max_new_tokens", "kl_top_k", "batch_size")


def _previous(args) -> dict | None:
    """The stored result `--extend` builds on, after checking that it was measured with the same settings."""
    if not args.extend:
        return None
    with open(args.out) as f:
        previous = json.load(f)
    stored = previous["settings"]
    differ = [
        f"{key} (stored {stored[key]}, now {getattr(args, key)})" for key in SAME if stored[key] != getattr(args, key)
    ]
    if differ:
        raise SystemExit(f"--extend: {args.out} was measured with other settings: {', '.join(differ)}")
    return previous


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    previous = _previous(args)
    from cofitune_peft.kit.data import arithmetic_task, capital_probes, general_texts, to_messages
    from cofitune_peft.kit.loading import load_smollm2

    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    model.eval()
    general = list(general_texts(n=args.n_importance, split="importance", seed=0)["text"])
    train, _ = arithmetic_task(n_train=args.n_domain, n_test=0, seed=0)
    domain = list(to_messages(train, style="messages"))
    sources = {"general_kl": (general, "kl"), "domain_kl": (domain, "kl")}
    if not args.no_fisher:
        sources["general_fisher"] = (general, "fisher")
    eval_texts = list(general_texts(n=args.n_eval, split="eval", seed=0)["text"])
    probes = list(capital_probes(n=args.n_probes, seed=0))
    result = run_ablation(
        model,
        tokenizer,
        sources=sources,
        eval_texts=eval_texts,
        probes=probes,
        ks=args.ks,
        seeds=args.seeds,
        max_length=args.max_length,
        batch_size=args.batch_size,
        kl_top_k=args.kl_top_k,
        max_new_tokens=args.max_new_tokens,
        previous=previous,
    )
    cfg = model.config
    num_units = cfg.num_hidden_layers * cfg.intermediate_size
    result["settings"] = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "num_layers": cfg.num_hidden_layers,
        "intermediate_size": cfg.intermediate_size,
        "num_units": num_units,
        "ranking": "global over all layers, by raw (un-normalised) score",
        "importance_general": f"general_texts(n={args.n_importance}, split='importance', seed=0)",
        "importance_domain": f"arithmetic_task(n_train={args.n_domain}, seed=0), chat-rendered prompt + completion",
        "eval_texts": f"general_texts(n={args.n_eval}, split='eval', seed=0)",
        "probes": f"capital_probes(n={args.n_probes}, seed=0), greedy, {args.max_new_tokens} new tokens, contains",
        **{k: v for k, v in vars(args).items() if k not in ("out", "extend")},
        "ks": sorted({p["k"] for p in result["points"]}),
        "seeds": sorted({p["seed"] for p in result["points"] if p["seed"] is not None}),
    }
    runs = []
    if previous:
        first = {key: previous["settings"][key] for key in ("ks", "seeds", "threads")}
        runs = previous.get("runs") or [{**first, "new_points": len(previous["points"]), "wall_s": previous["wall_s"]}]
    this_run = {"ks": args.ks, "seeds": args.seeds, "threads": args.threads, "new_points": len(result["points"])}
    this_run["new_points"] -= len(previous["points"]) if previous else 0
    this_run["wall_s"] = time.perf_counter() - started
    result["runs"] = [*runs, this_run]
    result["wall_s"] = sum(run["wall_s"] for run in result["runs"])
    write_json(args.out, result)
    for key, (name, _) in MEASURES.items():
        print(f"\n{name}\n\n{markdown(table_rows(result, key))}")
    for name, agree in result["agreement"].items():
        print(f"general_kl vs {name}: Spearman {agree['spearman']:.3f}, top-k overlap {agree['top_k_overlap']}")
    png = os.path.splitext(args.out)[0] + ".png"
    title = (
        f"SmolLM2-135M-Instruct: zeroing k of {num_units} FFN units (ranked globally by raw importance); "
        f"{args.n_eval} held-out texts, {args.n_probes} capital probes"
    )
    plot(result, png, num_units, title)
    print(f"wrote {args.out} and {png}; this run {this_run['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
