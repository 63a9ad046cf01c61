"""How well the base SmolLM2-135M-Instruct does on `cofitune_peft.kit.data`'s speciality task and versatility probes.

Greedy decoding with the chat template (no system message of ours; the template adds its default one),
`max_new_tokens=16`; multiple choice by the log-likelihood of each option's tokens as the assistant reply.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_baseline.py [--n-arith 30] [--n-capitals 40] [--seed 0] [--max-new-tokens 16] [--show]

The figures are quoted in the module docstring of `cofitune_peft/data/__init__.py`.
"""

from __future__ import annotations

import argparse
import time

import torch

from cofitune_peft.kit.data import answer_matches, arithmetic_task, capital_probes, extract_number
from cofitune_peft.kit.loading import load_smollm2


def chat_ids(tokenizer, prompt: str, reply: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if reply is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    messages.append({"role": "assistant", "content": reply})
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 8) -> list[str]:
    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(prompts), batch_size):
        batch = [chat_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, batch))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


@torch.no_grad()
def option_logprobs(model, tokenizer, prompt: str, options: list[str]) -> list[tuple[float, float]]:
    """(sum, mean) log-probability of each option's content tokens, given the chat prompt."""
    prefix = chat_ids(tokenizer, prompt)
    scores = []
    for option in options:
        full = chat_ids(tokenizer, prompt, option)
        end = len(full) - len(tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
        assert full[: len(prefix)] == prefix, "chat template renders the prompt differently with a reply"
        logits = model(torch.tensor([full])).logits[0, :-1].float().log_softmax(-1)
        targets = torch.tensor(full[1:])
        token_lp = logits.gather(-1, targets[:, None])[:, 0][len(prefix) - 1 : end - 1]
        scores.append((token_lp.sum().item(), token_lp.mean().item()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-arith", type=int, default=30)
    parser.add_argument("--n-capitals", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--show", action="store_true", help="print every question and reply")
    args = parser.parse_args()

    start = time.time()
    model, tokenizer = load_smollm2()
    model.eval()

    _, test = arithmetic_task(n_train=0, n_test=args.n_arith, seed=args.seed)
    replies = generate(model, tokenizer, test["prompt"], args.max_new_tokens)
    correct = [extract_number(r) == a for r, a in zip(replies, test["answer"])]
    if args.show:
        for p, r, a, ok in zip(test["prompt"], replies, test["answer"], correct):
            print(f"{'OK ' if ok else '-- '} {p!r} -> {r!r} (answer {a})")
    print(f"arithmetic (+, -; 2-digit), {len(test)} test questions: {sum(correct)}/{len(test)}")

    short = capital_probes(n=args.n_capitals, seed=args.seed, kind="short")
    replies = generate(model, tokenizer, short["prompt"], args.max_new_tokens)
    correct = [answer_matches(r, [a, *al]) for r, a, al in zip(replies, short["answer"], short["aliases"])]
    if args.show:
        for p, r, a, ok in zip(short["prompt"], replies, short["answer"], correct):
            print(f"{'OK ' if ok else '-- '} {p!r} -> {r!r} (answer {a})")
    print(f"capitals, generated short answer, {len(short)} probes: {sum(correct)}/{len(short)}")

    mc = capital_probes(n=args.n_capitals, seed=args.seed, kind="mc")
    by_sum = by_mean = 0
    for row in mc:
        scores = option_logprobs(model, tokenizer, row["prompt"], row["options"])
        by_sum += max(range(4), key=lambda i: scores[i][0]) == row["label"]
        by_mean += max(range(4), key=lambda i: scores[i][1]) == row["label"]
    print(
        f"capitals, 4-way multiple choice, {len(mc)} probes: {by_sum}/{len(mc)} by summed option log-likelihood, "
        f"{by_mean}/{len(mc)} by mean token log-likelihood"
    )
    print(f"({time.time() - start:.0f} s, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
