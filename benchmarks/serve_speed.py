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
- Ours: `Engine.step()` until all are done: every request in one mixed batch, each prompt's K/V computed once
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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
import urllib.request
import warnings

import torch

from machine import machine  # benchmarks/machine.py (scripts run from this folder)

STARTS = ["Write a short story about", "Explain to a child how", "List three facts about", "Describe the smell of",
          "Give me a recipe for", "What is the history of", "Summarize the plot of a film about",
          "Translate into French: I love", "Write a haiku about", "Why do people enjoy", "Compose an email about",
          "Tell a joke about", "How would you teach", "Invent a new sport involving", "Describe a city built on",
          "Argue for and against"]  # fmt: skip
TOPICS = ["the sea", "old trains and rainy afternoons", "a cat", "mountains in winter"]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def build_prompt(backbone, num_tokens: int, seed: int):
    """A random vocab-initialized soft prompt (untrained)."""
    from softprompt import methods
    from softprompt.config import PromptConfig

    config = PromptConfig(method="prompt", num_tokens=num_tokens, init="vocab")
    return methods.build(config, backbone, generator=torch.Generator().manual_seed(seed))


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


def run_ours(engine, requests, new_tokens: int):
    """requests: (ids, prefix) each. Returns (seconds, per-request latencies, outputs)."""
    from softprompt.serve.engine import Sampling, Sequence

    done: dict[int, tuple[float, list[int]]] = {}
    start = time.perf_counter()
    rows = [Sequence(ids, prefix, Sampling(max_tokens=new_tokens, ignore_eos=True),
                     lambda u, i=i: done.__setitem__(i, (time.perf_counter(), u.tokens)))
            for i, (ids, prefix) in enumerate(requests)]  # fmt: skip
    engine.submit(rows)
    while len(done) < len(rows):
        engine.step()
    seconds = time.perf_counter() - start
    return seconds, [done[i][0] - start for i in range(len(rows))], [done[i][1] for i in range(len(rows))]


def peft_generate(model, tokenizer, texts: list[str], new_tokens: int) -> list[list[int]]:
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[:, -new_tokens:].tolist()


def run_peft(model, tokenizer, groups: dict[str, list[int]], texts: list[str], new_tokens: int):
    """Prompt by prompt, one batch each. Returns (seconds, latencies, outputs) in request order."""
    latencies, outputs = [0.0] * len(texts), [None] * len(texts)
    start = time.perf_counter()
    with torch.no_grad():
        for name, members in groups.items():
            model.set_adapter(name)
            for i, tokens in zip(members, peft_generate(model, tokenizer, [texts[i] for i in members], new_tokens)):
                latencies[i], outputs[i] = time.perf_counter() - start, tokens
    return time.perf_counter() - start, latencies, outputs


def reference_generate(backbone, embeddings: torch.Tensor, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by the definition, independent of both libraries and of any cache: at every step the model
    reads the whole `[P; E]` as inputs_embeds (the soft prompt, then the embeddings of the text and the tokens so far)
    and the next token is the argmax of the last position."""
    model, tokens = backbone.model, list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            embeds = torch.cat([embeddings, model.get_input_embeddings()(torch.tensor(tokens))])[None]  # (1, n + T, d)
            tokens.append(int(model(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax()))
    return tokens[len(ids) :]


def same_before_eos(ours: list[int], theirs: list[int], eos: set[int]) -> bool:
    cut = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    return ours[:cut] == theirs[:cut]


def main() -> None:
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
    parser.add_argument("--json", action="store_true", help="Print only the JSON summary (one line).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))  # noqa: E731

    from transformers.utils import logging as hf_logging

    from softprompt.backbones import backbone_for
    from softprompt.generate import eos_ids
    from softprompt.models import load_model
    from softprompt.serve.engine import Engine, EngineConfig, Sampling, Sequence

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    began = time.perf_counter()
    backbone = backbone_for(*load_model("smollm2-135m"))
    tokenizer = backbone.tokenizer
    lengths = [10 + (i * 2) % 31 for i in range(args.prompts)]  # 10 ... 40
    prompts = [build_prompt(backbone, n, seed) for seed, n in enumerate(lengths)]
    names = [f"p{i}" for i in range(args.prompts)]
    ttft_prompt = build_prompt(backbone, args.ttft_prompt_tokens, seed=args.prompts)
    peft_model = peft_model_with(backbone, prompts + [ttft_prompt], names + ["ttft"])

    t = time.perf_counter()
    with torch.no_grad():  # what the server's registry does once per loaded prompt
        prefixes = [p.kv(backbone).detach() for p in prompts]
        ttft_prefix = ttft_prompt.kv(backbone).detach()
    kv_ms = (time.perf_counter() - t) * 1000 / (args.prompts + 1)

    texts = [f"{STARTS[i % len(STARTS)]} {TOPICS[(i // len(STARTS)) % len(TOPICS)]}." for i in range(args.requests)]
    owner = [i % args.prompts for i in range(args.requests)]
    requests = [(tokenizer(text)["input_ids"], prefixes[k]) for text, k in zip(texts, owner)]
    groups = {names[k]: [i for i in range(args.requests) if owner[i] == k] for k in range(args.prompts)}
    engine = Engine(backbone, EngineConfig(max_batch=args.requests, max_queue=args.requests))

    log("warming up ...")
    run_ours(engine, requests[:4], 2)
    run_peft(peft_model, tokenizer, {names[0]: [0, 1]}, texts, 2)

    ours_runs, peft_runs, ratios = [], [], []
    for rep in range(args.repeats):
        order = ["ours", "peft"] if rep % 2 == 0 else ["peft", "ours"]
        got = {}
        for side in order:
            log(f"repetition {rep + 1}/{args.repeats}: {side} ...")
            if side == "ours":
                got[side] = run_ours(engine, requests, args.new_tokens)
            else:
                got[side] = run_peft(peft_model, tokenizer, groups, texts, args.new_tokens)
        ours_runs.append(got["ours"])
        peft_runs.append(got["peft"])
        ratios.append(got["peft"][0] / got["ours"][0])  # same tokens: throughput ratio = inverse time ratio

    ttft_ids = tokenizer(texts[0])["input_ids"]
    ours_ttft, peft_ttft = [], []
    log("time to first token ...")
    for rep in range(args.ttft_repeats):
        for side in (["ours", "peft"] if rep % 2 == 0 else ["peft", "ours"]):
            if side == "ours":
                first = []
                t = time.perf_counter()
                engine.submit([Sequence(ttft_ids, ttft_prefix, Sampling(max_tokens=1), first.append)])
                while not first:
                    engine.step()
                ours_ttft.append(time.perf_counter() - t)
            else:
                peft_model.set_adapter("ttft")
                t = time.perf_counter()
                with torch.no_grad():
                    peft_generate(peft_model, tokenizer, [texts[0]], 1)
                peft_ttft.append(time.perf_counter() - t)

    total_tokens = args.requests * args.new_tokens
    eos = eos_ids(backbone.tokenizer, backbone.model.generation_config)
    ours_out, peft_out = ours_runs[0][2], peft_runs[0][2]
    batched_equal = sum(same_before_eos(ours_out[i], peft_out[i], eos) for i in range(args.requests))
    # Correctness before any ratio: the first request of each of --check prompts, decoded by the definition.
    checked = list(range(min(args.check, args.prompts, args.requests)))
    log(f"checking {len(checked)} requests against uncached [P; E] decoding ...")
    ours_right = peft_right = peft_alone_right = 0
    for i in checked:
        reference = reference_generate(backbone, prompts[owner[i]].embeddings.detach(), requests[i][0],
                                       args.new_tokens)  # fmt: skip
        ours_right += same_before_eos(reference, ours_out[i], eos)
        if same_before_eos(reference, peft_out[i], eos):
            peft_right += 1
            continue
        peft_model.set_adapter(names[owner[i]])  # PEFT's left-padded rows can drift: its output on the request alone
        with torch.no_grad():
            peft_alone_right += same_before_eos(reference, peft_generate(peft_model, tokenizer, [texts[i]],
                                                                          args.new_tokens)[0], eos)  # fmt: skip
    peer_correct = peft_right + peft_alone_right == len(checked)
    ours_correct = ours_right == len(checked)
    throughput_ratio = statistics.median(ratios) if peer_correct else None
    ttft_ratio = statistics.median(peft_ttft) / statistics.median(ours_ttft) if peer_correct else None
    vllm = None if args.no_vllm else run_vllm(args, prompts, ttft_prompt, requests, owner, ttft_ids, ours_out, eos, log)
    import peft
    import transformers

    summary = {
        "peer_correct": peer_correct,
        "ours_correct": ours_correct,
        "throughput_ratio": None if throughput_ratio is None else round(throughput_ratio, 2),
        "ttft_ratio": None if ttft_ratio is None else round(ttft_ratio, 2),
        "checked": len(checked),
        "ours_equal_reference": ours_right,
        "peft_equal_reference": peft_right,
        "peft_alone_equal_reference": peft_alone_right,
        "peft_batched_equal_ours": batched_equal,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if vllm:
        summary["vllm"] = {k: v for k, v in vllm.items() if k != "runs"}
    if args.json:
        print(json.dumps(summary))
        return


    med = lambda runs, f: statistics.median(f(r) for r in runs)  # noqa: E731
    rows = [
        ("throughput (tokens/s)", med(ours_runs, lambda r: total_tokens / r[0]),
         med(peft_runs, lambda r: total_tokens / r[0]), throughput_ratio, "ours / PEFT"),
        ("latency p50 (s)", med(ours_runs, lambda r: statistics.median(r[1])),
         med(peft_runs, lambda r: statistics.median(r[1])), None, ""),
        ("latency p95 (s)", med(ours_runs, lambda r: percentile(r[1], 95)),
         med(peft_runs, lambda r: percentile(r[1], 95)), None, ""),
        (f"TTFT, {args.ttft_prompt_tokens}-token prompt (ms)", statistics.median(ours_ttft) * 1000,
         statistics.median(peft_ttft) * 1000, ttft_ratio, "PEFT / ours"),
    ]  # fmt: skip
    print(f"softprompt serving vs PEFT group by group: {args.requests} requests over {args.prompts} prompts, "
          f"{args.new_tokens} new tokens each (greedy), SmolLM2-135M float32 on CPU")
    print(f"date     : {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine  : {machine()} (other jobs may share these cores)")
    print(f"versions : torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"command  : {' '.join(shlex.quote(a) for a in ['python', *sys.argv])}")
    print(f"prompts  : {args.prompts} random vocab-initialized soft prompts (init=vocab, seeds 0-{args.prompts - 1}), "
          f"{min(lengths)}-{max(lengths)} virtual tokens; K/V computed once per prompt beforehand "
          f"({kv_ms:.0f} ms each)")
    print(f"runs     : {args.repeats} repetition(s), order flipping; ratios per repetition, then medians; "
          f"TTFT median of {args.ttft_repeats}; {(time.perf_counter() - began) / 60:.1f} min in all")
    print(f"checked  : greedy outputs (before any EOS) against uncached [P; E] decoding, {len(checked)} requests: "
          f"ours {ours_right}/{len(checked)}, PEFT {peft_right}/{len(checked)} as batched"
          f" (+{peft_alone_right} when run alone); {batched_equal}/{args.requests} of PEFT's batched outputs equal "
          "ours")
    if not peer_correct:
        print("           PEFT's outputs are not those of [P; E] with these versions: no ratio is reported")
    print()
    print(f"{'':<34}{'ours':>10}{'PEFT':>10}{'ratio':>8}")
    for name, ours, theirs, ratio, how in rows:
        shown = f"{ratio:>7.2f}x  {how}" if ratio is not None else ""
        print(f"{name:<34}{ours:>10.2f}{theirs:>10.2f}{shown}")
    if vllm:
        direct, front = vllm["runs"]
        print()
        print(f"vLLM {vllm['version']} (CPU build, separate process, float32, eager): greedy outputs equal ours for "
              f"{vllm['direct_equal_ours']}/{args.requests} requests sent directly, {vllm['front_equal_ours']}/"
              f"{args.requests} through our front")  # fmt: skip
        print(f"{'':<34}{'ours':>10}{'vLLM':>10}{'front':>10}{'front/vLLM':>12}")
        lines = [("throughput (tokens/s)", lambda r: total_tokens / r[0]),
                 ("latency p50 (s)", lambda r: statistics.median(r[1])),
                 ("latency p95 (s)", lambda r: percentile(r[1], 95))]  # fmt: skip
        for name, f in lines:
            values = [med(ours_runs, f), med(direct, f), med(front, f)]
            print(f"{name:<34}{values[0]:>10.2f}{values[1]:>10.2f}{values[2]:>10.2f}{values[2] / values[1]:>11.2f}x")
        ttft = [statistics.median(ours_ttft) * 1000, vllm["ttft_direct_ms"], vllm["ttft_front_ms"]]
        print(f"{f'TTFT, {args.ttft_prompt_tokens}-token prompt (ms)':<34}{ttft[0]:>10.2f}{ttft[1]:>10.2f}"
              f"{ttft[2]:>10.2f}{ttft[2] / ttft[1]:>11.2f}x")
    print(json.dumps(summary))  # one object on the last line, as in --json mode


def run_vllm(args, prompts, ttft_prompt, requests, owner, ttft_ids, ours_out, eos, log) -> dict:
    """The same workload (same soft prompts, texts and greedy lengths) sent to vLLM directly as `prompt_embeds`, and
    through our front (`VllmEngine`), alternating; outputs compared with ours."""
    from vllm_side import run_direct, run_front, start_vllm, stop_vllm

    from softprompt.models import embedded_model_dir
    from softprompt.serve.engine import EngineConfig, Sampling, Sequence
    from softprompt.serve.vllm_engine import VllmEngine
    from softprompt.vllm import InputEmbeddings, encode

    log("starting vllm serve ...")
    process, url = start_vllm(embedded_model_dir())
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=10) as response:
            version = json.loads(response.read())["version"]
        front = InputEmbeddings.load("smollm2-135m")
        engine = VllmEngine(front, url, EngineConfig(max_batch=args.requests, max_queue=args.requests)).start()
        soft = [p.embeddings.detach() for p in prompts]
        greedy = dict(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        bodies = [{"prompt_embeds": encode(front.prompt_embeds(soft[owner[i]], ids)), **greedy}
                  for i, (ids, _) in enumerate(requests)]  # fmt: skip
        rows = lambda sink: [Sequence(ids, soft[owner[i]], Sampling(max_tokens=args.new_tokens, ignore_eos=True),  # noqa: E731
                                      sink(i)) for i, (ids, _) in enumerate(requests)]  # fmt: skip
        log("vLLM: warming up ...")
        run_direct(url, bodies[:4])
        run_front(engine, lambda sink: rows(sink)[:4])
        direct_runs, front_runs = [], []
        for rep in range(args.repeats):
            for side in (["direct", "front"] if rep % 2 == 0 else ["front", "direct"]):
                log(f"repetition {rep + 1}/{args.repeats}: vLLM {side} ...")
                if side == "direct":
                    direct_runs.append(run_direct(url, bodies))
                else:
                    front_runs.append(run_front(engine, rows))
        ttft_soft = ttft_prompt.embeddings.detach()
        ttft_body = {"prompt_embeds": encode(front.prompt_embeds(ttft_soft, ttft_ids)), "max_tokens": 1,
                     "temperature": 0}  # fmt: skip
        direct_ttft, front_ttft = [], []
        for _ in range(args.ttft_repeats):
            direct_ttft.append(run_direct(url, [ttft_body])[0])
            front_ttft.append(run_front(engine, lambda sink: [Sequence(ttft_ids, ttft_soft, Sampling(max_tokens=1),
                                                                       sink(0))])[0])  # fmt: skip
        engine.stop()
    finally:
        stop_vllm(process)
    equal = lambda outs: sum(same_before_eos(ours_out[i], outs[i], eos) for i in range(len(requests)))  # noqa: E731
    med = lambda runs: statistics.median(len(requests) * args.new_tokens / r[0] for r in runs)  # noqa: E731
    return {
        "version": version,
        "direct_equal_ours": equal(direct_runs[0][2]),
        "front_equal_ours": equal(front_runs[0][2]),
        "direct_throughput": round(med(direct_runs), 1),
        "front_throughput": round(med(front_runs), 1),
        "front_vs_direct": round(med(front_runs) / med(direct_runs), 3),
        "ttft_direct_ms": round(statistics.median(direct_ttft) * 1000, 1),
        "ttft_front_ms": round(statistics.median(front_ttft) * 1000, 1),
        "runs": (direct_runs, front_runs),
    }


if __name__ == "__main__":
    main()
