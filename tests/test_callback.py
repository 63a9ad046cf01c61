"""CoFiTuneCallback with TRL's SFTTrainer: install a mask, log its statistics, save and resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_model, tiny_tokenizer
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from cofitune_peft import CoFiTuneCallback, CoFiTuneConfig, CoFiTuneError, Importance
from cofitune_peft.callback import IMPORTANCE_FILE, find_tuner

L, H, D, INTER = 8, 4, 32, 48


def domain_data(n=32):
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{a}+{a % 7}"}],
                "completion": [{"role": "assistant", "content": str(a + a % 7)}],
            }
            for a in range(n)
        ]
    )


def sft_args(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path / "out"),
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
    }
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def importance():
    g = torch.Generator().manual_seed(1)
    return Importance(
        heads=torch.rand(L, H, generator=g),
        intermediate=torch.rand(L, INTER, generator=g),
        output=torch.rand(L, D, generator=g),
    )


def deltas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "cofitune_delta" in n}


def test_callback_installs_given_importance_and_logs_statistics(tmp_path):
    imp = importance()
    trainer = SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path),
        train_dataset=domain_data(),
        processing_class=tiny_tokenizer(),
        peft_config=CoFiTuneConfig(layers=(2, 4)),
        callbacks=[CoFiTuneCallback(importance=imp)],
    )
    trainer.train()
    tuner = find_tuner(trainer.model)
    up = tuner.model.model.layers[2].mlp.up_proj
    assert torch.allclose(up.cofitune_scale["default"], 1 - imp.intermediate[2])
    logged = [entry for entry in trainer.state.log_history if "cofitune/mean_scale" in entry]
    assert logged and logged[0]["cofitune/mean_scale"] < 1.0
    assert os.path.isfile(tmp_path / "out" / IMPORTANCE_FILE)


def test_callback_resume_restores_mask_and_matches_uninterrupted(tmp_path):
    imp = importance()

    class StopAt(TrainerCallback):
        """Simulates an interruption after `step` optimizer steps (the schedule still plans for max_steps)."""

        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    def make(out, extra=(), **overrides):
        return SFTTrainer(
            model=tiny_model(),
            args=sft_args(tmp_path, output_dir=str(tmp_path / out), **overrides),
            train_dataset=domain_data(),
            processing_class=tiny_tokenizer(),
            peft_config=CoFiTuneConfig(layers=(2, 4)),
            callbacks=[CoFiTuneCallback(importance=imp), *extra],
        )

    full = make("full")
    full.train()
    reference = deltas(full.model)

    first = make("resumed", extra=[StopAt(2)], save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / IMPORTANCE_FILE).is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    # a fresh trainer that has NOT been given the importance: the mask must come back from the checkpoint
    second = SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, output_dir=str(tmp_path / "resumed")),
        train_dataset=domain_data(),
        processing_class=tiny_tokenizer(),
        peft_config=CoFiTuneConfig(layers=(2, 4)),
        callbacks=[CoFiTuneCallback()],
    )
    second.train(resume_from_checkpoint=str(checkpoint))
    tuner = find_tuner(second.model)
    assert torch.allclose(tuner.model.model.layers[2].mlp.up_proj.cofitune_scale["default"], 1 - imp.intermediate[2])
    resumed = deltas(second.model)
    for name, value in reference.items():
        assert torch.allclose(resumed[name], value, atol=1e-5), name


def test_callback_refuses_two_importance_sources():
    with pytest.raises(CoFiTuneError, match="either"):
        CoFiTuneCallback(importance=importance(), importance_dataset=["text"])


def test_callback_without_cofitune_adapter_warns(tmp_path, caplog):
    from peft import LoraConfig

    trainer = SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, max_steps=1),
        train_dataset=domain_data(8),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(target_modules=["q_proj"]),
        callbacks=[CoFiTuneCallback()],
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "no CoFiTune adapter" in caplog.text


def test_callback_estimates_importance_at_train_start(tmp_path):
    general = [f"The river {i} flows past the old mill and into the sea." for i in range(8)]
    trainer = SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, max_steps=2),
        train_dataset=domain_data(8),
        processing_class=tiny_tokenizer(),
        peft_config=CoFiTuneConfig(layers=(2, 4)),
        callbacks=[CoFiTuneCallback(importance_dataset=general, num_samples=8, batch_size=4, max_length=32)],
    )
    trainer.train()
    tuner = find_tuner(trainer.model)
    scale = tuner.model.model.layers[2].mlp.up_proj.cofitune_scale["default"]
    assert scale.min() < 1.0 and scale.max() <= 1.0
    saved = Importance.load(tmp_path / "out" / IMPORTANCE_FILE)
    assert torch.allclose(scale, 1 - saved.intermediate[2])
    assert "num_tokens" in saved.metadata


def test_callback_records_the_task_type_and_training_settings_for_the_card(tmp_path):
    trainer = SFTTrainer(
        model=tiny_model(),
        args=sft_args(tmp_path, gradient_accumulation_steps=2, warmup_steps=0.25, weight_decay=0.1),
        train_dataset=domain_data(),
        processing_class=tiny_tokenizer(),
        peft_config=CoFiTuneConfig(layers=(2, 4)),
        callbacks=[CoFiTuneCallback(importance=importance())],
    )
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    info = config["training_info"]
    assert info["trainer"] == "TRL SFTTrainer" and info["steps"] == 4 and info["batch_size"] == 8
    assert info["learning_rate"] == 1e-2 and info["max_length"] == 32 and info["seed"] == 0
    assert info["warmup"] == "0.25 of the steps" and info["weight_decay"] == 0.1
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| trained with | TRL SFTTrainer |" in card and "| examples per optimizer step | 8 |" in card
