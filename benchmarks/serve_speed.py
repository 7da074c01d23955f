"""Serving many prompts on one model: softprompt's engine (mixed-prompt continuous batching) against PEFT serving
the same requests group by group, side by side in one process (issue 4), then vLLM with the same soft prompts as
prompt_embeds, directly and through our front (issue 13).

The embedded SmolLM2-135M (float32, CPU) is loaded once; both libraries use this very model object.

- Prompts: 16 soft prompts (prompt tuning) of 10 to 40 virtual tokens, random vocabulary-initialized
  (`methods.build` with init="vocab", seeds 0-15), untrained: the work, hence the speed, does not depend on the
  values. PEFT gets the same embeddings: one PromptTuningConfig adapter per prompt in one PeftModel, each adapter's
  embedding weight = our embeddings.
- Workload: 64 requests (4 per prompt, different texts), all arriving at once, each generating exactly 32 new tokens
  greedily (ours: `ignore_eos`; PEFT: min_new_tokens = max_new_tokens = 32).
- Ours: `LocalEngine.step()` until all are done: every request in one mixed batch, each prompt's K/V computed once
  beforehand (as the server's registry does when it loads a prompt; its time is reported apart).
- PEFT: for each prompt in turn, `set_adapter` then `generate` on its 4 requests in one left-padded batch (PEFT
  cannot put different prompts in one batch); a request's latency is when its group finishes.
- Throughput: 64 x 32 tokens / makespan; latency p50/p95 over the 64 requests; ratio = ours / PEFT.
- Time to first token: one request after a 100-token soft prompt; ours: submit + the engine's first step (prefill
  of the request's text after the cached K/V); PEFT: `generate(max_new_tokens=1)`, which runs the virtual tokens
  too. Median of --ttft-repeats, the two alternating; ratio = PEFT / ours.
- The workload runs --repeats times, the order of the two flipping each time; ratios per repetition, then medians.
- Correctness before any ratio: for the first request of --check prompts, both libraries' greedy outputs (before any
  EOS) are compared with decoding by the definition (`reference_generate`: the whole `[P; E]` as inputs_embeds at
  every step, no cache). PEFT's output for a request can change with the left padding of its batch, so one that
  differs is also run through PEFT alone. If PEFT is still wrong, the summary says `"peer_correct": false` and
  reports no ratio.

- vLLM (unless --no-vllm): a `vllm serve --enable-prompt-embeds` process of the same model (CPU build from
  .venv-vllm, float32, eager) gets the same 64 requests twice, alternating: directly (one streamed HTTP request per
  row, `prompt_embeds` = `[P; E]` from the same soft prompts), and through our front (`VllmEngine`, what
  `softprompt serve --vllm-url` runs). Their greedy outputs are compared with ours; TTFT as above. The vLLM
  process runs after ours and PEFT's runs, so it never competes with them for the cores.

    python benchmarks/serve_speed.py            # table
    python benchmarks/serve_speed.py --json     # only the summary: one JSON object on one line
    python benchmarks/serve_speed.py --requests 4 --prompts 2 --new-tokens 3 --repeats 1 --ttft-repeats 1 --check 2 \
        --no-vllm                               # a smoke check
    python -m benchmarks.serve_speed            # the same, as a module of the benchmarks package

The engine driver, the request texts, decoding by the definition (common/serving.py) and the vLLM process and
stream client (common/completions.py) are shared with scaling.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if __package__ in (None, ""):  # `python benchmarks/serve_speed.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.completions import embeds_body, post_round, vllm_server  # noqa: E402
from benchmarks.common.machine import print_facts, quiet_process, versions  # noqa: E402
from benchmarks.common.model import embedded_backbone, vocab_prompt  # noqa: E402
from benchmarks.common.serving import (Round, drive, front_engine, greedy, local_engine, percentile,  # noqa: E402
                                       prompt_lengths, reference_generate, request_text,
                                       same_before_eos)  # fmt: skip

if TYPE_CHECKING:
    from peft import PeftModel

    from softprompt.backbones import Backbone
    from softprompt.methods import SoftPrompt


# ---------------------------------------------------------------------------------------------------- PEFT's side
def peft_model_with(backbone, prompts: list, names: list[str]):
    """One PeftModel over this very model, one prompt-tuning adapter per prompt, holding our embeddings."""
    import peft

    model = None
    for name, prompt in zip(names, prompts):
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.embeddings.shape[0])
        if model is None:
            model = peft.get_peft_model(backbone.model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with torch.no_grad():
            model.prompt_encoder[name].embedding.weight.copy_(prompt.embeddings)  # (n, hidden)
    assert model.get_base_model() is backbone.model
    return model.eval()


def peft_generate(model, tokenizer, texts: list[str], new_tokens: int) -> list[list[int]]:
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[:, -new_tokens:].tolist()


def run_peft(model, tokenizer, groups: dict[str, list[int]], texts: list[str], new_tokens: int) -> Round:
    """Prompt by prompt, one batch each; a request's first and last token come when its group finishes."""
    latencies, outputs = [0.0] * len(texts), [None] * len(texts)
    start = time.perf_counter()
    with torch.no_grad():
        for name, members in groups.items():
            model.set_adapter(name)
            for i, tokens in zip(members, peft_generate(model, tokenizer, [texts[i] for i in members], new_tokens)):
                latencies[i], outputs[i] = time.perf_counter() - start, tokens
    return Round(time.perf_counter() - start, latencies, latencies, outputs)


# ---------------------------------------------------------------------------------------------------- the workload
@dataclass
class Workload:
    """The prompts (soft embeddings, our cached K/V, PEFT's adapters), the requests and who owns them."""

    backbone: Backbone
    prompts: list[SoftPrompt]
    names: list[str]
    """PEFT's adapter name per prompt."""
    ttft_prompt: SoftPrompt
    prefixes: list[torch.Tensor]
    ttft_prefix: torch.Tensor
    kv_ms: float
    """Milliseconds to compute one prompt's K/V (once per prompt, as the server's registry does)."""
    peft_model: PeftModel
    texts: list[str]
    owner: list[int]
    """The prompt of each request."""
    requests: list[tuple[list[int], torch.Tensor]]
    """(token ids, our cached K/V) per request."""
    groups: dict[str, list[int]]
    """PEFT's batches: adapter name -> its requests."""

    @property
    def lengths(self) -> list[int]:
        return [p.embeddings.shape[0] for p in self.prompts]


def build_workload(args) -> Workload:
    backbone = embedded_backbone(dtype=args.dtype, device=args.device)
    lengths = prompt_lengths(args.prompts)
    prompts = [vocab_prompt(backbone, "prompt", n, seed) for seed, n in enumerate(lengths)]
    names = [f"p{i}" for i in range(args.prompts)]
    ttft_prompt = vocab_prompt(backbone, "prompt", args.ttft_prompt_tokens, seed=args.prompts)
    peft_model = peft_model_with(backbone, prompts + [ttft_prompt], names + ["ttft"])
    t = time.perf_counter()
    with torch.no_grad():  # what the server's registry does once per loaded prompt
        prefixes = [p.kv(backbone).detach() for p in prompts]
        ttft_prefix = ttft_prompt.kv(backbone).detach()
    kv_ms = (time.perf_counter() - t) * 1000 / (args.prompts + 1)
    texts = [request_text(i) for i in range(args.requests)]
    owner = [i % args.prompts for i in range(args.requests)]
    requests = [(backbone.tokenizer(text)["input_ids"], prefixes[k]) for text, k in zip(texts, owner)]
    groups = {names[k]: [i for i in range(args.requests) if owner[i] == k] for k in range(args.prompts)}
    return Workload(backbone, prompts, names, ttft_prompt, prefixes, ttft_prefix, kv_ms, peft_model, texts, owner,
                    requests, groups)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the runs
def race(args, work: Workload, engine, log) -> tuple[list[Round], list[Round]]:
    """The workload --repeats times on each side, the order flipping each time (after a small warm-up of each)."""
    tokenizer = work.backbone.tokenizer
    log("warming up ...")
    drive(engine, work.requests[:4], greedy(2))
    run_peft(work.peft_model, tokenizer, {work.names[0]: [0, 1]}, work.texts, 2)
    ours_runs, peft_runs = [], []
    for rep in range(args.repeats):
        for side in ["ours", "peft"] if rep % 2 == 0 else ["peft", "ours"]:
            log(f"repetition {rep + 1}/{args.repeats}: {side} ...")
            if side == "ours":
                ours_runs.append(drive(engine, work.requests, greedy(args.new_tokens)))
            else:
                peft_runs.append(run_peft(work.peft_model, tokenizer, work.groups, work.texts, args.new_tokens))
    return ours_runs, peft_runs


def time_to_first_token(args, work: Workload, engine, log) -> tuple[list[float], list[float]]:
    """Seconds to the first token of one request after the long prompt, ours and PEFT alternating."""
    ttft_ids = work.backbone.tokenizer(work.texts[0])["input_ids"]
    ours_ttft, peft_ttft = [], []
    log("time to first token ...")
    for rep in range(args.ttft_repeats):
        for side in ["ours", "peft"] if rep % 2 == 0 else ["peft", "ours"]:
            if side == "ours":
                ours_ttft.append(drive(engine, [(ttft_ids, work.ttft_prefix)], greedy(1, ignore_eos=False)).seconds)
            else:
                work.peft_model.set_adapter("ttft")
                t = time.perf_counter()
                with torch.no_grad():
                    peft_generate(work.peft_model, work.backbone.tokenizer, [work.texts[0]], 1)
                peft_ttft.append(time.perf_counter() - t)
    return ours_ttft, peft_ttft


@dataclass
class Check:
    """Greedy outputs (before any EOS) of the first request of each checked prompt against uncached decoding."""

    checked: int
    ours_right: int
    peft_right: int
    peft_alone_right: int
    """PEFT's wrong batched outputs that are right when the request runs alone (left padding can drift)."""
    batched_equal: int
    """Of all requests, PEFT's batched outputs equal to ours."""

    @property
    def peer_correct(self) -> bool:
        return self.peft_right + self.peft_alone_right == self.checked


def check(args, work: Workload, ours_out: list, peft_out: list, eos: set[int], log) -> Check:
    backbone, tokenizer = work.backbone, work.backbone.tokenizer
    batched_equal = sum(same_before_eos(ours_out[i], peft_out[i], eos) for i in range(args.requests))
    checked = min(args.check, args.prompts, args.requests)
    log(f"checking {checked} requests against uncached [P; E] decoding ...")
    ours_right = peft_right = peft_alone_right = 0
    for i in range(checked):
        reference = reference_generate(backbone, work.prompts[work.owner[i]].embeddings.detach(), work.requests[i][0],
                                       args.new_tokens)  # fmt: skip
        ours_right += same_before_eos(reference, ours_out[i], eos)
        if same_before_eos(reference, peft_out[i], eos):
            peft_right += 1
            continue
        work.peft_model.set_adapter(work.names[work.owner[i]])  # PEFT's left-padded rows can drift: the request alone
        with torch.no_grad():
            alone = peft_generate(work.peft_model, tokenizer, [work.texts[i]], args.new_tokens)[0]
        peft_alone_right += same_before_eos(reference, alone, eos)
    return Check(checked, ours_right, peft_right, peft_alone_right, batched_equal)


def run_vllm(args, work: Workload, ours_out: list, eos: set[int], log) -> dict:
    """The same workload (same soft prompts, texts and greedy lengths) sent to vLLM directly as `prompt_embeds`, and
    through our front (`VllmEngine`), alternating; outputs compared with ours."""
    from softprompt.models import embedded_model_dir
    from softprompt.serve.vllm_embeds import InputEmbeddings

    log("starting vllm serve ...")
    with vllm_server(embedded_model_dir(), port=8931, log=Path("/tmp/serve_speed_vllm.log")) as server:
        front = InputEmbeddings.load("smollm2-135m")
        engine = front_engine(front, server.url, args.requests, args.requests)
        soft = [p.embeddings.detach() for p in work.prompts]
        rows = [(ids, soft[work.owner[i]]) for i, (ids, _) in enumerate(work.requests)]
        bodies = [embeds_body(front, prompt, ids, max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
                  for ids, prompt in rows]  # fmt: skip
        log("vLLM: warming up ...")
        post_round(server.url, bodies[:4])
        drive(engine, rows[:4], greedy(args.new_tokens), threaded=True)
        direct_runs, front_runs = [], []
        for rep in range(args.repeats):
            for side in ["direct", "front"] if rep % 2 == 0 else ["front", "direct"]:
                log(f"repetition {rep + 1}/{args.repeats}: vLLM {side} ...")
                if side == "direct":
                    direct_runs.append(post_round(server.url, bodies))
                else:
                    front_runs.append(drive(engine, rows, greedy(args.new_tokens), threaded=True))
        ttft_soft, ttft_ids = work.ttft_prompt.embeddings.detach(), work.backbone.tokenizer(work.texts[0])["input_ids"]
        ttft_body = embeds_body(front, ttft_soft, ttft_ids, max_tokens=1, temperature=0)
        direct_ttft, front_ttft = [], []
        for _ in range(args.ttft_repeats):
            direct_ttft.append(post_round(server.url, [ttft_body]).seconds)
            front_ttft.append(drive(engine, [(ttft_ids, ttft_soft)], greedy(1, ignore_eos=False),
                                    threaded=True).seconds)  # fmt: skip
        engine.stop()
    equal = lambda outs: sum(same_before_eos(ours_out[i], outs[i], eos) for i in range(len(rows)))  # noqa: E731
    med = lambda runs: statistics.median(len(rows) * args.new_tokens / r.seconds for r in runs)  # noqa: E731
    return {
        "version": server.version,
        "direct_equal_ours": equal(direct_runs[0].outputs),
        "front_equal_ours": equal(front_runs[0].outputs),
        "direct_throughput": round(med(direct_runs), 1),
        "front_throughput": round(med(front_runs), 1),
        "front_vs_direct": round(med(front_runs) / med(direct_runs), 3),
        "ttft_direct_ms": round(statistics.median(direct_ttft) * 1000, 1),
        "ttft_front_ms": round(statistics.median(front_ttft) * 1000, 1),
        "runs": (direct_runs, front_runs),
    }


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class Results:
    ours_runs: list[Round]
    peft_runs: list[Round]
    ours_ttft: list[float]
    peft_ttft: list[float]
    check: Check
    vllm: dict | None

    @property
    def throughput_ratio(self) -> float | None:
        """PEFT's time / ours per repetition (same tokens: the throughput ratio), median; None if PEFT is wrong."""
        ratios = [p.seconds / o.seconds for o, p in zip(self.ours_runs, self.peft_runs)]
        return statistics.median(ratios) if self.check.peer_correct else None

    @property
    def ttft_ratio(self) -> float | None:
        if not self.check.peer_correct:
            return None
        return statistics.median(self.peft_ttft) / statistics.median(self.ours_ttft)


def summary_of(results: Results) -> dict:
    c, throughput_ratio, ttft_ratio = results.check, results.throughput_ratio, results.ttft_ratio
    summary = {
        "peer_correct": c.peer_correct,
        "ours_correct": c.ours_right == c.checked,
        "throughput_ratio": None if throughput_ratio is None else round(throughput_ratio, 2),
        "ttft_ratio": None if ttft_ratio is None else round(ttft_ratio, 2),
        # ours alone counts whatever the peer did (an A/B of our own commits reads these)
        "ours_tokens_per_s": round(med(results.ours_runs, lambda r: sum(map(len, r.outputs)) / r.seconds), 1),
        "ours_ttft_ms": round(statistics.median(results.ours_ttft) * 1000, 1),
        "checked": c.checked,
        "ours_equal_reference": c.ours_right,
        "peft_equal_reference": c.peft_right,
        "peft_alone_equal_reference": c.peft_alone_right,
        "peft_batched_equal_ours": c.batched_equal,
        "versions": versions(),
    }
    if results.vllm:
        summary["vllm"] = {k: v for k, v in results.vllm.items() if k != "runs"}
    return summary


def med(runs: list[Round], f) -> float:
    return statistics.median(f(r) for r in runs)


def print_report(args, work: Workload, results: Results, minutes: float) -> None:
    total_tokens = args.requests * args.new_tokens
    c, ours_runs, peft_runs = results.check, results.ours_runs, results.peft_runs
    ttft_ours, ttft_peft = statistics.median(results.ours_ttft) * 1000, statistics.median(results.peft_ttft) * 1000
    rows = [
        ("throughput (tokens/s)", med(ours_runs, lambda r: total_tokens / r.seconds),
         med(peft_runs, lambda r: total_tokens / r.seconds), results.throughput_ratio, "ours / PEFT"),
        ("latency p50 (s)", med(ours_runs, lambda r: statistics.median(r.done)),
         med(peft_runs, lambda r: statistics.median(r.done)), None, ""),
        ("latency p95 (s)", med(ours_runs, lambda r: percentile(r.done, 95)),
         med(peft_runs, lambda r: percentile(r.done, 95)), None, ""),
        (f"TTFT, {args.ttft_prompt_tokens}-token prompt (ms)", ttft_ours, ttft_peft, results.ttft_ratio,
         "PEFT / ours"),
    ]  # fmt: skip
    print(f"softprompt serving vs PEFT group by group: {args.requests} requests over {args.prompts} prompts, "
          f"{args.new_tokens} new tokens each (greedy), SmolLM2-135M float32 on CPU")
    print_facts(" (other jobs may share these cores)")
    print(f"prompts  : {args.prompts} random vocab-initialized soft prompts (init=vocab, seeds 0-{args.prompts - 1}), "
          f"{min(work.lengths)}-{max(work.lengths)} virtual tokens; K/V computed once per prompt beforehand "
          f"({work.kv_ms:.0f} ms each)")
    print(f"runs     : {args.repeats} repetition(s), order flipping; ratios per repetition, then medians; "
          f"TTFT median of {args.ttft_repeats}; {minutes:.1f} min in all")
    print(f"checked  : greedy outputs (before any EOS) against uncached [P; E] decoding, {c.checked} requests: "
          f"ours {c.ours_right}/{c.checked}, PEFT {c.peft_right}/{c.checked} as batched"
          f" (+{c.peft_alone_right} when run alone); {c.batched_equal}/{args.requests} of PEFT's batched outputs "
          "equal ours")
    if not c.peer_correct:
        print("           PEFT's outputs are not those of [P; E] with these versions: no ratio is reported")
    print()
    print(f"{'':<34}{'ours':>10}{'PEFT':>10}{'ratio':>8}")
    for name, ours, theirs, ratio, how in rows:
        shown = f"{ratio:>7.2f}x  {how}" if ratio is not None else ""
        print(f"{name:<34}{ours:>10.2f}{theirs:>10.2f}{shown}")
    if results.vllm:
        print_vllm(args, results.vllm, ours_runs, ttft_ours)


def print_vllm(args, vllm: dict, ours_runs: list[Round], ttft_ours: float) -> None:
    total_tokens = args.requests * args.new_tokens
    direct, front = vllm["runs"]
    print()
    print(f"vLLM {vllm['version']} (CPU build, separate process, float32, eager): greedy outputs equal ours for "
          f"{vllm['direct_equal_ours']}/{args.requests} requests sent directly, {vllm['front_equal_ours']}/"
          f"{args.requests} through our front")  # fmt: skip
    print(f"{'':<34}{'ours':>10}{'vLLM':>10}{'front':>10}{'front/vLLM':>12}")
    lines = [("throughput (tokens/s)", lambda r: total_tokens / r.seconds),
             ("latency p50 (s)", lambda r: statistics.median(r.done)),
             ("latency p95 (s)", lambda r: percentile(r.done, 95))]  # fmt: skip
    for name, f in lines:
        values = [med(ours_runs, f), med(direct, f), med(front, f)]
        print(f"{name:<34}{values[0]:>10.2f}{values[1]:>10.2f}{values[2]:>10.2f}{values[2] / values[1]:>11.2f}x")
    ttft = [ttft_ours, vllm["ttft_direct_ms"], vllm["ttft_front_ms"]]
    print(f"{f'TTFT, {args.ttft_prompt_tokens}-token prompt (ms)':<34}{ttft[0]:>10.2f}{ttft[1]:>10.2f}"
          f"{ttft[2]:>10.2f}{ttft[2] / ttft[1]:>11.2f}x")


# ---------------------------------------------------------------------------------------------------- main
def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ttft-prompt-tokens", type=int, default=100)
    parser.add_argument("--ttft-repeats", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2, help="Workload repetitions, the order flipping each time.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on shared cores a second thread mostly spin-waits).")
    parser.add_argument("--check", type=int, default=8,
                        help="Requests (one per prompt) whose outputs are checked against uncached [P; E] decoding.")
    parser.add_argument("--no-vllm", action="store_true",
                        help="Leave out the vLLM columns (vLLM direct, and our front to it; need .venv-vllm).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="The model's dtype for our engine and PEFT (vLLM takes its own).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (our engine and PEFT).")
    parser.add_argument("--json", action="store_true", help="Print only the JSON summary (one line).")
    return parser.parse_args()


def main() -> None:
    args = parse()
    quiet_process(args.threads)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))  # noqa: E731

    from softprompt.scoring.generate import eos_ids

    began = time.perf_counter()
    work = build_workload(args)
    engine = local_engine(work.backbone, args.requests, args.requests)
    ours_runs, peft_runs = race(args, work, engine, log)
    ours_ttft, peft_ttft = time_to_first_token(args, work, engine, log)
    eos = eos_ids(work.backbone.tokenizer, work.backbone.model.generation_config)
    ours_out = ours_runs[0].outputs
    checked = check(args, work, ours_out, peft_runs[0].outputs, eos, log)
    vllm = None if args.no_vllm else run_vllm(args, work, ours_out, eos, log)
    results = Results(ours_runs, peft_runs, ours_ttft, peft_ttft, checked, vllm)
    summary = summary_of(results)
    if not args.json:
        print_report(args, work, results, (time.perf_counter() - began) / 60)
    print(json.dumps(summary))  # one object on the last line, as in --json mode


if __name__ == "__main__":
    main()
