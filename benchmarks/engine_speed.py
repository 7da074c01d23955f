"""Our serving engine alone on serve_speed.py's workload, for an A/B of two commits of this repository: run it from
each checkout in turn (alternating, in one sitting) and compare tokens/s; equal `outputs` digests say the tokens
are the same. serve_speed.py measures the engine beside PEFT and vLLM; this leaves them out, so a run with long
generations takes a minute, not half an hour.

    python benchmarks/engine_speed.py --new-tokens 256 --repeats 1
    python benchmarks/engine_speed.py --long-prompt 400 --repeats 1     # one long prompt among the short ones
    python benchmarks/engine_speed.py --dtype bfloat16                  # the frozen model in bfloat16
    (cd ../other-checkout && PYTHONPATH=src python benchmarks/engine_speed.py --new-tokens 256 --repeats 1)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/engine_speed.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.machine import quiet_process  # noqa: E402
from benchmarks.common.model import embedded_backbone, vocab_prompt  # noqa: E402
from benchmarks.common.serving import drive, greedy, local_engine, prompt_lengths, request_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per request, EOS ignored")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long-prompt", type=int, default=0, metavar="TOKENS",
                        help="One request (the sixth) with a text of this many tokens among the short ones.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    quiet_process(args.threads)
    backbone = embedded_backbone(dtype=args.dtype)
    with torch.no_grad():  # what the server's registry does once per loaded prompt
        prefixes = [vocab_prompt(backbone, "prompt", n, seed).kv(backbone).detach()
                    for seed, n in enumerate(prompt_lengths(args.prompts))]  # fmt: skip
    rows = [(backbone.tokenizer(request_text(i))["input_ids"], prefixes[i % args.prompts])
            for i in range(args.requests)]  # fmt: skip
    if args.long_prompt:  # a long text beside short ones: what one client's long prompt costs the others
        text = " ".join(request_text(i) for i in range(args.long_prompt))
        rows[5] = (backbone.tokenizer(text)["input_ids"][: args.long_prompt], rows[5][1])
    engine = local_engine(backbone, args.requests, args.requests)
    drive(engine, rows[:4], greedy(2))  # warm-up
    runs = [drive(engine, rows, greedy(args.new_tokens)) for _ in range(args.repeats)]
    tokens = args.requests * args.new_tokens
    print(json.dumps({"tokens_per_s": [round(tokens / r.seconds, 1) for r in runs],
                      "outputs": hashlib.sha256(repr(runs[0].outputs).encode()).hexdigest()[:16]}))  # fmt: skip


if __name__ == "__main__":
    main()
