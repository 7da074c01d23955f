"""Streamed /v1/completions over HTTP, one client for every server a benchmark talks to (`vllm serve
--enable-prompt-embeds`, or our own server), and the vLLM process (from .venv-vllm) that serve_speed.py and the
serving half of scaling start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from benchmarks.common.serving import Round

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- the client
@dataclass
class Stream:
    """One streamed answer; times in seconds from when its round's requests were sent."""

    first: float | None = None
    """The first event that carries output (token ids, text or a finish); None if none came."""
    done: float = 0.0
    tokens: list[int] = field(default_factory=list)
    """Token ids (vLLM's `return_token_ids`)."""
    text: str = ""


def read_event(stream: Stream, line: str, elapsed: float) -> None:
    """One server-sent line of a completion stream into `stream`."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    choice = json.loads(line[6:])["choices"][0]
    ids, text = choice.get("token_ids") or [], choice.get("text") or ""
    if stream.first is None and (ids or text or choice.get("finish_reason")):
        stream.first = elapsed
    stream.tokens += ids
    stream.text += text


def stream_completions(url: str, bodies: list[dict]) -> tuple[float, list[Stream]]:
    """Every body posted at once to `url`/v1/completions, streamed, each on its own connection: the makespan and
    each answer."""
    import httpx2

    async def one(client, body: dict, start: float) -> Stream:
        stream = Stream()
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                raise SystemExit(f"{url} answered {response.status_code}: {(await response.aread())[:500]!r}")
            async for line in response.aiter_lines():
                read_event(stream, line, time.perf_counter() - start)
        stream.done = time.perf_counter() - start
        return stream

    async def all_at_once() -> tuple[float, list[Stream]]:
        limits = httpx2.Limits(max_connections=len(bodies))
        async with httpx2.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            streams = await asyncio.gather(*(one(client, body, start) for body in bodies))
            return time.perf_counter() - start, list(streams)

    return asyncio.run(all_at_once())


def post_round(url: str, bodies: list[dict]) -> Round:
    """`stream_completions` as a round, to set beside our engine's: each request's first and last token and its
    token ids."""
    seconds, streams = stream_completions(url, bodies)
    if any(s.first is None for s in streams):
        raise SystemExit(f"{url} returned a request without tokens")
    return Round(seconds, [s.first for s in streams], [s.done for s in streams], [s.tokens for s in streams])


def embeds_body(front, soft: torch.Tensor, ids: list[int], **sampling) -> dict:
    """A request to vLLM for `[P; E]`: the soft prompt `soft` (n, hidden) then the embeddings of `ids`, as base64
    `prompt_embeds` (what our front sends), with the generated token ids in the stream."""
    from softprompt.serve.vllm_embeds import encode

    return {"model": "base", "prompt_embeds": encode(front.prompt_embeds(soft, ids)), "return_token_ids": True,
            **sampling}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the server
@dataclass
class VllmServer:
    url: str
    version: str


def free_port() -> int:
    """A loopback port nothing listens on now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model_dir: Path, port: int, log: Path) -> Iterator[VllmServer]:
    """A healthy `vllm serve` process of `model_dir` (float32, eager, CPU, served as "base"), killed on exit."""
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        raise SystemExit(f"no vLLM environment at {ROOT / '.venv-vllm'}: run `bash scripts/setup_vllm.sh`, or pass "
                         "--no-vllm")  # fmt: skip
    # a fixed context and KV space (scripts/vllm_serve.sh), so vLLM starts whatever the machine's memory
    command = ["bash", str(ROOT / "scripts" / "vllm_serve.sh"), str(model_dir), "--served-model-name", "base",
               "--port", str(port)]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, log)
        with urllib.request.urlopen(f"{url}/version", timeout=10) as response:
            yield VllmServer(url, json.loads(response.read())["version"])
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: vLLM's workers go with it
        except ProcessLookupError:  # it had already died (and said why in `log`)
            pass
        process.wait(timeout=30)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
