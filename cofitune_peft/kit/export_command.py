"""`cofitune export`: serve a CoFiTune adapter anywhere, as a stock LoRA adapter or as a merged model.

- `--to lora --rank R`: each trained module's masked delta becomes a rank-R LoRA pair (a truncated SVD, exact when R
  reaches the smaller side of the weight). The folder holds `adapter_config.json` (peft_type LORA),
  `adapter_model.safetensors` and a model card (`README.md`), and loads with plain PEFT (`PeftModel.from_pretrained`),
  vLLM or TGI, without `cofitune_peft`.
- `--to merged`: the base model with the adapter merged in (`merge_and_unload`), saved with `save_pretrained`, plus
  the tokenizer when one is found beside the adapter or the base model.

The adapter is a local folder or a Hub repository id; the base model defaults to the one the adapter names
(`base_model_name_or_path`), a local folder or a Hub id. `fidelity` measures what a conversion costs: KL(unconverted ||
converted) per token and top-1 agreement on given texts. Both outputs are written atomically: a reader sees the old
folder or the complete new one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from safetensors.torch import save_file

from cofitune_peft import CoFiTuneError
from cofitune_peft.hub import check_hub_id, hub_id_of, is_hub_id
from cofitune_peft.model import convert_to_lora
from cofitune_peft.utils import atomic_path, device_of

logger = logging.getLogger(__name__)

TARGETS = ("lora", "merged")
DTYPES = ("float32", "bfloat16", "float16")
_WEIGHTS = "adapter_model.safetensors"


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cofitune export`."""
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="a saved CoFiTune adapter: a folder or a Hub repo id")
    parser.add_argument(
        "--base",
        default=None,
        help="the base model the adapter was trained on, a folder or a Hub id (default: the one the adapter names)",
    )
    parser.add_argument(
        "--base-model-id",
        default=None,
        help="with --to lora: the Hub id ('owner/name') the export records as its base model (default: the adapter's)",
    )
    parser.add_argument("--to", choices=TARGETS, required=True, help="a stock LoRA adapter, or a merged full model")
    parser.add_argument(
        "--rank",
        type=_rank,
        default=None,
        help="LoRA rank (int), or a float in (0, 1]: fraction of singular-value energy kept per module (--to lora)",
    )
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the base model in")
    parser.add_argument(
        "--check-texts",
        default=None,
        help="a .txt file (one text per line): report KL and top-1 agreement of the export against the adapter",
    )


def _rank(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int or a float in (0, 1], got {value!r}") from None


def export_command(args: argparse.Namespace) -> int:
    """Run `cofitune export`."""
    if args.to == "lora" and args.rank is None:
        raise CoFiTuneError("`--rank` is required with `--to lora`, e.g. `--rank 64`; a larger rank is more exact.")
    if args.to == "merged" and args.rank is not None:
        raise CoFiTuneError("`--rank` applies to `--to lora` only; drop it for `--to merged`.")
    if args.base_model_id is not None:
        if args.to != "lora":
            raise CoFiTuneError("`--base-model-id` applies to `--to lora` (the adapter it writes); drop it.")
        check_hub_id(args.base_model_id, "--base-model-id")
    adapter = resolve_adapter(args.adapter)
    base = _resolve_base(args.base, adapter)
    texts = _read_texts(args.check_texts) if args.check_texts else None
    model, tokenizer = load_adapter(adapter, base, getattr(torch, args.dtype))
    if args.to == "lora":
        export_lora(model, args.out, args.rank, base_path=base, base_model_id=args.base_model_id, source=args.adapter)
    else:
        export_merged(model, args.out, tokenizer)
    sizes = file_sizes(adapter, args.out)
    logger.info("wrote %s (%s); adapter %s", args.out, _human(sizes[args.out]), _human(sizes[adapter]))
    if texts is not None:
        if tokenizer is None:
            raise CoFiTuneError("`--check-texts` needs a tokenizer; save one beside the adapter or the base model.")
        if args.to == "merged":  # merging consumed `model`; compare against a fresh copy of the adapter
            model, _ = load_adapter(adapter, base, getattr(torch, args.dtype))
        converted = _load_export(args.out, args.to, base, getattr(torch, args.dtype))
        stats = fidelity(model, converted, tokenizer, texts)
        logger.info(
            "fidelity on %d tokens: KL mean %.3g, KL max %.3g, top-1 agreement %.4f",
            stats["tokens"],
            stats["kl_mean"],
            stats["kl_max"],
            stats["top1_agreement"],
        )
    return 0


def resolve_adapter(adapter: str) -> str:
    """The local folder of `adapter`: itself when it is a folder, else the Hub repository `adapter` downloaded (or
    found in the Hugging Face cache, which is all `HF_HUB_OFFLINE=1` allows)."""
    if os.path.isdir(adapter):
        folder = adapter
    elif os.path.exists(adapter) or not is_hub_id(adapter):
        raise CoFiTuneError(
            f"`ADAPTER_DIR`: no folder at {adapter!r}; pass a saved adapter's folder or a Hub repo id."
        )
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            folder = snapshot_download(adapter)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            raise CoFiTuneError(
                f"`ADAPTER_DIR`: no local folder {adapter!r} and the Hub repository of that id could not be fetched "
                f"({type(err).__name__}: {err}); pass a saved adapter's folder or a reachable repo id."
            ) from err
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise CoFiTuneError(f"`ADAPTER_DIR`: {adapter!r} has no adapter_config.json; is it a saved adapter?")
    return folder


def _resolve_base(base: str | None, adapter_dir: str) -> str:
    if base is None:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise CoFiTuneError("`--base`: the adapter does not name its base model; pass the base model's folder.")
    if not os.path.isdir(base) and (os.path.exists(base) or not is_hub_id(base)):
        raise CoFiTuneError(f"`--base`: no folder at {base!r}; pass the base model's local folder or its Hub id.")
    return base


def load_adapter(adapter_dir: str, base_path: str, dtype: torch.dtype = torch.float32):
    """The base model (a folder or a Hub id) with the CoFiTune adapter in `adapter_dir` loaded (eval mode), and a
    tokenizer if one is found beside either (else None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model, _find_tokenizer(adapter_dir, base_path)


def _find_tokenizer(*folders: str):
    from transformers import AutoTokenizer

    for folder in folders:
        local = os.path.isdir(folder)
        if local and not any(
            os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json")
        ):
            continue
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            logger.warning("could not load the tokenizer in %s (%s)", folder, err)
    return None


def export_lora(
    model,
    out: str | os.PathLike,
    rank: int | float,
    adapter_name: str = "default",
    base_path=None,
    base_model_id: str | None = None,
    source: str | None = None,
):
    """Write adapter `adapter_name` of `model` as a stock LoRA adapter folder at `out`; returns its `LoraConfig`.

    The folder holds `adapter_config.json`, `adapter_model.safetensors` and a model card (`README.md`). The base
    model it names (`base_model_name_or_path`) is `base_model_id` if given, else the adapter's (its Hub id when it has
    one), else `base_path`. `source` (the CoFiTune adapter's folder or repo id) is named in the card.
    """
    lora_config, state_dict = convert_to_lora(model, rank, adapter_name)
    if base_model_id is not None:
        lora_config.base_model_name_or_path = check_hub_id(base_model_id, "base_model_id")
    elif not lora_config.base_model_name_or_path and base_path is not None:
        lora_config.base_model_name_or_path = os.fspath(base_path)
    with atomic_path(out, directory=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, os.path.join(tmp, _WEIGHTS))
        lora_config.save_pretrained(tmp)
        lora_card(lora_config, rank, source).save(os.path.join(tmp, "README.md"))
    return lora_config


def lora_card(lora_config, rank: int | float, source: str | None = None):
    """The model card of a LoRA export: Hub metadata (`library_name: peft`, `base_model`, tags) and how it was made."""
    from huggingface_hub import ModelCard, ModelCardData

    base_id = hub_id_of(lora_config.base_model_name_or_path)
    causal = str(lora_config.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    tags = ["cofitune", "lora", "peft", *([f"base_model:adapter:{base_id}"] if base_id else [])]
    data = ModelCardData(
        library_name="peft",
        base_model=base_id,
        pipeline_tag="text-generation" if causal else None,
        tags=tags,
    )
    ranks = sorted(set((lora_config.rank_pattern or {}).values()) or {lora_config.r})
    # a local path means nothing to someone reading the card on the Hub
    made_from = (
        f"the CoFiTune adapter [`{source}`](https://huggingface.co/{source})"
        if is_hub_id(source)
        else "a CoFiTune adapter"
    )
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    text = "\n".join(
        [
            "",
            f"# LoRA export of a CoFiTune adapter{f' for `{base_id}`' if base_id else ''}",
            "",
            f"A stock LoRA adapter (`peft_type: LORA`) that plain PEFT, vLLM and TGI load without cofitune-peft, written "
            f"by `cofitune export --to lora --rank {rank}` from {made_from}: each trained module's change is its best "
            f"rank-{'/'.join(str(r) for r in ranks)} approximation (a truncated SVD, exact at full rank).",
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto}",
            "",
            f'base = {auto}.from_pretrained("{base_id or "path/or/hub-id-of-the-base-model"}")',
            'model = PeftModel.from_pretrained(base, "path/or/repo-id-of-this-export")',
            "```",
            "",
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def export_merged(model, out: str | os.PathLike, tokenizer=None) -> None:
    """Merge the active adapter into the base weights and save the full model (and `tokenizer`) at `out`.

    `model` is consumed: `merge_and_unload` writes into its base weights.
    """
    merged = model.merge_and_unload()
    with atomic_path(out, directory=True) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _load_export(out: str, kind: str, base_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if kind == "merged":
        return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype), out).eval()


def _read_texts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise CoFiTuneError(f"`--check-texts`: no file at {path!r}; pass a .txt file with one text per line.")
    with open(path, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise CoFiTuneError(f"`--check-texts`: {path!r} holds no text; put one text per line.")
    return texts


@torch.no_grad()
def fidelity(reference, candidate, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> dict:
    """How closely `candidate` (e.g. an exported LoRA) reproduces `reference` (the CoFiTune model) on `texts`.

    Returns `kl_mean` and `kl_max`: KL(reference || candidate) of the next-token distributions, per token (nats);
    `top1_agreement`: the fraction of tokens whose most likely next token is the same; `tokens`: how many tokens.

    Example:

    ```python
    >>> stats = fidelity(cofitune_model, lora_model, tokenizer, ["The capital of France is"])  # doctest: +SKIP
    >>> stats["top1_agreement"]  # doctest: +SKIP
    1.0
    ```
    """
    if not texts:
        raise CoFiTuneError("`texts` must hold at least one text to compare the two models on.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kls, agree = [], 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]  # [batch, seq]
        ref = _log_probs(reference, ids, mask)  # [batch, seq, vocab]
        cand = _log_probs(candidate, ids, mask)
        mask = mask.bool()
        kl = (ref.exp() * (ref - cand)).sum(-1)  # [batch, seq]
        kls.append(kl[mask])
        agree += int((ref.argmax(-1) == cand.argmax(-1))[mask].sum())
    kl = torch.cat(kls).clamp_min(0.0)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": agree / kl.numel(),
        "tokens": kl.numel(),
    }


def _log_probs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = device_of(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return logits.float().log_softmax(-1).cpu()


def file_sizes(*folders: str | os.PathLike) -> dict[str, int]:
    """Bytes of the weight files (`*.safetensors`, `*.bin`) in each folder, by folder."""
    sizes = {}
    for folder in folders:
        folder = os.fspath(folder)
        names = [n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin"))]
        sizes[folder] = sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return sizes


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
