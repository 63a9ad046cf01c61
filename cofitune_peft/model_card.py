"""The model card (README.md) of a CoFiTune adapter, written by every `save_pretrained` and `push_to_hub`.

PEFT writes its card first (the Hub's empty template plus `library_name: peft` and the PEFT version); this module then
makes it a card for this adapter: the Hub metadata (`library_name`, `base_model`, `pipeline_tag`, tags), then, first in
the text, what to install to load it, what it was trained for (task type, window, parts, mask, importance source,
training settings where known), how to load it with PEFT and how to serve it without cofitune-peft
(`cofitune export --to lora`). The template's empty sections ("[More Information Needed]") are dropped; text that
someone wrote into the card outside the generated block is kept.
"""

from __future__ import annotations

import contextlib
import os
import re

from huggingface_hub import ModelCard, ModelCardData

from .config import CoFiTuneConfig
from .hub import hub_id_of, is_causal_lm, publishing_context

BEGIN = "<!-- cofitune-peft: begin (generated on every save; write your own text outside these markers) -->"
END = "<!-- cofitune-peft: end -->"
LEGACY_HEADING = "## CoFiTune"  # the section cofitune-peft 0.2.0 appended below PEFT's template
PAPER = "https://arxiv.org/abs/2404.10306"
PLACEHOLDERS = ("[More Information Needed]", "More information needed")

# training_info keys, in the order and with the words the card shows them
_TRAINING_LABELS = {
    "trainer": "trained with",
    "steps": "optimizer steps",
    "epochs": "epochs",
    "batch_size": "examples per optimizer step",
    "gradient_accumulation_steps": "gradient accumulation",
    "learning_rate": "peak learning rate",
    "optimizer": "optimizer",
    "lr_scheduler": "schedule",
    "warmup": "warm-up",
    "weight_decay": "weight decay",
    "max_length": "max tokens per example",
    "precision": "precision",
    "seed": "seed",
}


def record_training_info(model, info: dict) -> None:
    """Merge `info` (JSON values; `None` values dropped) into `training_info` of `model`'s active CoFiTune adapters,
    for their model card. A model without a CoFiTune adapter is left alone.

    Example:

    ```python
    record_training_info(peft_model, {"trainer": "my loop", "steps": 500, "learning_rate": 2e-4})
    ```
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return
    active = getattr(model, "active_adapters", None)  # a PeftModel's property (transformers models have a method)
    for name in active if isinstance(active, (list, tuple)) else list(configs):
        cfg = configs.get(name)
        if isinstance(cfg, CoFiTuneConfig):
            cfg.training_info = {**(cfg.training_info or {}), **{k: v for k, v in info.items() if v is not None}}


def write_model_card(peft_model, output_dir: str) -> None:
    """Turn the README.md that PEFT wrote in `output_dir` into this adapter's card (metadata and text)."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("")
    context = publishing_context()
    configs = {n: c for n, c in peft_model.peft_config.items() if isinstance(c, CoFiTuneConfig)}
    ids = list(dict.fromkeys(i for i in (hub_id_of(c.base_model_name_or_path) for c in configs.values()) if i))
    causal = any(c.task_type == "CAUSAL_LM" for c in configs.values()) or is_causal_lm(peft_model)
    _set_metadata(card.data, ids, causal, context.get("tags") or [])
    section = _section(peft_model, configs, ids[0] if len(ids) == 1 else None, causal, context.get("repo_id"))
    rest = _drop_template(_drop_generated(card.text))
    card.text = "\n" + section + ("\n" + rest.strip() + "\n" if rest.strip() else "")
    card.save(path)


# Kept for code written against cofitune-peft 0.2.0, which registered the card writer under this name.
write_cofitune_section = write_model_card


def _set_metadata(data: ModelCardData, ids: list[str], causal: bool, extra_tags: list[str]) -> None:
    data.library_name = "peft"
    data.base_model = (ids[0] if len(ids) == 1 else ids) or None
    if causal and not data.pipeline_tag:
        data.pipeline_tag = "text-generation"
    # PEFT tags `base_model:adapter:<name_or_path>` even for a local folder, which the Hub cannot resolve
    tags = {t for t in (data.tags or []) if not t.startswith("base_model:adapter:")}
    tags |= {"cofitune", "peft", *extra_tags, *(f"base_model:adapter:{i}" for i in ids)}
    data.tags = sorted(tags)


# ---------------------------------------------------------------------------------------------------- the text


def _section(peft_model, configs: dict, base_id: str | None, causal: bool, repo_id: str | None) -> str:
    repo = repo_id or "path/to/this/adapter"
    lines = [
        BEGIN,
        f"# CoFiTune adapter for `{base_id}`" if base_id else "# CoFiTune adapter",
        "",
        "**To load this adapter, install cofitune-peft:** `pip install cofitune-peft`, then `import cofitune_peft` "
        "before PEFT's calls. It is a [CoFiTune](" + PAPER + ") adapter (`peft_type: COFITUNE`), a method PEFT does "
        "not ship: without cofitune-peft, PEFT stops at `adapter_config.json` with `KeyError: 'COFITUNE'`. For a "
        "stack that takes only LoRA adapters (plain PEFT, vLLM, TGI), convert it with `cofitune export --to lora` "
        "([below](#serve-it-without-cofitune-peft)).",
        "",
        "CoFiTune (Zhang et al., *Balancing Speciality and Versatility: a Coarse to Fine Framework for Supervised "
        "Fine-tuning Large Language Model*, ACL 2024 Findings) trains full-rank changes to a few modules of a window of "
        "decoder layers and freezes the rest of the model; inside the window a soft mask scales down the changes to the "
        "units that matter most for general ability.",
        "",
        "## What it was trained for",
        "",
    ]
    for name, cfg in configs.items():
        if len(configs) > 1:
            lines += [f"### Adapter `{name}`", ""]
        lines += _facts_table(peft_model, name, cfg, base_id)
        lines.append("")
    lines += _how_to_load(base_id, causal, repo, several=len(configs) > 1)
    lines += _how_to_serve(base_id, repo)
    lines += ["### Framework versions", "", *_versions(), END, ""]
    return "\n".join(lines)


def _facts_table(peft_model, name: str, cfg: CoFiTuneConfig, base_id: str | None) -> list[str]:
    info = dict(cfg.training_info or {})
    base = peft_model.get_base_model()
    rows = [("task type", f"`{cfg.task_type}`" if cfg.task_type else "not set")]
    if base_id:
        rows.append(("base model", f"[`{base_id}`](https://huggingface.co/{base_id})"))
    else:
        rows.append(("base model", "not recorded as a Hub id (trained on a local or in-memory model)"))
    if info.get("base_weights"):
        rows.append(("base weights", str(info["base_weights"])))
    rows.append(("window", _window(cfg, base)))
    rows.append(("parts", _parts(peft_model, name, cfg)))
    trained, total = _parameter_counts(peft_model, name)
    if trained:
        share = f" ({100 * trained / total:.1f}% of the base model's {_millions(total)})" if total else ""
        rows.append(("trained parameters", f"{_millions(trained)}{share}"))
    rows.append(("soft mask", _mask(peft_model, name, cfg, base_id)))
    if cfg.strength != 1.0:
        rows.append(("strength", f"{cfg.strength:g} (W = W0 + strength * s * Delta)"))
    for key, label in _TRAINING_LABELS.items():
        if info.get(key) is not None:
            rows.append((label, _value(info[key])))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _window(cfg: CoFiTuneConfig, base) -> str:
    total = _num_layers(base)
    of = f" of {total}" if total else ""
    if cfg.layers is not None:
        a, b = cfg.layers
        return f'decoder layers {a}..{b - 1}{of} (the paper\'s "({a}, {b}]")'
    if cfg.layers_to_transform is not None:
        return f"decoder layers {list(cfg.layers_to_transform)}{of}"
    return "the paper's default window (N//4, N//2)"


def _parts(peft_model, name: str, cfg: CoFiTuneConfig) -> str:
    selection = getattr(cfg, "parts", None) or cfg.target_modules
    tuner = peft_model.base_model
    modules = []
    layers = getattr(tuner, "all_cofitune_layers", None) or getattr(tuner, "cofitune_layers", None)
    if layers is not None:
        modules = [n for n, layer in layers() if name in getattr(layer, "cofitune_delta", {})]
    kinds = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in modules})
    found = f": {', '.join(f'`{k}`' for k in kinds)} ({len(modules)} modules)" if modules else ""
    return f"`{selection}`{found}"


def _published_source(source: str | None, base_id: str | None) -> str | None:
    """`importance_source` as a card on the Hub should show it: a local importance file by its name, the local folder
    an in-memory importance was estimated on (`model=...`) by the base model's Hub id."""
    if source is None:
        return None
    if os.path.isabs(source) or os.path.isfile(source):
        return f"`{os.path.basename(source)}`"

    def model(match: re.Match) -> str:
        path = match.group(1)
        local = os.path.isabs(path) or os.path.exists(path)
        return f"model={base_id or 'the base model'}" if local else match.group(0)

    return re.sub(r"model=([^,)]+)", model, source)


def _mask(peft_model, name: str, cfg: CoFiTuneConfig, base_id: str | None) -> str:
    source = _published_source(cfg.to_dict().get("importance_source"), base_id)
    if cfg.softmask_mode == "none":
        return "off (`softmask_mode='none'`)"
    tuner = peft_model.base_model
    stats = tuner.mask_statistics(name) if hasattr(tuner, "mask_statistics") else None
    if source is None and (stats is None or stats["mask_mean_scale"] >= 1.0):
        return "none installed (the coarse level only: every trained row moves freely)"
    text = (
        f"`{cfg.softmask_mode}` mode, `{cfg.mask_budget}` budget; importance from {source or 'an unrecorded source'}"
    )
    if stats is not None:
        text += (
            f"; mean row scale {stats['mask_mean_scale']:.3f}, "
            f"{100 * stats['mask_frac_below_0.1']:.1f}% of trained rows scaled below 0.1"
        )
    return text


def _parameter_counts(peft_model, name: str) -> tuple[int, int]:
    trained = total = 0
    for key, param in peft_model.named_parameters():
        if "cofitune_" in key:
            if name in key.split("."):
                trained += param.numel()
        else:
            total += param.numel()
    return trained, total


def _num_layers(base) -> int | None:
    config = getattr(base, "config", None)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        config = config.get_text_config()
    return getattr(config, "num_hidden_layers", None)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _how_to_load(base_id: str | None, causal: bool, repo: str, several: bool) -> list[str]:
    auto_cls = "AutoModelForCausalLM" if causal else "AutoModel"
    base_ref = base_id or "path/or/hub-id-of-the-base-model"
    lines = ["## How to load it", ""]
    if base_id and causal:
        lines += [
            "```python",
            "# pip install cofitune-peft",
            "import cofitune_peft  # registers CoFiTune with PEFT; import it before any PEFT call",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # fetches {base_id} too',
            "```",
            "",
            "Or onto a base model you already have:",
            "",
        ]
    lines += [
        "```python",
        "import cofitune_peft  # registers CoFiTune with PEFT",
        "from peft import PeftModel",
        f"from transformers import {auto_cls}",
        "",
        f'base = {auto_cls}.from_pretrained("{base_ref}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        "merged = model.merge_and_unload()  # optional: a plain transformers model, exact",
        "```",
        "",
    ]
    if several:
        lines += ["The other adapters load with `model.load_adapter(REPO, adapter_name=NAME, subfolder=NAME)`.", ""]
    return lines


def _how_to_serve(base_id: str | None, repo: str) -> list[str]:
    base_flag = "" if base_id else " --base path/or/hub-id-of-the-base-model"
    return [
        "## Serve it without cofitune-peft",
        "",
        "Convert it once (this needs cofitune-peft; the result does not):",
        "",
        "```bash",
        "pip install cofitune-peft",
        f"cofitune export {repo}{base_flag} --to lora --rank 64 --out adapter-lora    # a stock LoRA adapter",
        f"cofitune export {repo}{base_flag} --to merged --out adapter-merged        # or the merged model",
        "```",
        "",
        "`adapter-lora` loads with plain PEFT (`PeftModel.from_pretrained`), vLLM (`--enable-lora --lora-modules`) or "
        "TGI (`LORA_ADAPTERS`). A LoRA export is exact at full rank (the smaller side of each trained weight) and "
        "approximate below it; `--check-texts FILE` reports the KL to this adapter and the top-1 agreement on your "
        "texts. The merged model is exact.",
        "",
    ]


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    import peft

    from . import __version__

    lines = [f"- cofitune-peft {__version__}", f"- PEFT {peft.__version__}"]
    for dist in ("transformers", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            lines.append(f"- {dist} {version(dist)}")
    return lines


# ---------------------------------------------------------------------------------------------------- cleaning


def _drop_generated(text: str) -> str:
    """`text` without the block this module wrote before (or the 0.2.0 section, or PEFT's framework-version list)."""
    while BEGIN in text and END in text.split(BEGIN, 1)[1]:
        before, _, after = text.partition(BEGIN)
        text = before + after.partition(END)[2]
    if LEGACY_HEADING in text.splitlines():
        before, _, after = text.partition("\n" + LEGACY_HEADING + "\n")
        rest = after.split("\n## ", 1)
        text = before + ("\n## " + rest[1] if len(rest) > 1 else "")
    # PEFT appends "### Framework versions" + "- PEFT x.y.z" when the card does not list its version; ours does
    text = re.sub(r"(?m)^### Framework versions\n+(?:- PEFT [^\n]*\n*)+", "", text)
    return text


def _template_lines() -> set[str]:
    lines = set(ModelCard.from_template(ModelCardData()).text.splitlines())
    return {line.strip() for line in lines if line.strip()}


def _is_template(line: str, template: set[str]) -> bool:
    stripped = line.strip()
    return bool(stripped) and (stripped in template or any(p in stripped for p in PLACEHOLDERS))


def _drop_template(text: str) -> str:
    """Remove the Hub template's unfilled lines, and every heading under which nothing written remains."""
    template = _template_lines()
    blocks: list[tuple[int, str, list[str]]] = [(0, "", [])]  # (heading level, heading line, body lines)
    for line in text.splitlines():
        match = re.match(r"^(#{1,6})\s", line)
        if match:
            blocks.append((len(match.group(1)), line, []))
        else:
            blocks[-1][2].append(line)
    keep = [any(line.strip() and not _is_template(line, template) for line in body) for _, _, body in blocks]
    # a heading stays when something below it, before the next heading of its level or higher, stays
    for i in range(len(blocks) - 1, -1, -1):
        level = blocks[i][0]
        j = i + 1
        while j < len(blocks) and blocks[j][0] > level and not keep[i]:
            keep[i] = keep[j]
            j += 1
    out = []
    for (_, heading, body), kept in zip(blocks, keep):
        if not kept or heading.strip() == "# Model Card for Model ID":
            continue
        if heading:
            out += [heading, ""]
        out += [line for line in body if not _is_template(line, template)] + [""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
