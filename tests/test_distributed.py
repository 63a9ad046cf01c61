"""CoFiTune with TRL's SFTTrainer across processes (DDP, FSDP1, FSDP2, DeepSpeed) and exact resume.

Every distributed run trains the same tiny Llama for 3 steps with the soft mask on, in 2 CPU processes (gloo, fp32,
batch 2 each), and must end where one process with batch 4 ends (same global batch, same samples), within float32
rounding. `tests/dist_worker.py` is the training script; docs/scaling-out.md says what was verified and how.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from dist_worker import LAYERS, domain_data, importance
from packaging.version import Version
from safetensors.torch import load_file
from tiny_models import batch, tiny_model, tiny_tokenizer
from transformers import TrainerCallback

from cofitune_peft import CoFiTuneConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "dist_worker.py")
ACCELERATE = os.path.join(ROOT, "examples", "accelerate")
DEEPSPEED = os.path.join(ROOT, "examples", "deepspeed")
ATOL = 1e-6  # the deltas are ~2e-2 after 3 AdamW steps at lr 1e-2; 2 vs 1 processes differ by < 1e-7 here
ADAPTER = "adapter_model.safetensors"

FSDP_CPU_GATE = (
    "accelerate <= 1.15 does not run FSDP on CPU: `AcceleratorState.__init__` (accelerate/state.py) sets "
    "DistributedType.FSDP only for MULTI_GPU/NPU/XPU/... and MULTI_CPU is not in that list, so an FSDP config on a "
    "CPU-only host silently trains with plain DDP (and `fsdp_sync_module_states: true` raises 'There are currently no "
    "available devices found' in FullyShardedDataParallelPlugin). test_fsdp_trainer_path_on_cpu covers FSDP on CPU "
    "with that gate lifted."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out, *args, launcher: list[str] | None = None, timeout: int = 300) -> dict:
    """Run dist_worker.py (in one process, or under `launcher`) and return its report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [*(launcher or [sys.executable]), WORKER, "--out", str(out), *map(str, args)]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    report = json.loads((out / "report.json").read_text())
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def accelerate_launch(config: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ACCELERATE, config),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / ADAPTER)


def assert_same_adapter(got: dict, ref: dict, atol: float = ATOL) -> None:
    assert sorted(got) == sorted(ref), "the saved adapter holds other tensors than the single-process one"
    deltas = [k for k in ref if ".cofitune_delta." in k]
    scales = [k for k in ref if k.endswith(".cofitune_scale")]
    assert len(deltas) == len(scales) == 2 * (LAYERS[1] - LAYERS[0])
    for key in scales:  # the soft mask itself: exact, and really on
        assert torch.equal(got[key], ref[key]), key
        assert float(ref[key].min()) < 0.5, key
    for key in deltas:
        assert float(ref[key].abs().max()) > 1e-3, f"{key} did not train"
        assert got[key].shape == ref[key].shape, key
        diff = float((got[key] - ref[key]).abs().max())
        assert diff <= atol, f"{key}: max |distributed - single| = {diff:.3g} > {atol}"


def assert_loads_like_reference(out, base_dir, reference_dir) -> None:
    """The distributed run's adapter, loaded on a fresh base, gives the single-process model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=batch(5)).logits
    ref = torch.load(reference_dir / "logits.pt")
    assert torch.allclose(logits, ref, atol=1e-5, rtol=0), float((logits - ref).abs().max())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_dir):
    """One process, batch 4: the run every 2-process run (batch 2 each) must reproduce."""
    out = tmp_path_factory.mktemp("single")
    report = run_worker(out, "--base", base_dir, "--batch", 4)
    assert report["world_size"] == 1 and report["global_step"] == 3
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("ddp")
    report = run_worker(out, "--base", base_dir, "--batch", 2, launcher=accelerate_launch("ddp.yaml"))
    return out, report


# ---------------------------------------------------------------------------------------------------------- DDP


@pytest.mark.multiprocess
def test_ddp_matches_single_process(ddp_run, reference, base_dir):
    out, report = ddp_run
    assert report["world_size"] == 2
    assert report["distributed_type"] == "DistributedType.MULTI_CPU" and report["wrapper"] == "DistributedDataParallel"
    assert_same_adapter(adapter(out), adapter(reference))
    assert_loads_like_reference(out, base_dir, reference)


@pytest.mark.multiprocess
def test_ddp_resume_is_bit_identical(tmp_path, ddp_run, base_dir):
    """2 processes interrupted after step 2 and resumed end exactly where the uninterrupted 2-process run ends."""
    out, _ = ddp_run
    common = ("--base", base_dir, "--batch", 2)
    run_worker(tmp_path, *common, "--stop-at", 2, launcher=accelerate_launch("ddp.yaml"))
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / ADAPTER).is_file()
    report = run_worker(tmp_path, *common, "--resume", checkpoint, launcher=accelerate_launch("ddp.yaml"))
    assert report["global_step"] == 3
    resumed, full = adapter(tmp_path), adapter(out)
    assert sorted(resumed) == sorted(full)
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


# ---------------------------------------------------------------------------------------------------------- FSDP


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["fsdp1.yaml", "fsdp2.yaml"])
def test_fsdp_via_accelerate_config(tmp_path, config, reference, base_dir):
    """`accelerate launch --config_file examples/accelerate/fsdpN.yaml` as a user would run it, on CPU."""
    import accelerate

    if Version(accelerate.__version__) < Version("1.16"):
        pytest.skip(FSDP_CPU_GATE)
    report = run_worker(tmp_path, "--base", base_dir, "--batch", 2, launcher=accelerate_launch(config))
    if report["distributed_type"] != "DistributedType.FSDP":
        pytest.skip(f"accelerate {accelerate.__version__} ran {report['distributed_type']}: " + FSDP_CPU_GATE)
    assert_same_adapter(adapter(tmp_path), adapter(reference))
    assert_loads_like_reference(tmp_path, base_dir, reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "version",
    [1, 2],
    ids=["fsdp1", "fsdp2"],
)
def test_fsdp_trainer_path_on_cpu(tmp_path, version, reference, base_dir):
    """The Trainer's FSDP code path (auto-wrap, sharding, FULL_STATE_DICT save) on CPU/gloo, accelerate's gate lifted."""
    report = run_worker(
        tmp_path, "--base", base_dir, "--batch", 2, "--force-fsdp", launcher=accelerate_launch(f"fsdp{version}.yaml")
    )
    assert report["distributed_type"] == "DistributedType.FSDP" and report["fsdp_version"] == version
    if version == 1:
        assert report["wrapper"] == "FullyShardedDataParallel"
    else:  # fully_shard turns each decoder layer into an FSDP<cls> module
        assert "FSDPLlamaDecoderLayer" in report["sharded_modules"]
    assert_same_adapter(adapter(tmp_path), adapter(reference))
    assert_loads_like_reference(tmp_path, base_dir, reference)


# ---------------------------------------------------------------------------------------------------------- DeepSpeed

requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (it is not a dependency of cofitune-peft; `pip install deepspeed` to run this: "
    "deepspeed 0.19.8 installs from PyPI without a compiler and runs ZeRO-2/3 on CPU/gloo)",
)


@pytest.mark.multiprocess
@requires_deepspeed
@pytest.mark.parametrize(
    ("stage", "model_first"),
    [
        (2, False),
        (3, True),
        (3, False),
    ],
    ids=["zero2", "zero3", "zero3-zero-init"],
)
def test_deepspeed_matches_single_process(tmp_path, stage, model_first, reference, base_dir):
    """ZeRO-2/3 on CPU/gloo. `zero3` builds the model before the DeepSpeed config (ZeRO-3 partitions it when the engine
    starts); `zero3-zero-init` builds it after, as `SFTTrainer(model="<name>")` does, so `zero.Init` partitions it
    while it is created, before CoFiTune reads its shapes."""
    with open(os.path.join(DEEPSPEED, f"zero{stage}.json")) as f:
        config = json.load(f)
    if stage == 3:
        # the tiny model's weights are all below the "auto" persistence threshold, which would keep them whole
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    extra = ("--model-first",) if model_first else ()
    out = tmp_path / "out"
    args = ("--base", base_dir, "--batch", 2, "--deepspeed", path, "--deepspeed-on-cpu", *extra)
    report = run_worker(out, *args, launcher=torchrun())
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world_size"] == 2
    assert_same_adapter(adapter(out), adapter(reference))
    assert_loads_like_reference(out, base_dir, reference)


# ---------------------------------------------------------------------------------------------------------- resume


class StopAt(TrainerCallback):
    """An interruption after `step` optimizer steps; the LR schedule still plans for `max_steps`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_resume_is_bit_identical(tmp_path, bf16):
    """Single process: stop at step 2 (checkpoint there), resume, and end bit-identical to an uninterrupted run."""
    from trl import SFTConfig, SFTTrainer

    def trainer(out, callbacks=(), **overrides):
        kwargs = {
            "output_dir": str(tmp_path / out),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": [],
            "use_cpu": True,
            "max_length": 32,
            "seed": 0,
            "data_seed": 0,
            "disable_tqdm": True,
            "bf16": bf16,
            **overrides,
        }
        return SFTTrainer(
            model=tiny_model(),
            args=SFTConfig(**kwargs),
            train_dataset=domain_data(),
            processing_class=tiny_tokenizer(),
            peft_config=CoFiTuneConfig(layers=LAYERS, importance=importance()),
            callbacks=list(callbacks),
        )

    def cofitune_state(t):
        return {k: v.detach().clone() for k, v in t.model.state_dict().items() if "cofitune_" in k}

    full = trainer("full")
    full.train()
    first = trainer("resumed", [StopAt(2)], save_strategy="steps", save_steps=2)
    first.train()
    assert first.state.global_step == 2
    second = trainer("resumed")
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert second.state.global_step == 4
    reference, resumed = cofitune_state(full), cofitune_state(second)
    assert sorted(resumed) == sorted(reference)
    assert any(".cofitune_scale." in k for k in reference) and any(".cofitune_delta." in k for k in reference)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    assert [e["loss"] for e in second.state.log_history if "loss" in e] == losses
