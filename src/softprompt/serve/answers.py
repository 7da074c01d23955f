"""Jobs run on the engine and answered: labels for a classification prompt, else generated text; whole, or streamed
as server-sent events.

The engine calls each request's sink on its own thread; the sinks here post into an asyncio queue (or settle a
future) through the event loop with `call_soon_threadsafe`. A client that leaves stops its rows: a whole answer
watches for the disconnect, a stream is closed by Starlette and its cleanup cancels the rows.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..scoring.generate import decode_new
from . import prometheus, protocol
from .engines.base import Engine, QueueFull, ScoreRequest, Sequence, Stopped, Update
from .jobs import Job
from .protocol import ApiError

CLIENT_GONE = 499
"""The status logged for a request whose client left before the answer (nginx's convention)."""


class TextStream:
    """Text deltas of a choice's growing tokens. Holds back what may still change: an unfinished character, and
    while stop strings are set, whole tokens near the end (a stop string found later drops the token it starts in)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.sent = tokenizer, ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def delta(self, tokens: list[int], finished: bool) -> str:
        text = decode_new(self.tokenizer, tokens)
        if not finished:
            kept, limit = len(tokens), len(text) - self.hold
            while self.hold and kept and len(text) > limit:
                kept -= 1
                text = decode_new(self.tokenizer, tokens[:kept])
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""  # decoding revised text already sent: nothing more can be sent safely
        new, self.sent = text[len(self.sent) :], text
        return new


class EventStream(StreamingResponse):
    """Server-sent events from `events`. When the response ends, also with the client gone midway (Starlette may
    leave the generator suspended, to be finalized whenever it is collected), the generator is closed, so its cleanup
    runs before the request is counted; a stream cut before its end counts as a client gone (499)."""

    def __init__(self, request: Request, events):
        self.request, self.events, self.ended = request, events, False
        super().__init__(self._to_the_end(), media_type="text/event-stream")

    async def _to_the_end(self):
        async for chunk in self.events:
            yield chunk
        self.ended = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
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


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, update: Update) -> None:
    """A generated row's sink: called on the engine's thread, so the update goes into `queue` through the loop."""
    loop.call_soon_threadsafe(queue.put_nowait, (index, update))


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
    """Runs jobs on the engine and answers them; counts the accepted requests."""

    def __init__(self, engine: Engine, tokenizer, counters: prometheus.Counters):
        self.engine, self.tokenizer, self.counters = engine, tokenizer, counters

    async def respond(self, job: Job, chat: bool, request: Request):
        """Run `job` and answer it: labels for a classification prompt, else generated text; whole or streamed."""
        reply = Reply(chat, job.prompt.name)
        if job.prompt.is_classification:
            return await self.answer_labels(job, reply, request)
        rows, queue = await self.run_generation(job)
        if job.stream:
            return EventStream(request, self.generation_events(job, reply, rows, queue))
        return await self.collect(job, reply, rows, queue, request)

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

    async def run_generation(self, job: Job):
        """Submit every choice; return the rows and the queue their (choice index, Update) arrive on. The engine's
        worker thread posts each update into the queue through the loop."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rows = []
        for i, ids in enumerate(job.inputs):
            for j in range(job.n):
                seed = None if job.sampling.seed is None else job.sampling.seed + j
                sink = partial(_post, loop, queue, i * job.n + j)
                rows.append(Sequence(ids, job.prompt.prompt_input, replace(job.sampling, seed=seed), sink, job.stream))
        self.hand_over(self.engine.submit, rows, job)
        return rows, queue

    async def run_scoring(self, job: Job) -> list[tuple[str, dict]]:
        """Classification: the chosen label word of each input and every label's log-probability."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in job.inputs]
        requests = [ScoreRequest(ids, job.prompt.label_ids, job.prompt.prompt_input, partial(_resolve, loop, f))
                    for ids, f in zip(job.inputs, futures)]  # fmt: skip
        self.hand_over(self.engine.submit_scoring, requests, job)
        try:
            results = await asyncio.gather(*futures)
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

    async def answer_labels(self, job: Job, reply: Reply, request: Request):
        answers = await self.run_scoring(job)
        label_tokens = [len(self.tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label, _ in answers]
        usage = protocol.usage(sum(map(len, job.inputs)), sum(label_tokens) * job.n)
        choices = [reply.choice(i * job.n + j, label, "stop", label_scores=scores)
                   for i, (label, scores) in enumerate(answers) for j in range(job.n)]  # fmt: skip
        if not job.stream:
            return reply.json(choices, usage)
        return EventStream(request, reply.label_events(choices, usage, job.include_usage))

    async def collect(self, job: Job, reply: Reply, rows: list[Sequence], queue: asyncio.Queue, request: Request):
        """The whole answer once every choice has finished; a client that leaves first stops its rows (499)."""
        total = len(job.inputs) * job.n
        finals: dict[int, Update] = {}
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while len(finals) < total:
                got = asyncio.ensure_future(queue.get())
                await asyncio.wait([got, gone], return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    return Response(status_code=CLIENT_GONE)  # nobody reads it; its rows leave below
                index, update = got.result()
                if update.finished:
                    finals[index] = update
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

    async def generation_events(self, job: Job, reply: Reply, rows: list[Sequence], queue: asyncio.Queue):
        """The answer as server-sent events, text deltas as they come; closing it (the client gone) stops the rows."""
        total = len(job.inputs) * job.n
        texts = [TextStream(self.tokenizer, job.sampling.stop) for _ in range(total)]
        done, generated = 0, 0
        try:
            if reply.chat:
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(total)]  # fmt: skip
                yield reply.event(first)
            while done < total:
                index, update = await queue.get()
                if update.finish_reason == "error":
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
