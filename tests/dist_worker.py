"""One training run of TRL's SFTTrainer + CoFiTune, launched by tests/test_distributed.py in 1 or N processes.

Run it plainly (`python tests/dist_worker.py --out DIR`) for the single-process reference, or under
`torchrun --nproc_per_node 2` / `accelerate launch --config_file examples/accelerate/<cfg>.yaml` for the distributed
runs. Every process builds the same tiny Llama (or loads `--base`) and the same importance, trains a few steps on CPU
(gloo, fp32), and rank 0 writes `DIR/adapter` (the adapter, gathered by `trainer.save_model`), `DIR/report.json` (what
actually ran: distributed type, wrapper classes, losses) and, in a single process, `DIR/logits.pt` (the trained
model's logits on `tiny_models.batch(5)`).

Two switches work around gates of the stack on a CPU-only host; they change nothing in CoFiTune or in the Trainer's
own FSDP / DeepSpeed code paths, which is what the tests exercise (see docs/scaling-out.md):

- `--force-fsdp`: accelerate 1.15 enables FSDP only for GPU-like distributed types, so on CPU an FSDP config silently
  runs plain DDP. This keeps the FSDP plugin on (and works around two torch FSDP1-on-CPU problems, see below).
- `--deepspeed-on-cpu`: sets up accelerate's state with a gloo backend so that the Trainer's DeepSpeed path runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneConfig, Importance  # importing it registers the method

L, H, D, INTER = 8, 4, 32, 48
LAYERS = (2, 4)


def importance() -> Importance:
    g = torch.Generator().manual_seed(1)
    return Importance(
        heads=torch.rand(L, H, generator=g),
        intermediate=torch.rand(L, INTER, generator=g),
        output=torch.rand(L, D, generator=g),
    )


def domain_data(n: int = 32):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{a}+{a % 7}"}],
                "completion": [{"role": "assistant", "content": str(a + a % 7)}],
            }
            for a in range(n)
        ]
    )


def _force_fsdp_on_cpu() -> None:
    """Let `AcceleratorState` keep the FSDP plugin on MULTI_CPU instead of dropping it.

    accelerate 1.15 `AcceleratorState.__init__` sets `DistributedType.FSDP` only inside a branch for MULTI_GPU/NPU/XPU/...
    (MULTI_CPU is not in its list), so on CPU the plugin built from `ACCELERATE_USE_FSDP` is dropped and DDP runs.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies PartialState's fields back in, as accelerate itself does
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            # accelerate's MULTI_CPU device is `cpu:0`; FSDP1 computes on `cpu` and refuses a `device_id` of `cpu:0`
            # ("Inconsistent compute device and `device_id`"), so use the index-less CPU device.
            self.device = PartialState._shared_state["device"] = torch.device("cpu")

    AcceleratorState.__init__ = __init__

    # torch 2.13 FSDP1 segfaults (rank 0, SIGSEGV in `_state_dict_utils.param_hook`) taking a FULL_STATE_DICT with
    # `offload_to_cpu=True` when the parameters already are on CPU, even for a plain transformers model; accelerate's
    # `get_state_dict` hard-codes that option. On CPU there is nothing to offload, so turn it off.
    import torch.distributed.fsdp as fsdp

    config_cls = fsdp.FullStateDictConfig  # FSDP checks the exact type, so keep the class and wrap its construction

    def full_state_dict_config(offload_to_cpu: bool = False, rank0_only: bool = False):
        return config_cls(offload_to_cpu=False, rank0_only=rank0_only)

    fsdp.FullStateDictConfig = full_state_dict_config


def _deepspeed_state_on_cpu() -> None:
    """Create accelerate's state for DeepSpeed on a CPU-only host before the Trainer does.

    With `deepspeed=...` transformers builds `PartialState(use_deepspeed)` without a backend and without `cpu`;
    accelerate picks a backend only for accelerators or `cpu=True` (and with `cpu=True` never enables DeepSpeed), so on
    a CPU-only host it records 1 process while DeepSpeed's own gloo group has N: DeepSpeed then fails its batch-size
    check. Passing `backend="gloo"` here keeps both in step.
    """
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (trainer output_dir; adapter and report go here)")
    p.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=3, help="max_steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--stop-at", type=int, default=0, help="interrupt after this step (saving a checkpoint there)")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TRL's SFTConfig default; off here: fp32)")
    p.add_argument("--force-fsdp", action="store_true", help="keep accelerate's FSDP plugin on CPU (see docstring)")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config (SFTConfig(deepspeed=...))")
    p.add_argument("--base", default=None, help="load the base model from this folder (default: tiny_model())")
    p.add_argument(
        "--model-first",
        action="store_true",
        help="build the model before SFTConfig (so DeepSpeed ZeRO-3 does not partition it at init via zero.Init)",
    )
    p.add_argument("--deepspeed-on-cpu", action="store_true", help="run DeepSpeed on CPU/gloo (see docstring)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)  # here, not at import: tests/test_distributed.py imports this module
    if args.force_fsdp:
        _force_fsdp_on_cpu()
    if args.deepspeed_on_cpu:
        _deepspeed_state_on_cpu()
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StopAt(TrainerCallback):
        """An interruption after `step` optimizer steps; the LR schedule still plans for max_steps."""

        def __init__(self, step):
            self.step = step

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    def make_model():
        if args.base is None:
            return tiny_model()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.base)

    model = make_model() if args.model_first else None
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="steps" if args.stop_at else "no",
        save_steps=args.stop_at or 500,
        report_to=[],
        # accelerate never enables DeepSpeed with cpu=True (its CPU path is `--deepspeed-on-cpu`)
        use_cpu=args.deepspeed is None,
        max_length=32,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        deepspeed=args.deepspeed,
        # keep the state `_deepspeed_state_on_cpu` made (TrainingArguments would reset it)
        accelerator_config={"use_configured_state": True} if args.deepspeed_on_cpu else None,
        # TRL defaults to bf16=True, which autocasts on CPU too; fp32 keeps the comparisons at float32 rounding.
        bf16=args.bf16,
    )
    trainer = SFTTrainer(
        model=model if model is not None else make_model(),
        args=config,
        train_dataset=domain_data(),
        processing_class=tiny_tokenizer(),
        peft_config=CoFiTuneConfig(layers=LAYERS, importance=importance()),
        callbacks=[StopAt(args.stop_at)] if args.stop_at else [],
    )
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(os.path.join(args.out, "adapter"))
    if trainer.accelerator.num_processes == 1:
        # the reference logits of the trained model, for the load test of adapters saved by the distributed runs
        from tiny_models import batch

        model = trainer.model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=batch(5)).logits, os.path.join(args.out, "logits.pt"))
    if trainer.accelerator.is_main_process:
        wrapped = trainer.model_wrapped
        report = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "fsdp_version": getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", None)
            if trainer.is_fsdp_enabled
            else None,
            "wrapper": type(wrapped).__name__,
            "sharded_modules": sorted(
                {
                    type(m).__name__
                    for m in wrapped.modules()
                    if "FSDP" in type(m).__name__ or "FullyShard" in type(m).__name__
                }
            ),
            "global_step": trainer.state.global_step,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
