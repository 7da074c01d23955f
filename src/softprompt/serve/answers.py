"""Jobs run on the engine and answered: labels for a classification prompt, else generated text; whole, or streamed
as server-sent events.

The engine calls each request's sink on its own thread; the sinks here keep each row's newest update in an `Inbox`
(or settle a future) and wake the event loop with `call_soon_threadsafe`. A client that leaves stops its rows: a
whole answer watches for the disconnect, a stream is closed by Starlette and its cleanup cancels the rows. Every wait
for the engine ends at the request's deadline: a whole answer is then a 504, a stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..scoring.generate import decode_new
from . import prometheus, protocol
from .engines.base import Engine, QueueFull, ScoreRequest, Sequence, Stopped, Update, log
from .guard import CLIENT_GONE

SEND_GRACE = 5.0
"""Seconds past a stream's deadline for the client to read its last events before its connection is dropped."""
from .jobs import Job
from .protocol import ApiError



class TextStream:
    """Text deltas of a choice's growing tokens. Holds back what may still change: an unfinished character, and
    while stop strings are set, whole tokens near the end (a stop string found later drops the token it starts in).
    The text's length after each token is decoded once, when the token arrives (a row's earlier tokens never change
    until it finishes), so what to hold back costs a few decodes per update, not one per held-back token."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.sent = tokenizer, ""
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ends = [0]
        """ends[k]: the length of the text of the row's first k tokens."""

    def delta(self, tokens: list[int], finished: bool) -> str:
        text = decode_new(self.tokenizer, tokens)
        if not finished:
            text = self.held_back(tokens, text).rstrip("\ufffd") if self.hold else text.rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""  # decoding revised text already sent: nothing more can be sent safely
        new, self.sent = text[len(self.sent) :], text
        return new

    def held_back(self, tokens: list[int], text: str) -> str:
        """The text of the longest run of leading tokens that ends `hold` characters before the end of `text`."""
        if len(tokens) + 1 < len(self.ends):
            self.ends = [0]  # not a longer row than before (never so while it runs): measure again
        while len(self.ends) <= len(tokens):
            k = len(self.ends)
            self.ends.append(len(text) if k == len(tokens) else len(decode_new(self.tokenizer, tokens[:k])))
        kept, limit = len(tokens), len(text) - self.hold
        while kept and self.ends[kept] > limit:
            kept -= 1
        return text if kept == len(tokens) else decode_new(self.tokenizer, tokens[:kept])


class EventStream(StreamingResponse):
    """Server-sent events from `events`. When the response ends, also with the client gone midway (Starlette may
    leave the generator suspended, to be finalized whenever it is collected), the generator is closed, so its cleanup
    runs before the request is counted; a stream cut before its end counts as a client gone (499). A client that
    does not read its stream by the `deadline` (and SEND_GRACE more seconds to send the deadline's error event) has
    its connection dropped: a slow reader cannot hold its rows and its connection forever."""

    def __init__(self, request: Request, events, deadline: float | None = None):
        self.request, self.events, self.ended, self.deadline = request, events, False, deadline
        super().__init__(self._to_the_end(), media_type="text/event-stream")

    async def _to_the_end(self):
        async for chunk in self.events:
            yield chunk
        self.ended = True

    async def __call__(self, scope, receive, send) -> None:
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic()) + SEND_GRACE
        try:
            await asyncio.wait_for(super().__call__(scope, receive, send), left)
        except asyncio.TimeoutError:
            log.warning("a client did not read its stream within the request's deadline: its connection is dropped")
        finally:
            await self.body_iterator.aclose()
            await self.events.aclose()
            if not self.ended:
                self.request.state.status = CLIENT_GONE


def sse(data) -> str:
    """One server-sent event: `data` as JSON, or a string (`[DONE]`) as it is."""
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def disconnected(request: Request) -> None:
    """Returns once the client has gone. The body is read by now, so a disconnect is the only message left to come
    (streaming answers need no such watch: Starlette cancels their generator itself)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Inbox:
    """The newest update of each row of a job, posted from the engine's thread. An update holds all its row's tokens
    so far, so a newer one replaces an unread older one: a slow reader costs one update per row, not one per token,
    and the event loop is woken once per batch of posts."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.ready, self.lock = loop, asyncio.Event(), threading.Lock()
        self.latest: dict[int, Update] = {}

    def post(self, index: int, update: Update) -> None:
        """A row's sink (`partial(post, index)`), called on the engine's thread."""
        with self.lock:
            wake = not self.latest
            self.latest[index] = update
        if wake:
            self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self) -> dict[int, Update]:
        """The rows updated since the last take, each with its newest update (waits for one)."""
        while True:
            await self.ready.wait()
            with self.lock:
                got, self.latest = self.latest, {}
                self.ready.clear()
            if got:
                return got


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, scores, error: str | None,
             status: int = 500) -> None:  # fmt: skip
    """A scoring request's sink: called on the engine's thread, so `future` is settled through the loop."""
    loop.call_soon_threadsafe(_settle, future, (scores, error, status))


def _settle(future: asyncio.Future, result) -> None:
    if not future.done():  # cancelled meanwhile (the client left)
        future.set_result(result)


class Reply:
    """The fixed parts of one answer: its shape (chat or completion), its id (one for every chunk of a stream) and
    the model name."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.build = protocol.chat_completion if chat else protocol.completion

    def choice(self, index: int, text: str, finish: str | None, delta: bool = False, **extra) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, **extra}
        if delta:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish}  # fmt: skip
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish, **extra}  # fmt: skip

    def json(self, choices: list[dict], usage: dict) -> JSONResponse:
        return JSONResponse(self.build(self.id, self.model, choices, usage))

    def event(self, choices: list[dict], usage: dict | None = None) -> str:
        """One streamed chunk as a server-sent event."""
        return sse(self.build(self.id, self.model, choices, usage, True))

    async def label_events(self, choices: list[dict], usage: dict, include_usage: bool):
        """A classification answer as a stream: each finished choice in one chunk."""
        for c in choices:
            text = c["message"]["content"] if self.chat else c["text"]
            yield self.event([self.choice(c["index"], text, "stop", delta=True)])
        if include_usage:
            yield self.event([], usage)
        yield sse("[DONE]")


class Answers:
    """Runs jobs on the engine and answers them; counts the accepted requests. `timeout`: the seconds a request may
    take (ServeConfig.request_timeout), said in the error of one that took longer."""

    def __init__(self, engine: Engine, tokenizer, counters: prometheus.Counters, timeout: float = 600.0):
        self.engine, self.tokenizer, self.counters, self.timeout = engine, tokenizer, counters, timeout

    async def respond(self, job: Job, chat: bool, request: Request, deadline: float):
        """Run `job` and answer it: labels for a classification prompt, else generated text; whole or streamed. No
        wait lasts past `deadline` (a `time.monotonic()` value)."""
        reply = Reply(chat, job.prompt.name)
        if job.prompt.is_classification:
            return await self.answer_labels(job, reply, request, deadline)
        rows, inbox = self.run_generation(job, deadline)
        if job.stream:
            return EventStream(request, self.generation_events(job, reply, rows, inbox, deadline), deadline)
        return await self.collect(job, reply, rows, inbox, request, deadline)

    def late(self) -> ApiError:
        """The answer to a request past its deadline."""
        return ApiError(504, f"the request did not finish within this server's limit of {self.timeout:g} s "
                        "(--request-timeout); ask for fewer tokens or choices, or retry later", "server_error",
                        code="timeout")  # fmt: skip

    # ---- handing work to the engine ----

    def hand_over(self, submit, items: list, job: Job) -> None:
        """Give work to the engine (a full queue answers 429, a stopping server 503) and count the request."""
        try:
            submit(items)
        except QueueFull as error:
            raise ApiError(429, str(error), "rate_limit_error", code="queue_full") from None
        except Stopped as error:
            raise ApiError(503, str(error), "server_error") from None
        self.counters.model_requests[job.prompt.name] += 1
        self.counters.prompt_tokens += sum(map(len, job.inputs))

    def run_generation(self, job: Job, deadline: float) -> tuple[list[Sequence], Inbox]:
        """Submit every choice; return the rows and the inbox their updates arrive in (keyed by choice index)."""
        inbox = Inbox(asyncio.get_running_loop())
        rows = []
        for i, ids in enumerate(job.inputs):
            for j in range(job.n):
                seed = None if job.sampling.seed is None else job.sampling.seed + j
                sink = partial(inbox.post, i * job.n + j)
                rows.append(Sequence(ids, job.prompt.prompt_input, replace(job.sampling, seed=seed), sink, job.stream))
                rows[-1].deadline = deadline
        self.hand_over(self.engine.submit, rows, job)
        return rows, inbox

    async def run_scoring(self, job: Job, deadline: float) -> list[tuple[str, dict]]:
        """Classification: the chosen label word of each input and every label's log-probability."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in job.inputs]
        requests = [ScoreRequest(ids, job.prompt.label_ids, job.prompt.prompt_input, partial(_resolve, loop, f))
                    for ids, f in zip(job.inputs, futures)]  # fmt: skip
        for r in requests:
            r.deadline = deadline
        self.hand_over(self.engine.submit_scoring, requests, job)
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self.late() from None
        finally:
            for r in requests:
                r.cancelled = True  # harmless once scored; skips the work if the client left first
        labels = job.prompt.task.labels
        answers = []
        for scores, error, status in results:
            if error:
                raise ApiError(status, error, "server_error")
            answers.append((labels[int(scores.argmax())], dict(zip(labels, map(float, scores)))))
        return answers

    # ---- answering ----

    async def answer_labels(self, job: Job, reply: Reply, request: Request, deadline: float):
        answers = await self.run_scoring(job, deadline)
        label_tokens = [len(self.tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label, _ in answers]
        usage = protocol.usage(sum(map(len, job.inputs)), sum(label_tokens) * job.n)
        choices = [reply.choice(i * job.n + j, label, "stop", label_scores=scores)
                   for i, (label, scores) in enumerate(answers) for j in range(job.n)]  # fmt: skip
        if not job.stream:
            return reply.json(choices, usage)
        return EventStream(request, reply.label_events(choices, usage, job.include_usage), deadline)

    async def collect(self, job: Job, reply: Reply, rows: list[Sequence], inbox: Inbox, request: Request,
                      deadline: float):  # fmt: skip
        """The whole answer once every choice has finished; a client that leaves first stops its rows (499), one
        still waiting at the deadline gets a 504."""
        total = len(job.inputs) * job.n
        finals: dict[int, Update] = {}
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while len(finals) < total:
                got = asyncio.ensure_future(inbox.take())
                await asyncio.wait([got, gone], timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not got.done():
                    got.cancel()
                    if gone.done():
                        return Response(status_code=CLIENT_GONE)  # nobody reads it; its rows leave below
                    raise self.late()
                finals.update((i, u) for i, u in got.result().items() if u.finished)
        finally:
            gone.cancel()
            for row in rows:
                row.cancelled = True  # no-op for finished rows; frees the batch if the client went away
        failed = [u for u in finals.values() if u.finish_reason == "error"]
        if failed:
            raise ApiError(failed[0].status, failed[0].error, "server_error")
        choices = [reply.choice(i, decode_new(self.tokenizer, finals[i].tokens), finals[i].finish_reason)
                   for i in range(total)]  # fmt: skip
        usage = protocol.usage(sum(map(len, job.inputs)), sum(len(u.tokens) for u in finals.values()))
        return reply.json(choices, usage)

    async def generation_events(self, job: Job, reply: Reply, rows: list[Sequence], inbox: Inbox, deadline: float):
        """The answer as server-sent events, text deltas as they come; closing it (the client gone) stops the rows.
        An error, or the deadline, ends the stream with an error event (and no [DONE])."""
        total = len(job.inputs) * job.n
        texts = [TextStream(self.tokenizer, job.sampling.stop) for _ in range(total)]
        done, generated = 0, 0
        try:
            if reply.chat:
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(total)]  # fmt: skip
                yield reply.event(first)
            while done < total:
                try:
                    got = await asyncio.wait_for(inbox.take(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield sse(self.late().body)
                    return
                for index, update in sorted(got.items()):
                    if update.finish_reason == "error":  # it may have replaced unread tokens: they go first
                        delta = texts[index].delta(update.tokens, False)
                        if delta:
                            yield reply.event([reply.choice(index, delta, None, delta=True)])
                        yield sse(protocol.error_body(update.error or "generation failed", "server_error"))
                        return
                    delta = texts[index].delta(update.tokens, update.finished)
                    if update.finished:
                        done, generated = done + 1, generated + len(update.tokens)
                    if delta or update.finished:
                        finish = update.finish_reason if update.finished else None
                        yield reply.event([reply.choice(index, delta, finish, delta=True)])
            if job.include_usage:
                yield reply.event([], protocol.usage(sum(map(len, job.inputs)), generated))
            yield sse("[DONE]")
        finally:
            for row in rows:
                row.cancelled = True
