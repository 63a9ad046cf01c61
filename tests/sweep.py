"""The architecture sweep: every causal-LM family of the installed transformers through CoFiTune's five steps.

For one family and one selection (`"ffn"`, `"mha"`), on its tiny random-init model (`families.py`), in every decoder
layer: `get_peft_model` (the adapted model equals the base at init) -> one AdamW step (every delta gets a gradient
and something moves; no other parameter changes) -> `estimate_importance` and `set_importance` (a masked adapter) ->
`save_pretrained` / `PeftModel.from_pretrained` on a fresh base (the same logits) -> `merge_and_unload` (the same
logits). `outcome()` returns what happened: `ok`, `refused: <CoFiTune's message>`, or `not built: <why>`; anything
else (another exception, a failed check) is `error: ...`. `scripts/architectures_table.py` writes the table of
outcomes to docs/architectures.md, and `tests/test_architectures_sweep.py` checks every row and that the doc matches.
"""

from __future__ import annotations

import functools
import re
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from unittest import mock

import torch

PARTS = ("ffn", "mha")

#: Families whose units are coupled by design, so that the probes' locality (`tests/probes.py`) cannot hold for them
#: even though their layout is right; their other checks still run.
PROBE_EXEMPT = {
    "bitnet": "sub-norms over all heads and all FFN units, and ternary weights that absorb small changes",
    "diffllama": "differential attention subtracts two heads' maps, so value heads are coupled in pairs",
    "dory": "sub-norms over all heads and all FFN units",
    "flex_olmo": "q/k RMSNorm over all heads at once couples the heads",
    "minimax_m2": "q/k RMSNorm over all heads at once couples the heads",
    "olmo2": "q/k RMSNorm over all heads at once couples the heads",
    "olmo3": "q/k RMSNorm over all heads at once couples the heads",
    "olmo_hybrid": "q/k RMSNorm over all heads at once couples the heads",
    "olmoe": "q/k RMSNorm over all heads at once couples the heads",
}


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "coarse only" (importance refused), "refused", "not built", "error"
    detail: str = ""  # the refusal or error message; for "ok": what trained
    layout: str = ""  # "inferred", "table: ...", or "" when no layout was read

    def cell(self) -> str:
        return "yes" if self.status == "ok" else self.status


def _model(family: str, seed: int = 0):
    from families import prepare, tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return prepare(family, model.eval())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loader(ids):
    return torch.utils.data.DataLoader(
        [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids], batch_size=2
    )


@functools.cache
def outcome(family: str, part: str) -> Outcome:
    """What CoFiTune does with `family` for `parts=part` (cached: the test and the doc check share one run)."""
    from families import NOT_BUILT

    from cofitune_peft import CoFiTuneError

    if family in NOT_BUILT:
        return Outcome("not built", NOT_BUILT[family])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(family, part)
    except CoFiTuneError as err:
        return Outcome("refused", str(err).split("\n")[0], _layout_source(family))
    except Exception as err:
        return Outcome("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")


def _layout_source(family: str) -> str:
    from cofitune_peft import CoFiTuneError
    from cofitune_peft.architectures import model_layout

    try:
        return model_layout(_model(family)).source
    except CoFiTuneError:
        return ""


def _run(family: str, part: str) -> Outcome:
    from peft import PeftModel, get_peft_model
    from probes import probe_layer

    from cofitune_peft import CoFiTuneConfig, CoFiTuneError, CoFiTuneLayer, estimate_importance, set_importance
    from cofitune_peft.architectures import model_layout
    from cofitune_peft.experts import ExpertsLayer

    base = _model(family)
    layout_obj = model_layout(base)
    layout = layout_obj.source
    fresh = _model(family)  # the base to load the saved adapter onto (the same seed: the same weights)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    base.requires_grad_(False)  # some kernels take another path for frozen weights (Jamba's Mamba mixer)
    if part == PARTS[0] and family not in PROBE_EXEMPT:  # the layout against what the model computes (once)
        problems = [p for i in range(layout_obj.num_layers) for p in probe_layer(base, layout_obj, i, ids)]
        _check(not problems, f"the layout does not match the model: {problems[:2]}")
    reference = _logits(base, ids)
    layers = len(_layer_list(base))
    pm = get_peft_model(base, CoFiTuneConfig(parts=part, layers=(0, layers)))
    _check(torch.equal(_logits(pm, ids), reference), "the adapted model differs from the base at init")
    # one training step: every delta gets a gradient, nothing else moves
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    _check(
        trainable and all("cofitune_delta" in n for n in trainable),
        f"trainable beyond the deltas: {sorted(trainable)[:3]}",
    )
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    pm.train()
    _loss(pm, ids).backward()
    missing = [n for n, p in trainable.items() if p.grad is None]
    _check(not missing, f"deltas without a gradient (modules not used in the forward pass): {missing[:3]}")
    torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0).step()
    pm.eval()
    _check(any(not torch.equal(before[n], p) for n, p in trainable.items()), "no delta moved")
    _check(all(torch.equal(frozen[n], p) for n, p in pm.named_parameters() if n in frozen), "a frozen parameter moved")
    # the fine level: importance from the model, a masked adapter (a refusal here leaves the coarse level's checks)
    fine = ""
    try:
        importance = estimate_importance(pm, _loader(ids), num_samples=2, progress=False)
    except CoFiTuneError as err:
        fine = f"; importance refused: {str(err).splitlines()[0]}"
    else:
        set_importance(pm, importance)
        _check(pm.base_model.mask_statistics()["mask_mean_scale"] < 1.0, "the soft mask did not install")
    adapted = _logits(pm, ids)
    # save, load on a fresh base: the same logits
    with tempfile.TemporaryDirectory() as folder:
        with mock.patch.object(PeftModel, "create_or_update_model_card", lambda self, path: None):  # time
            pm.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(fresh, folder)
        _check(torch.equal(_logits(loaded, ids), adapted), "the loaded adapter gives other logits")
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, (CoFiTuneLayer, ExpertsLayer))]
    experts = sum(isinstance(m, ExpertsLayer) for m in pm.modules())
    # merge: the same logits
    merged = _logits(pm.merge_and_unload(), ids)
    _check(torch.allclose(merged, adapted, atol=1e-5, rtol=1e-4), "the merged model gives other logits")
    trained = f"{len(wrapped)} modules" + (f", {experts} with experts" if experts else "")
    return Outcome("coarse only" if fine else "ok", trained + fine, layout)


def _loss(model, ids):
    """Next-token cross-entropy from the logits (some families' `labels=` expect other inputs, e.g. GIT's images)."""
    logits = model(input_ids=ids).logits[:, -ids.shape[1] :].float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _layer_list(model):
    from cofitune_peft.architectures import find_decoder_layers

    return find_decoder_layers(model)[1]


class SweepCheckFailed(AssertionError):
    pass


def _check(condition, message: str) -> None:
    if not condition:
        raise SweepCheckFailed(message)


def short(message: str, limit: int = 220) -> str:
    """A refusal, shortened for a table cell."""
    message = re.sub(r"\s+", " ", message).strip()
    return message if len(message) <= limit else message[: limit - 3] + "..."
