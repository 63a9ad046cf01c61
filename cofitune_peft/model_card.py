"""The CoFiTune section of an adapter's model card (README.md), written by `PeftModel.save_pretrained`."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard

from .config import CoFiTuneConfig

HEADING = "## CoFiTune"


def _section(peft_model) -> str:
    lines = [HEADING, ""]
    lines.append(
        "This adapter was trained with [cofitune-peft](https://pypi.org/project/cofitune-peft/), an implementation of "
        "CoFiTune (Zhang et al., *Balancing Speciality and Versatility: a Coarse to Fine Framework for Supervised "
        "Fine-tuning Large Language Model*, ACL 2024 Findings, arXiv:2404.10306). Load it with "
        "`import cofitune_peft` before `PeftModel.from_pretrained`."
    )
    lines.append("")
    base = peft_model.peft_config[next(iter(peft_model.peft_config))].base_model_name_or_path
    lines.append(f"- Base model: `{base or 'unknown (built from a config)'}`")
    tuner = peft_model.base_model
    for name, cfg in peft_model.peft_config.items():
        if not isinstance(cfg, CoFiTuneConfig):
            continue
        if cfg.layers is not None:
            a, b = cfg.layers
            lines.append(f'- Adapter `{name}`: decoder layers {a}..{b - 1} (the paper\'s "({a}, {b}]")')
        else:
            lines.append(f"- Adapter `{name}`: decoder layers {list(cfg.layers_to_transform)}")
        lines.append(f"  - Trained modules: `{getattr(cfg, 'parts', None) or cfg.target_modules}`")
        source = cfg.to_dict().get("importance_source") or "none"
        lines.append(f"  - Soft mask: `{cfg.softmask_mode}` mode; importance from {source}")
        if hasattr(tuner, "mask_statistics"):
            stats = tuner.mask_statistics(name)
            lines.append(
                f"  - Mean row scale {stats['mask_mean_scale']:.3f}; "
                f"{100 * stats['mask_frac_below_0.1']:.1f}% of trained rows scaled below 0.1"
            )
    return "\n".join(lines) + "\n"


def write_cofitune_section(peft_model, output_dir: str) -> None:
    """Add (or replace) the CoFiTune section of the model card in `output_dir`."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("")
    tags = set(card.data.tags or [])
    card.data.tags = sorted(tags | {"cofitune", "peft"})
    text = card.text
    if HEADING in text:
        before, _, after = text.partition(HEADING)
        # drop the old section up to the next heading of the same level
        rest = after.split("\n## ", 1)
        text = before + ("\n## " + rest[1] if len(rest) > 1 else "")
    card.text = text.rstrip() + "\n\n" + _section(peft_model)
    card.save(path)
