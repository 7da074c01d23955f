"""The engine contract (`base.Engine`) over a running `vllm serve --enable-prompt-embeds`: our server becomes its
front.

Each generated choice is one streamed completion whose `prompt_embeds` are `[P; E]` (`serve.vllm_embeds`; P is the
prompt's soft tokens, its `prompt_input`), or whose `prompt` is the token ids for the bare base model. Tokens come
back as ids (`return_token_ids`) and go through `generate.advance`, the rule our own engine follows, so EOS, stop
strings and max_tokens end a row the same way; a row that ends on our side (a stop string) closes its stream, which
makes vLLM drop the request. Classification
scores each label word exactly: per label token, the log-probability vLLM reports for that id (`logprob_token_ids`,
raw log-probabilities of the full vocabulary) after the input and the word's earlier tokens; label words that share
a beginning share a request.

Faults become errors with a status, never hangs: vLLM unreachable -> 503, no byte within `timeout` seconds -> 504, a
row past its deadline -> 504, a stream cut midway -> an error event; a line longer than `MAX_LINE` or an answer
longer than `MAX_ANSWER` is refused, not held. What the client reads names neither vLLM's address nor its
internals (the log does). Connections are opened per request, so service resumes by itself once vLLM is back.
Everything HTTP runs on this engine's own event loop thread; callbacks are called there.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import Future
from contextlib import aclosing, contextmanager
from typing import Callable

import httpx2
import torch
from transformers import GenerationConfig

from ...errors import SoftPromptError
from ...scoring.generate import advance, eos_ids
from ..vllm_embeds import InputEmbeddings, encode
from .base import (STOPPED, Engine, EngineConfig, QueueFull, ScoreRequest, Sequence, Stats, Stopped, Update, emit,
                   failure, log)  # fmt: skip

MAX_LINE = 1 << 20
"""Bytes in one line of vLLM's stream (one token's event is a few hundred): a longer one is a fault, not held."""
MAX_ANSWER = 8 << 20
"""Bytes of one whole (not streamed) answer of vLLM's."""


class BackendError(SoftPromptError):
    """vLLM did not answer as it should; `status` is what our client gets (503, 504, or 400 for vLLM's 4xx)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class VllmEngine(Engine):
    """Rows and scoring requests forwarded to vLLM at `url` (its OpenAI API root, e.g. http://127.0.0.1:8000)."""

    def __init__(self, front: InputEmbeddings, url: str, config: EngineConfig | None = None, timeout: float = 60.0,
                 api_key: str | None = None):  # fmt: skip
        self.front, self.url, self.timeout = front, url.rstrip("/"), timeout
        self.shown_url = httpx2.URL(self.url).copy_with(username=None, password=None)
        """The URL without any `user:pass@`, for /health (to holders of our key) and the log."""
        self.config = config or EngineConfig()
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        generation_config = _generation_config(front)
        self.eos = eos_ids(front.tokenizer, generation_config)
        self.stats = Stats()
        self._in_flight = 0  # rows and scoring requests sent to vLLM, which queues them itself
        self._count = threading.Lock()  # `_in_flight` changes on callers' threads and on the loop's
        self._model: str | None = None  # the id vLLM serves the base model under, asked once reachable
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: httpx2.AsyncClient | None = None

    # ---- the interface the app uses (any thread) ----

    @property
    def running(self) -> int:
        """Rows and scoring requests in flight."""
        return self._in_flight

    @property
    def queue_depth(self) -> int:
        """Always 0: vLLM holds the queue."""
        return 0

    @property
    def capacity(self) -> int:
        return self.config.max_batch + self.config.max_queue

    def start(self) -> "VllmEngine":
        self._thread = threading.Thread(target=self._loop.run_forever, name="softprompt-vllm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take no more work; rows in flight end with an error."""
        self._stopping = True
        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        self._admit(len(sequences))
        for seq in sequences:
            self._spawn(self._generate(seq), seq)

    def submit_scoring(self, requests: list[ScoreRequest]) -> None:
        self._admit(len(requests))
        for request in requests:
            self._spawn(self._score(request), request)

    def call(self, fn: Callable) -> Future:
        """Run `fn()` off the event loop (loading prompts reads files and builds tensors)."""
        if self._stopping:
            future: Future = Future()
            future.set_exception(Stopped(STOPPED))
            return future
        return asyncio.run_coroutine_threadsafe(asyncio.to_thread(fn), self._loop)

    async def health(self) -> dict:
        """vLLM's own /health, asked now (a few seconds at most), and whether this engine's loop still runs."""
        state = {"engine": "vllm", "url": str(self.shown_url)}
        if self._thread is None or not self._thread.is_alive():
            return {**state, "status": "unavailable", "detail": "the front's event loop is not running"}
        try:
            asked = asyncio.run_coroutine_threadsafe(self._request("GET", "/health", 3.0), self._loop)
            answer = await asyncio.wait_for(asyncio.wrap_future(asked), 5.0)
            return {**state, "status": "ok" if answer.status_code == 200 else "unavailable",
                    **({} if answer.status_code == 200 else {"detail": f"vLLM answered {answer.status_code}"})}
        except BackendError as error:
            return {**state, "status": "unavailable", "detail": str(error)}
        except asyncio.TimeoutError:
            return {**state, "status": "unavailable", "detail": "vLLM's /health did not answer within 5 s"}

    # ---- on the loop ----

    def _admit(self, count: int) -> None:
        if self._stopping:
            raise Stopped(STOPPED)
        limit = self.config.max_batch + self.config.max_queue
        with self._count:
            if self._in_flight + count > limit:
                raise QueueFull(f"the server is busy: {self._in_flight} requests are in flight (limit {limit}, this "
                                f"request adds {count}); retry later")  # fmt: skip
            self._in_flight += count

    def _spawn(self, work, target) -> None:
        async def run():
            task = asyncio.current_task()
            self._tasks.add(task)
            left = None if target.deadline is None else max(0.0, target.deadline - time.monotonic()) + 1.0
            # (a second past it: the caller, who waits until the deadline, answers first; this ends the work)
            try:
                await asyncio.wait_for(work, left)
            except asyncio.TimeoutError:
                _fail(target, "the request passed its deadline while vLLM worked on it", 504)
            except asyncio.CancelledError:
                _fail(target, STOPPED, 503)
            except BackendError as error:
                _fail(target, str(error), error.status)
            except Exception as error:  # a bug of ours (or nonsense from vLLM) must end the request, not hang it
                _fail(target, failure("generation", error), 500)
            finally:
                self._tasks.discard(task)
                with self._count:
                    self._in_flight -= 1

        asyncio.run_coroutine_threadsafe(run(), self._loop)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            timeout = httpx2.Timeout(self.timeout, connect=min(5.0, self.timeout))
            limits = httpx2.Limits(max_connections=self.config.max_batch + self.config.max_queue)
            self._client = httpx2.AsyncClient(base_url=self.url, timeout=timeout, limits=limits, headers=self.headers)
        return self._client

    @contextmanager
    def _transport_errors(self, timeout: float):
        """httpx2's failures as BackendError: 504 when vLLM sent nothing for `timeout` seconds, else 503 (the address
        goes to the log, not to the client)."""
        try:
            yield
        except httpx2.TimeoutException:
            raise self._fault(f"the vLLM backend sent nothing for {timeout} s", 504) from None
        except httpx2.ConnectError:
            raise self._fault("the vLLM backend is unreachable", 503) from None
        except httpx2.HTTPError as error:
            raise self._fault(f"the vLLM backend failed mid-answer ({type(error).__name__})", 503) from None

    def _fault(self, message: str, status: int) -> BackendError:
        log.warning("%s (%s)", message, self.shown_url)
        return BackendError(message, status)

    async def _request(self, method: str, path: str, timeout: float | None = None, **kwargs) -> httpx2.Response:
        """One whole (not streamed) request, its body read up to MAX_ANSWER bytes."""
        timeout = timeout or self.timeout
        with self._transport_errors(timeout):
            async with self._http().stream(method, path, timeout=timeout, **kwargs) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise self._fault(f"the vLLM backend sent an answer over {MAX_ANSWER} bytes", 503)
                return httpx2.Response(response.status_code, headers=response.headers, content=bytes(body))

    async def _model_id(self) -> str:
        if self._model is None:
            answer = await self._request("GET", "/v1/models")
            _check(answer.status_code, answer.text)
            self._model = answer.json()["data"][0]["id"]
        return self._model

    def _prompt(self, soft_tokens: torch.Tensor | None, ids: list[int]) -> dict:
        """The request's input: `[P; E]` as prompt_embeds, or the token ids for the bare base model."""
        if soft_tokens is None:
            return {"prompt": ids}
        return {"prompt_embeds": encode(self.front.prompt_embeds(soft_tokens, ids))}

    async def _generate(self, seq: Sequence) -> None:
        p = seq.sampling
        body = {"model": await self._model_id(), **self._prompt(seq.prompt_input, seq.prompt_ids), "stream": True,
                "return_token_ids": True, "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                "ignore_eos": p.ignore_eos, **({"seed": p.seed} if p.seed is not None else {})}  # fmt: skip
        self.stats.prefills += 1
        reason = None
        with self._transport_errors(self.timeout):
            async with self._http().stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    _check(response.status_code, (await _head(response)).decode(errors="replace"))
                async with aclosing(_lines(response)) as lines:
                    async for line in lines:
                        if seq.cancelled:
                            return  # the client left: closing the stream drops the request in vLLM
                        if line.startswith("data: ") and line != "data: [DONE]":
                            reason = self._take(seq, json.loads(line[6:])["choices"][0])
                        if reason:
                            break
        if reason is None:
            raise self._fault("the vLLM backend ended the stream without finishing the row", 503)
        emit(seq, Update(list(seq.tokens), True, reason))

    def _take(self, seq: Sequence, choice: dict) -> str | None:
        """One event's tokens through `generate.advance`; why the row ends, or None."""
        p = seq.sampling
        for token in choice.get("token_ids") or []:
            reason = advance(self.front.tokenizer, self.eos, seq.tokens, token, max_tokens=p.max_tokens, stop=p.stop,
                             ignore_eos=p.ignore_eos)  # fmt: skip
            self.stats.generated_tokens += not (token in self.eos and not p.ignore_eos)
            if reason:
                return reason
            if seq.stream:
                emit(seq, Update(list(seq.tokens)))
        return _reason(choice.get("finish_reason"))

    async def _score(self, request: ScoreRequest) -> None:
        """Each label word's summed log-probability: label words that share their first k tokens share the request
        that asks for their (k+1)-th token's log-probability after the input and those k tokens."""
        wanted: dict[tuple[int, ...], set[int]] = {}
        for word in request.label_ids:
            for k, token in enumerate(word):
                wanted.setdefault(tuple(word[:k]), set()).add(token)
        model = await self._model_id()
        logprobs = {}
        for head, tokens in wanted.items():
            if request.cancelled:
                return
            body = {"model": model, **self._prompt(request.prompt_input, request.input_ids + list(head)),
                    "max_tokens": 1, "temperature": 0, "logprobs": 1, "logprob_token_ids": sorted(tokens),
                    "return_tokens_as_token_ids": True}  # fmt: skip
            answer = await self._request("POST", "/v1/completions", json=body)
            _check(answer.status_code, answer.text)
            top = answer.json()["choices"][0]["logprobs"]["top_logprobs"][0]  # {"token_id:ID": logprob}
            for token in tokens:
                logprobs[head, token] = top[f"token_id:{token}"]
        scores = [sum(logprobs[tuple(word[:k]), t] for k, t in enumerate(word)) for word in request.label_ids]
        self.stats.scored += 1
        emit(request, torch.tensor(scores), None)


def _reason(finish_reason: str | None) -> str | None:
    """vLLM's finish reason as ours: it stopped on EOS ("stop") or at max_tokens ("length")."""
    return {"stop": "stop", "length": "length"}.get(finish_reason) if finish_reason else None


async def _lines(response: httpx2.Response):
    """The lines of a streamed answer, each at most MAX_LINE bytes (a longer one ends the row: 503)."""
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode(errors="replace")
        if len(pending) > MAX_LINE:
            raise BackendError(f"the vLLM backend sent a line over {MAX_LINE} bytes", 503)
    if pending:
        yield pending.decode(errors="replace")


async def _head(response: httpx2.Response, limit: int = 1 << 16) -> bytes:
    """The first `limit` bytes of an answer (an error's reason), the rest left unread."""
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return body[:limit]


def _check(status: int, text: str) -> None:
    """vLLM's non-200 answers as errors: its 4xx (a request it refuses) as 400 with its reason; a refused key
    (401/403) and anything else as 503, its text to the log only."""
    if status == 200:
        return
    if status in (401, 403):
        raise BackendError(f"the vLLM backend refused this server's key (answered {status}): check --vllm-api-key "
                           "against vLLM's --api-key", 503)  # fmt: skip
    if not 400 <= status < 500:
        log.warning("the vLLM backend answered %s: %s", status, text[:2000])
        raise BackendError(f"the vLLM backend answered {status}", 503)
    try:
        message = json.loads(text).get("error", {}).get("message") or text
    except (ValueError, AttributeError):
        message = text
    raise BackendError(f"the vLLM backend answered {status}: {str(message)[:300]}", 400)


def _fail(target, message: str, status: int) -> None:
    if isinstance(target, Sequence):
        emit(target, Update(list(target.tokens), True, "error", message, status))
    else:
        emit(target, None, message, status)


def _generation_config(front: InputEmbeddings) -> GenerationConfig | None:
    """The base model's generation_config (its EOS ids), where its folder has one."""
    try:
        return GenerationConfig.from_pretrained(front.path)
    except OSError:
        return None
