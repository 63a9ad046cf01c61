"""`CoFiTuneCallback`: the Trainer / TRL `SFTTrainer` side of CoFiTune.

With `SFTTrainer(..., peft_config=CoFiTuneConfig(...), callbacks=[CoFiTuneCallback(...)])` the trainer builds the
PeftModel itself; the callback then (1) estimates the versatility importance at the start of training when asked to
and installs the soft mask, (2) logs mask statistics with the trainer's logs, (3) keeps the importance next to
every checkpoint, so `resume_from_checkpoint` continues with the same mask (the per-row scales also travel inside the
adapter file itself), and (4) records the training settings in the adapter's `training_info` for its model card.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import CoFiTuneError
from .importance import Importance, resolve_importance
from .model import find_tuner
from .model_card import record_training_info

logger = logging.getLogger(__name__)

IMPORTANCE_FILE = "importance.safetensors"


class CoFiTuneCallback(TrainerCallback):
    """Estimates importance at train start, logs mask statistics, and keeps the importance with checkpoints.

    Args:
        importance_dataset (*optional*, defaults to `None`):
            General (versatility) data to estimate the importance from at the start of training, in any form that
            `estimate_importance` accepts (a `datasets.Dataset` of text or chat messages, a list of strings, a
            DataLoader). Ignored when the adapter already has a mask or when resuming from a checkpoint.
        importance (`Importance | str`, *optional*, defaults to `None`):
            An importance (or a path to one) to install at the start of training instead of estimating it.
        num_samples (`int`, *optional*, defaults to `512`): samples used for the estimate.
        batch_size (`int`, *optional*, defaults to `8`): batch size of the estimate.
        max_length (`int`, *optional*, defaults to `256`): truncation length of the estimate.
        estimate_kwargs (`dict`, *optional*): further keyword arguments for `estimate_importance`.
        log_mask_statistics (`bool`, *optional*, defaults to `True`): add `cofitune/mean_scale` and
            `cofitune/frac_below_0.1` to the trainer's logs.

    Example:

    ```python
    from trl import SFTConfig, SFTTrainer
    from cofitune_peft import CoFiTuneCallback, CoFiTuneConfig

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir="out"),
        train_dataset=domain_data,
        peft_config=CoFiTuneConfig(),
        callbacks=[CoFiTuneCallback(importance_dataset=general_data)],
    )
    trainer.train()
    ```
    """

    def __init__(
        self,
        importance_dataset: Any = None,
        importance: Importance | str | None = None,
        *,
        num_samples: int = 512,
        batch_size: int = 8,
        max_length: int = 256,
        estimate_kwargs: dict | None = None,
        log_mask_statistics: bool = True,
    ):
        if importance is not None and importance_dataset is not None:
            raise CoFiTuneError(
                "pass either `importance` or `importance_dataset` to CoFiTuneCallback, not both: the first installs a "
                "given mask, the second estimates one."
            )
        self.importance_dataset = importance_dataset
        self.importance = importance
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.max_length = max_length
        self.estimate_kwargs = dict(estimate_kwargs or {})
        self.log_mask_statistics = log_mask_statistics
        self._stats: dict[str, float] | None = None
        self._current: Importance | None = None

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tuner = find_tuner(model)
        if tuner is None:
            logger.warning(
                "CoFiTuneCallback: the model has no CoFiTune adapter, so the callback does nothing. Pass "
                "`peft_config=CoFiTuneConfig(...)` to the trainer (or wrap the model with get_peft_model)."
            )
            return
        adapter = tuner.active_adapters[0]
        if state.global_step > 0:
            # Resuming: the adapter checkpoint already restored the per-row scales. Reload the full importance too.
            restored = self._restore(args, state)
            if restored is not None:
                tuner._importances[adapter] = restored
                self._current = restored
            logger.info("CoFiTuneCallback: resumed at step %d with the checkpoint's soft mask.", state.global_step)
        elif self.importance is not None:
            self._current = resolve_importance(self.importance)
            tuner.set_importance(self._current, adapter)
        elif self.importance_dataset is not None:
            if tuner.get_importance(adapter) is not None:
                logger.info("CoFiTuneCallback: the adapter already has an importance; not estimating another.")
            else:
                self._current = self._estimate(model, processing_class)
                tuner.set_importance(self._current, adapter)
        else:
            self._current = tuner.get_importance(adapter)
        if self._current is not None and args.process_index == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            self._current.save(os.path.join(args.output_dir, IMPORTANCE_FILE))
        record_training_info(model, training_settings(args, state))
        self._stats = tuner.mask_statistics(adapter)
        logger.info(
            "CoFiTune: layers %s, mean row scale %.3f, %.1f%% of trained rows scaled below 0.1",
            tuner.peft_config[adapter].layers,
            self._stats["mask_mean_scale"],
            100 * self._stats["mask_frac_below_0.1"],
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log_mask_statistics and self._stats is not None and logs is not None:
            stats = {f"cofitune/{k.removeprefix('mask_')}": round(v, 6) for k, v in self._stats.items()}
            logs.update(stats)
            # Trainer.log stored a copy of `logs` in the history just before calling us; keep the two in step.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and find_tuner(model) is not None:
            record_training_info(model, {"steps": state.global_step})

    def on_save(self, args, state, control, **kwargs):
        if self._current is None or args.process_index != 0:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self._current.save(os.path.join(folder, IMPORTANCE_FILE))

    # ------------------------------------------------------------------ helpers

    def _estimate(self, model, processing_class) -> Importance:
        from .estimation import estimate_importance

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None and not isinstance(self.importance_dataset, torch.utils.data.DataLoader):
            raise CoFiTuneError("CoFiTuneCallback needs the trainer's `processing_class` (a tokenizer) to estimate.")
        logger.info("CoFiTuneCallback: estimating importance on %d samples", self.num_samples)
        kwargs = {
            "tokenizer": tokenizer,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            **self.estimate_kwargs,
        }
        return estimate_importance(model, self.importance_dataset, **kwargs)

    @staticmethod
    def _restore(args, state) -> Importance | None:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", IMPORTANCE_FILE)
        if os.path.isfile(path):
            return Importance.load(path)
        return None


def training_settings(args, state) -> dict[str, Any]:
    """What a model card says about a Trainer / TRL run: from its `TrainingArguments` (or `SFTConfig`) and state."""
    is_trl = type(args).__module__.startswith("trl")
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    accumulation = int(args.gradient_accumulation_steps)
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    warmup = getattr(args, "warmup_steps", 0) or getattr(args, "warmup_ratio", 0) or 0  # a float < 1 is a ratio
    if args.bf16:
        precision = "bf16 mixed precision"
    elif args.fp16:
        precision = "fp16 mixed precision"
    else:
        precision = None  # the model's own dtype, which the Trainer does not report
    return {
        "trainer": f"TRL {type(args).__name__.replace('Config', 'Trainer')}" if is_trl else "transformers Trainer",
        "steps": state.max_steps or None,
        "epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "batch_size": args.per_device_train_batch_size * accumulation * world,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": float(args.learning_rate),
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "lr_scheduler": str(scheduler),
        "warmup": (f"{warmup:g} of the steps" if 0 < warmup < 1 else f"{int(warmup)} steps") if warmup else None,
        "weight_decay": float(args.weight_decay),
        "max_length": getattr(args, "max_length", None),
        "precision": precision,
        "seed": int(args.seed),
    }
