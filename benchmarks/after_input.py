"""A probe, not a softprompt method: trainable embeddings placed AFTER the input, `[E; S]`, with the answer read
at S's last position (the template's prompt tokens as in P-tuning, Liu et al. 2021, put behind the input). In a
causal model a prompt or prefix in front of the input cannot read it; S can, so it may learn input-dependent
features that a prefix can only steer toward. This script measures whether that closes the gap to LoRA on a
classification task of `benchmarks/defaults.py`, on its splits, with its step count, batch size, validation rule
(every 25 steps, the best by accuracy then gold log-probability) and label scoring; the batches are this script's
own seeded shuffle, not the columns' `BatchOrder`.

    python benchmarks/after_input.py --task debate-party --seed 3            # lr 0.01, 10 tokens

Prints each validation and a final RESULT line (test accuracy and mean gold log-probability of the chosen step).
Labels must be single tokens (the answer is read at one position).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python benchmarks/after_input.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.machine import machine  # noqa: E402
from benchmarks.common.tasks import TASKS, splits  # noqa: E402
from benchmarks.common.training import warmup_then_decay  # noqa: E402
from softprompt.data import TaskEncoder  # noqa: E402
from softprompt.models import LoadConfig, load_model  # noqa: E402

INIT_TEXT = {"debate-party": "Party of the speaker: Democrat or Republican? Answer"}
"""S starts from these words' embeddings, repeated or cut to length (the template's question, with its labels)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="debate-party", choices=sorted(INIT_TEXT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bench = TASKS[args.task]
    model, tokenizer = load_model("smollm2-135m", LoadConfig(dtype="float32"))
    model.eval().requires_grad_(False)
    data = splits(bench.load(), 300, 100)
    task = TaskEncoder(bench.config, tokenizer, max_length=256)
    train_set, valid_set, test_set = (task.encode(data[s]) for s in ("train", "valid", "test"))
    if any(len(ids) != 1 for ids in task.label_ids):
        parser.error(f"{args.task}'s labels are not single tokens: {task.label_ids}")
    label_tokens = torch.tensor([ids[0] for ids in task.label_ids])
    embed = model.get_input_embeddings()
    init_ids = tokenizer(INIT_TEXT[args.task], add_special_tokens=False)["input_ids"]
    torch.manual_seed(args.seed)
    after = torch.nn.Parameter(embed.weight[(init_ids * args.tokens)[: args.tokens]].detach().clone())  # (k, H)

    def answer_logits(examples) -> torch.Tensor:
        """(B, V) next-token logits at the last position of `[E(input); S]`, rows left-padded."""
        rows = [torch.cat([embed(torch.tensor(e.input_ids)), after]) for e in examples]
        length = max(len(r) for r in rows)
        x = torch.stack([F.pad(r, (0, 0, length - len(r), 0)) for r in rows])  # (B, T, H)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 behind the pads
        return model(inputs_embeds=x, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def score(examples) -> tuple[float, float]:
        correct, gold_logprob = 0, 0.0
        for i in range(0, len(examples), 16):
            chunk = examples[i : i + 16]
            logprobs = answer_logits(chunk).log_softmax(-1)[:, label_tokens]  # (B, labels)
            gold = torch.tensor([e.label for e in chunk])
            correct += (logprobs.argmax(-1) == gold).sum().item()
            gold_logprob += logprobs[torch.arange(len(chunk)), gold].sum().item()
        return correct / len(examples), gold_logprob / len(examples)

    steps, warmup, batch_size = args.steps, 10, 8  # train's defaults: linear warmup then linear decay, clip 1.0
    optimizer = torch.optim.AdamW([after], lr=args.lr, weight_decay=0.0)
    schedule = warmup_then_decay(optimizer, warmup, steps)
    rng, order = random.Random(args.seed), []
    best = (score(valid_set), 0, after.detach().clone())
    print("step 0 valid", best[0], flush=True)
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            more = list(range(len(train_set)))
            rng.shuffle(more)
            order += more
        batch, order = [train_set[i] for i in order[:batch_size]], order[batch_size:]
        gold = label_tokens[torch.tensor([e.label for e in batch])]
        loss = F.cross_entropy(answer_logits(batch), gold)  # over the whole vocabulary, as train's loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([after], 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 25 == 0:
            result = score(valid_set)
            print(f"step {step} loss {loss.item():.3f} valid {result}", flush=True)
            if result > best[0]:
                best = (result, step, after.detach().clone())
    with torch.no_grad():
        after.copy_(best[2])
    print(f"RESULT {args.task} seed {args.seed} lr {args.lr} tokens {args.tokens} best_step {best[1]} "
          f"valid {best[0]} test {score(test_set)}", flush=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; {machine()}")


if __name__ == "__main__":
    main()
