"""The translation demo, the task soft prompts were first shown with: English -> Chinese taught to a frozen Gemma 3
270M by a prompt and by a prefix, with no instruction text, beside the same model given an instruction (alone and
with four examples). Every row decodes by one rule: greedy, ending at the end of the line, EOS or MAX_NEW_TOKENS."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_json, write_jsonl
from ..config import PLACEHOLDER, PromptConfig, TaskConfig, TrainConfig
from ..data.corpora import english_chinese, splits
from ..models import LoadConfig
from ..prepare import load_backbone, task_data
from ..scoring.evaluate import evaluate
from ..training.loop import train

MODEL = "gemma3-270m"
TEMPLATE = "English: {en}\nChinese:"
"""Field labels only: the trained rows see no instruction."""
INSTRUCTION = "Translate the following sentence into Chinese:\n"
SHOTS = 4
STOP = ["\n"]
MAX_NEW_TOKENS = 24
"""About twice the longest reference: Gemma's tokenizer spends at most 13 tokens on an HSK sentence."""
SEED = {"en": "Look out!", "zh": "小心！"}
"""The example of the documents soft prompts come from; it is not in the data."""
SHOWN = 5
TEST_SIZE, VALID_SIZE = 100, 48
LR = {"prompt": 0.03, "prefix": 0.01}
"""Measured for this start and length: prefix tuning at train's default 0.03 gave chrF 26.4 against 27.0 (README)."""
STEPS = 80
"""Each prompt's; on 2 CPU cores a step takes about 2.3 s (README: what 100 steps gave)."""
# Validation every 20 steps keeps the best prompt by chrF (the default --select-by for generation).
TRAINING = dict(batch_size=8, warmup_steps=10, eval_every=20, eval_size=VALID_SIZE, patience=4)


@dataclass
class Row:
    name: str
    result: dict
    outputs: list[str]
    """The held-out sentences shown, then the seed's."""
    seconds: float


def run_translation_demo(out: Path, steps: int = STEPS, progress: bool = True, load: LoadConfig | None = None,
                         as_json: bool = False) -> dict:  # fmt: skip
    started = time.perf_counter()
    out = Path(out)
    say = (lambda text: None) if as_json else (lambda text: print(text, flush=True))
    say(f"Loading the embedded model {MODEL} (Gemma 3 270M)...")
    backbone = load_backbone(MODEL, load, training=True)
    data = splits(english_chinese(), TEST_SIZE, VALID_SIZE)
    for name, records in data.items():
        write_jsonl(out / "data" / f"{name}.jsonl", records)
    shots = [r for r in data["train"] if not PLACEHOLDER.search(r["en"] + r["zh"])][:SHOTS]
    say(f"HSK sentence pairs: {', '.join(f'{len(v)} {k}' for k, v in data.items())} (written to {out / 'data'}; "
        f"the test split is never trained on); the {SHOTS} examples of row (b) come from the training split")

    def encoded(template: str, names: list[str], virtual_tokens: int = 0):
        config = TaskConfig(template=template, task="generation", target_field="zh")
        return task_data(config, backbone, {n: [SEED] if n == "seed" else data[n] for n in names}, virtual_tokens)

    rows: list[Row] = []

    def score(name: str, template: str, prompt_input: torch.Tensor | None = None) -> None:
        began = time.perf_counter()
        task, (test, seed) = encoded(template, ["test", "seed"])
        outputs, seed_output = [], []
        result = evaluate(backbone, task, test, prompt_input, progress=progress and not as_json,
                          max_new_tokens=MAX_NEW_TOKENS, outputs=outputs, stop=STOP)  # fmt: skip
        evaluate(backbone, task, seed, prompt_input, max_new_tokens=MAX_NEW_TOKENS, outputs=seed_output, stop=STOP)
        shown = [o.strip() for o in outputs[:SHOWN] + seed_output]  # as scored: the metrics strip them too
        rows.append(Row(name, result, shown, time.perf_counter() - began))
        say(f"  {name}: chrF {result['chrf']:.1f}, BLEU {result['bleu']:.1f}, exact match {result['exact_match']:.3f}")

    say("\nBase model, no soft prompt:")
    score("(a) instruction", INSTRUCTION + TEMPLATE)
    examples = "".join(f"English: {r['en']}\nChinese: {r['zh']}\n" for r in shots)
    score(f"(b) instruction + {SHOTS} examples", INSTRUCTION + examples + TEMPLATE)
    # (c) and (d) start as (b)'s text (the model's own embeddings or K/V over it, BOS first as an input has it) and
    # learn from there; what they are trained and tested on holds no instruction.
    start = (backbone.tokenizer.bos_token or "") + INSTRUCTION + examples
    length = len(backbone.tokenizer(start, add_special_tokens=False)["input_ids"])
    for letter, method in zip("cd", LR):
        prompt_config = PromptConfig(method=method, num_tokens=length, init="text", init_text=start)
        say(f"\nTraining {method} tuning ({length} tokens starting as (b)'s instruction and examples; no instruction "
            f"in the template) for up to {steps} steps, the best on validation chrF kept...")
        task, (train_examples, valid) = encoded(TEMPLATE, ["train", "valid"], length)
        run = train(backbone, task, prompt_config, TrainConfig(steps=steps, lr=LR[method], **TRAINING),
                    train_examples, out / method, valid, progress=progress and not as_json,
                    resume=True)  # a rerun reuses its run
        with torch.no_grad():
            prompt_input = run.method.kv(backbone)
        score(f"({letter}) {method} tuning, step {run.summary['best_step']}", TEMPLATE, prompt_input)

    summary = {"model": MODEL, "test": TEST_SIZE, "steps": steps,
               "rows": {r.name: {k: r.result[k] for k in ("chrf", "bleu", "exact_match")} | {"seconds": r.seconds}
                        for r in rows},
               "examples": [{"en": record["en"], "reference": record["zh"], **{r.name: r.outputs[i] for r in rows}}
                            for i, record in enumerate(data["test"][:SHOWN] + [SEED])],
               "seconds": time.perf_counter() - started}  # fmt: skip
    write_json(out / "results.json", summary)
    if as_json:
        print(json.dumps(summary, ensure_ascii=False), flush=True)
        return summary
    say(format_table(summary))
    say(f"\nDone in {summary['seconds']:.0f} s. Try: softprompt generate --prompt {out / 'prefix'} "
        "'Where is the station?' --stop $'\\n'")
    return summary


def format_table(summary: dict) -> str:
    """The scores on the held-out pairs, then each row's translations of the sentences shown."""
    names = list(summary["rows"])
    width = max(map(len, names))
    lines = [f"\nEnglish -> Chinese on {summary['test']} held-out HSK sentence pairs ({summary['model']}, greedy, "
             "one line):", f"  {'setting':<{width}}   chrF   BLEU  exact match"]  # fmt: skip
    lines += [f"  {n:<{width}}  {r['chrf']:5.1f}  {r['bleu']:5.1f}  {r['exact_match']:11.3f}"
              for n, r in summary["rows"].items()]  # fmt: skip
    for example in summary["examples"]:
        lines.append(f"\n  {example['en']}  (reference: {example['reference']})")
        lines += [f"    {n[:3]} {example[n]}" for n in names]
    return "\n".join(lines)
