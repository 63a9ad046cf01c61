"""What the benchmark scripts share: child processes per configuration, real-text batches, the random soft mask, the
layers-in-backward probe, and the markdown table. Imported as `_common` (the scripts run from this folder)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def rss_mb() -> float:
    """This process's peak resident set size so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (VmRSS)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, so that `peak_rss_since_reset_mb` sees only what comes
    after (Linux: writing 5 to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    """The peak RSS since `reset_peak_rss` (VmHWM), in MB; the process's whole peak where the reset failed."""
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return rss_mb()


def run_children(script: str, names: list[str], argv: list[str], threads: int) -> dict[str, dict]:
    """Run `script --child NAME *argv` for each name, one process each (so each peak RSS is its own); the child
    prints its result as JSON on its last stdout line."""
    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name in tqdm(names, desc="configurations"):
        cmd = [sys.executable, os.path.abspath(script), "--child", name, *map(str, argv)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"configuration {name} failed (exit {proc.returncode})")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def long_texts(tokenizer, length: int, min_rows: int) -> list[str]:
    """Rows of general prose (eval split) of at least `length` tokens, so truncation makes them exactly `length`."""
    from cofitune_peft.kit.data import general_texts

    rows = general_texts(split="eval", source="all", max_chars=max(2000, 8 * length), min_chars=min(1200, 5 * length))
    texts = [t for t in rows["text"] if len(tokenizer(t)["input_ids"]) >= length]
    if len(texts) < min_rows:
        raise SystemExit(f"only {len(texts)} general-text rows have >= {length} tokens; need {min_rows}")
    return texts


def random_importance(cfg):
    """A fixed random soft mask for a model config: the mask's cost does not depend on its values."""
    import torch

    from cofitune_peft import Importance

    n = cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    return Importance(
        heads=torch.rand(n, cfg.num_attention_heads, generator=g),
        intermediate=torch.rand(n, cfg.intermediate_size, generator=g),
        output=torch.rand(n, cfg.hidden_size, generator=g),
    )


def decoder_layers(model):
    """The ModuleList of decoder layers inside `model` (a PeftModel or a plain transformers model)."""
    import torch

    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) == n:
            return module
    raise RuntimeError("no decoder-layer ModuleList found")


def layers_in_backward(model, input_ids) -> int:
    """How many decoder layers produce an output that requires grad (one training-mode forward, no backward)."""
    import torch

    flags = []

    def hook(_module, _args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        flags.append(bool(out.requires_grad))

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        model.train()
        with torch.enable_grad():
            model(input_ids=input_ids, labels=input_ids)
    finally:
        for h in handles:
            h.remove()
    return sum(flags)


def markdown(rows: list[dict], float_format: str = ".3f") -> str:
    """A markdown table with one column per key of the first row."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [format(v, float_format) if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
