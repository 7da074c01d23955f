"""Context distillation on the embedded model (SmolLM2-135M, float32, CPU): a long text prompt distilled into 20
virtual tokens, against the long prompt itself (issue 14).

- Teacher: the model reading an instruction, --demos labelled demonstrations from the training split (half per
  label, short snippets, in a seeded order) and the demo's template "Review: {text}\\nSentiment:".
- Student: prompt tuning, 20 tokens, the demo's text init, the short template alone, trained by
  `softprompt.training.distill.distill` on --train-size training texts without their labels (the demonstrations left
  out): --steps steps of 8 at --lr (0.03) with 10 warm-up steps; no validation, so the last prompt is kept (--valid
  N selects on N labelled validation snippets instead).
- Scored on the first --test held-out snippets (never trained on): the teacher (its text prefix cached, the same
  scores as the whole text read at once: tests/test_distill.py), the student, and the template alone; the student's
  agreement with the teacher; the tokens a request reads (the teacher: its whole text; the student: the virtual
  tokens and the short input).
- Time to first token through the server: `softprompt.serve.build` in this process (uvicorn on a local port), the
  trained prompt registered as `distilled`. --ttft-requests streamed /v1/completions requests each, one at a time,
  alternating, after one warm-up each: the teacher's whole text to the bare model (max_tokens 1, greedy), the bare
  review to `distilled` (the server fills its template and streams the label in one event). The time from sending to
  the first streamed event, median; the student's streamed labels are checked against its offline predictions.

    python benchmarks/distill.py                       # about 6 minutes on 2 cores
    python benchmarks/distill.py --steps 20 --train-size 200 --test 50 --ttft-requests 5   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/distill.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.completions import free_port, stream_completions  # noqa: E402
from benchmarks.common.machine import machine  # noqa: E402
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import fill
from softprompt.data.corpora import sentiment_splits
from softprompt.demo import INIT_TEXT, LABELS, TEMPLATE
from softprompt.training.distill import DistillConfig, Teacher, distill, teacher_label_logprobs
from softprompt.scoring.evaluate import label_scores
from softprompt.models import DEFAULT_MODEL, LoadConfig, load_model
from softprompt.prepare import fitted_task

INSTRUCTION = "Decide whether each movie review is positive or negative.\n\n"
NUM_TOKENS = 20


def teacher_template(train: list[dict], demos: int, seed: int) -> tuple[str, set[str]]:
    """The instruction, `demos` short labelled snippets (half per label, seeded order) and the template; and the
    demonstrations' texts (kept out of the distillation data)."""
    rng = random.Random(seed)
    short = [r for r in train if 40 <= len(r["text"]) <= 120 and "{" not in r["text"] and "}" not in r["text"]]
    picked = [r for label in LABELS for r in rng.sample([r for r in short if r["label"] == label], demos // 2)]
    rng.shuffle(picked)
    shown = "".join(f"Review: {r['text']}\nSentiment: {r['label']}\n\n" for r in picked)
    return INSTRUCTION + shown + TEMPLATE, {r["text"] for r in picked}


def predictions(scores: torch.Tensor) -> list[int]:
    return scores.argmax(-1).tolist()


def accuracy(predicted: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)


def first_event(url: str, body: dict) -> tuple[float, str]:
    """Seconds from sending one streamed completion request to its first event, and the text it streamed."""
    _, (stream,) = stream_completions(url, [body])
    return stream.first, stream.text


def time_to_first_token(prompts_dir: Path, teacher_texts: list[str], reviews: list[str]) -> dict:
    """Median TTFT of the teacher's long text to the bare model and of the review to the distilled prompt, through
    the server in this process; and the labels the server streamed for the reviews."""
    import uvicorn

    from softprompt.serve import ServeConfig, build

    app, engine, registry = build(ServeConfig(model=DEFAULT_MODEL, prompts=prompts_dir))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    base = registry.base.name
    teacher = lambda text: {"model": base, "prompt": text, "max_tokens": 1, "temperature": 0}  # noqa: E731
    student = lambda text: {"model": "distilled", "prompt": text}  # noqa: E731
    try:
        first_event(url, teacher(teacher_texts[-1]))  # warm-up
        first_event(url, student(reviews[-1]))
        times, served = {"teacher": [], "student": []}, []
        for text, review in zip(teacher_texts, reviews):
            times["teacher"].append(first_event(url, teacher(text))[0])
            seconds, label = first_event(url, student(review))
            times["student"].append(seconds)
            served.append(label)
    finally:
        server.should_exit = True
        thread.join()
        engine.stop()
    return {name: statistics.median(values) for name, values in times.items()} | {"served": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--train-size", type=int, default=1200, help="Unlabelled training texts (150 x 8: one pass).")
    parser.add_argument("--demos", type=int, default=8)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--valid", type=int, default=0, help="Labelled validation snippets for selection (0: none).")
    parser.add_argument("--ttft-requests", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on shared cores a second thread mostly spin-waits).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    backbone = backbone_for(*load_model(DEFAULT_MODEL, LoadConfig(dtype="float32")))  # as its README table ran
    task = fitted_task(TaskConfig(template=TEMPLATE, labels=LABELS, label_field="label"), backbone, NUM_TOKENS)
    splits = sentiment_splits()
    long_template, shown = teacher_template(splits["train"], args.demos, args.seed)
    unlabelled = [{"text": r["text"]} for r in splits["train"] if r["text"] not in shown][: args.train_size]
    test = splits["test"][: args.test]
    test_examples, gold = task.encode(test, "test"), [LABELS.index(r["label"]) for r in test]
    tokenizer = backbone.tokenizer
    teacher_lengths = [len(tokenizer(fill(long_template, r))["input_ids"]) for r in test]
    student_lengths = [NUM_TOKENS + len(e.input_ids) for e in test_examples]
    print(f"teacher prompt: {len(tokenizer(long_template.split('{text}')[0])['input_ids'])} tokens before the review "
          f"({args.demos} demonstrations)", flush=True)  # fmt: skip

    with torch.no_grad():
        started = time.perf_counter()
        teacher = Teacher.of(backbone, long_template)
        teacher_scores = teacher_label_logprobs(teacher, task, [teacher.row_ids(r) for r in test])
        teacher_seconds = time.perf_counter() - started
        template_scores = label_scores(backbone, task, test_examples)
    print(f"teacher scored {len(test)} test snippets in {teacher_seconds:.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "prompts" / "distilled"
        valid = task.encode(splits["valid"][: args.valid], "valid") if args.valid else None
        settings = TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=10,
                               eval_every=50 if valid else 0, patience=0, checkpoint_every=0,
                               seed=args.seed)  # fmt: skip
        prompt_config = PromptConfig(num_tokens=NUM_TOKENS, init="text", init_text=INIT_TEXT)
        started = time.perf_counter()
        run = distill(backbone, task, DistillConfig(teacher_template=long_template), prompt_config, settings,
                      unlabelled, out, valid, progress=False)  # fmt: skip
        distill_seconds = time.perf_counter() - started
        print(f"distilled on {len(unlabelled)} unlabelled texts: {distill_seconds:.0f} s in all, "
              f"{run.summary['seconds']:.0f} s of them training ({args.steps} steps; kept step "
              f"{run.summary['best_step']})", flush=True)  # fmt: skip
        with torch.no_grad():
            student_scores = label_scores(backbone, task, test_examples, run.method.kv(backbone))
        n = args.ttft_requests
        texts = [fill(long_template, r) for r in test[:n]]
        ttft = time_to_first_token(out.parent, texts, [r["text"] for r in test[:n]])
    served_agree = sum(s.strip() == LABELS[p] for s, p in zip(ttft["served"], predictions(student_scores)))

    rows = {
        f"teacher: instruction + {args.demos} demonstrations + template": (
            teacher_scores, statistics.mean(teacher_lengths), ttft["teacher"]),
        f"student: distilled {NUM_TOKENS}-token prompt + template": (
            student_scores, statistics.mean(student_lengths), ttft["student"]),
        "template alone, no prompt": (template_scores, statistics.mean(len(e.input_ids) for e in test_examples), None),
    }  # fmt: skip
    teacher_predictions = predictions(teacher_scores)
    print(f"\n{datetime.date.today()}, {machine()}; {len(test)} held-out snippets, TTFT median of {n} streamed "
          f"requests each\n")  # fmt: skip
    print("| setting | accuracy | agreement with the teacher | tokens read per request | TTFT (ms) |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for name, (scores, tokens, seconds) in rows.items():
        predicted = predictions(scores)
        result = {"accuracy": round(accuracy(predicted, gold), 4),
                  "agreement": round(accuracy(predicted, teacher_predictions), 4),
                  "tokens_per_request": round(tokens, 1),
                  "ttft_ms": None if seconds is None else round(seconds * 1e3, 1)}  # fmt: skip
        summary[name] = result
        print(f"| {name} | {result['accuracy']:.3f} | {result['agreement']:.3f} | {tokens:.1f} | "
              f"{'—' if seconds is None else f'{seconds * 1e3:.0f}'} |")  # fmt: skip
    teacher_row, student_row = list(summary.values())[:2]
    print(f"\nThe student reads {teacher_row['tokens_per_request'] / student_row['tokens_per_request']:.1f}x fewer "
          f"tokens per request; its first token comes {teacher_row['ttft_ms'] / student_row['ttft_ms']:.1f}x sooner. "
          f"Served labels equal to its offline predictions: {served_agree}/{n}. "
          f"{(time.perf_counter() - began) / 60:.1f} min in all.")  # fmt: skip
    print(json.dumps({"settings": vars(args), "results": summary, "served_labels_agree": served_agree,
                      "distill_seconds": round(distill_seconds, 1), "train_seconds": run.summary["seconds"],
                      "minutes": round((time.perf_counter() - began) / 60, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
