"""The vLLM columns of serve_speed.py: the same workload sent to `vllm serve --enable-prompt-embeds` directly (one
HTTP request per row, `prompt_embeds` = `[P; E]`, all at once) and through our front (`VllmEngine`, what
`softprompt serve --vllm-url` runs), both against one vLLM process started here from .venv-vllm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]


def start_vllm(model_dir: Path, port: int = 8931, log: Path = Path("/tmp/serve_speed_vllm.log")):
    """A `vllm serve` process of `model_dir` (float32, eager, CPU), healthy; returns (process, url)."""
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        raise SystemExit(f"no vLLM environment at {ROOT / '.venv-vllm'}: run `bash scripts/setup_vllm.sh`, or pass "
                         "--no-vllm")  # fmt: skip
    # a fixed context and KV space (scripts/vllm_serve.sh), so vLLM starts whatever the machine's memory
    command = ["bash", str(ROOT / "scripts" / "vllm_serve.sh"), str(model_dir), "--served-model-name", "base",
               "--port", str(port)]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_vllm(process) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def run_direct(url: str, bodies: list[dict]) -> tuple[float, list[float], list[list[int]]]:
    """Every body posted at once (streamed, as the front does): (makespan, per-request latency, token ids)."""

    async def one(client, body, start):
        tokens = []
        async with client.stream("POST", "/v1/completions", json={"model": "base", "stream": True,
                                                                  "return_token_ids": True, **body}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
        return time.perf_counter() - start, tokens

    async def all_at_once():
        limits = httpx2.Limits(max_connections=len(bodies))
        async with httpx2.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            done = await asyncio.gather(*(one(client, body, start) for body in bodies))
            return time.perf_counter() - start, done

    makespan, done = asyncio.run(all_at_once())
    return makespan, [d for d, _ in done], [t for _, t in done]


def run_front(engine, sequences_for) -> tuple[float, list[float], list[list[int]]]:
    """Rows submitted at once to a `VllmEngine`; `sequences_for(sink)` builds them. (makespan, latencies, tokens)."""
    finished: dict[int, tuple[float, list[int]]] = {}
    errors = []
    start = time.perf_counter()

    def sink(index):
        def take(update):
            if update.finish_reason == "error":
                errors.append(update.error)
            if update.finished:
                finished[index] = (time.perf_counter() - start, update.tokens)
        return take

    sequences = sequences_for(sink)
    engine.submit(sequences)
    while len(finished) < len(sequences):
        time.sleep(0.005)
    makespan = time.perf_counter() - start
    if errors:
        raise SystemExit(f"the front failed: {errors[0]}")
    return makespan, [finished[i][0] for i in range(len(sequences))], [finished[i][1] for i in range(len(sequences))]
