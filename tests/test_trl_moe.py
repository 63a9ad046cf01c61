"""TRL's own mixture-of-experts test (`test_train_moe_with_peft_config` in trl's tests/test_sft_trainer.py), with
`CoFiTuneConfig()` in place of its `LoraConfig(target_parameters=[...experts...])`, on a tiny local gpt-oss built from
a config (no Hub): the experts' deltas train, nothing else moves."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")


def test_train_moe_with_peft_config(tmp_path):
    from datasets import Dataset
    from families import tiny_config
    from tiny_models import tiny_tokenizer
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cofitune_peft import CoFiTuneConfig

    torch.manual_seed(0)
    model_id = tmp_path / "tiny-GptOssForCausalLM"
    AutoModelForCausalLM.from_config(tiny_config("gpt_oss")).save_pretrained(model_id)
    tiny_tokenizer().save_pretrained(model_id)

    # Get the base model parameter names
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype="float32")
    base_param_names = [f"base_model.model.{n}" for n, _ in model.named_parameters()]

    # Get the dataset (a local stand-in for trl-internal-testing/zen, standard_language_modeling)
    dataset = Dataset.from_dict({"text": [f"The sky is blue number {i}. Water is wet." for i in range(16)]})

    # Initialize the trainer
    training_args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False)  # CPU

    trainer = SFTTrainer(
        model=str(model_id),
        args=training_args,
        train_dataset=dataset,
        peft_config=CoFiTuneConfig(),
    )

    # Save the initial parameters to compare them later
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}

    # Train the model
    trainer.train()

    # Check that the training loss is not None
    assert trainer.state.log_history[-1]["train_loss"] is not None

    # Check the peft params have changed and the base model params have not changed
    for n, param in previous_trainable_params.items():
        new_param = trainer.model.get_parameter(n)
        if n in base_param_names:  # We expect the base model parameters to be the same
            torch.testing.assert_close(param, new_param), f"Parameter {n} has changed"
        elif "base_layer" not in n:  # We expect the peft parameters to be different (except for the base layer)
            assert not torch.allclose(param, new_param), f"Parameter {n} has not changed"
    # and the peft parameters are CoFiTune's expert deltas
    assert any(".mlp.experts.cofitune_delta." in n for n in previous_trainable_params)
