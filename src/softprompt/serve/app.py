"""The HTTP side: an OpenAI-compatible FastAPI app in front of the engine.

Handlers check a request against the limits, tokenize, hand rows to the engine and await their updates on an
asyncio queue (the engine's worker thread posts into it with `call_soon_threadsafe`); streaming answers are
server-sent events. Every user mistake is a 4xx with an OpenAI-style error body; unknown model ids are 404.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..generate import decode_new
from . import metrics, protocol
from .engine import Engine, QueueFull, Sampling, ScoreRequest, Sequence, Stopped, Update
from .registry import Prompt, Registry

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/admin/reload")
MAX_STOPS = 4
MAX_SEED = 2**63
"""Seeds (plus the choice index) must stay below this: a torch generator takes a signed 64-bit seed."""
CLIENT_GONE = 499
"""The status logged for a request whose client left before the answer (nginx's convention)."""


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    """Longest prompt in tokens (after the template)."""
    max_tokens: int = 512
    """Most new tokens one choice may ask for."""
    max_n: int = 16
    """Most choices per prompt."""
    context: int | None = None
    """The model's context (soft prompt + prompt + new tokens); None: unknown, unchecked."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, kind, param, code)


@dataclass
class Job:
    """A request resolved into rows: its prompt, token inputs and sampling (choice j of a seeded request uses
    seed + j)."""

    prompt: Prompt
    inputs: list[list[int]]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool


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


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def disconnected(request: Request) -> None:
    """Returns once the client has gone. The body is read by now, so a disconnect is the only message left to come
    (streaming answers need no such watch: Starlette cancels their generator itself)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(registry: Registry, engine: Engine, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    limits = limits or Limits()
    tokenizer = registry.backbone.tokenizer
    vocab = min(len(tokenizer), registry.backbone.shapes.vocab_size)  # ids a client may send
    counters = metrics.Counters()
    app = FastAPI(title="softprompt", docs_url=None, redoc_url=None, openapi_url=None)

    # ---- errors, auth, counting ----

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        where = lambda e: ".".join(str(p) for p in e["loc"] if p != "body") or "body"  # noqa: E731
        problems = [f"{where(e)}: {e['msg']}" for e in error.errors()]
        return JSONResponse(protocol.error_body("Invalid request: " + "; ".join(problems[:10])), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(protocol.error_body(str(error.detail), kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, error: Exception):
        message = f"internal error: {type(error).__name__}: {error}"
        return JSONResponse(protocol.error_body(message, "server_error"), status_code=500)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key and path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = JSONResponse(protocol.error_body(
                    "Invalid or missing API key: send the header 'Authorization: Bearer <key>' with the server's "
                    "--api-key.", "authentication_error", code="invalid_api_key"), status_code=401)  # fmt: skip
                counters.requests[(path if path in ROUTES else "other", 401)] += 1
                return response
        response = await call_next(request)
        body = response.body_iterator

        async def counted():  # counted once sent: a stream whose client left midway sets its status to 499
            try:
                async for chunk in body:
                    yield chunk
            finally:
                status = getattr(request.state, "status", response.status_code)
                counters.requests[(path if path in ROUTES else "other", status)] += 1

        response.body_iterator = counted()
        return response

    # ---- resolving a request ----

    def lookup(model: str) -> Prompt:
        prompt = registry.get(model)
        if prompt is None:
            known = ", ".join(sorted(registry.prompts)[:20])
            raise ApiError(404, f"The model {model!r} does not exist. Loaded: {known}.", "not_found_error", "model",
                           "model_not_found")  # fmt: skip
        return prompt

    def job_for(body: protocol.Common, prompt: Prompt, inputs: list[list[int]], max_tokens: int | None) -> Job:
        """Check the request against the limits, collecting every problem into one message."""
        problems = [f"{name} is not supported by this server" for name in body.unsupported()]
        n = 1 if body.n is None else body.n
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if not 1 <= n <= limits.max_n:
            problems.append(f"n must be between 1 and {limits.max_n}, got {n}")
        if not 1 <= max_tokens <= limits.max_tokens:
            problems.append(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if not 0 <= temperature <= 2:
            problems.append(f"temperature must be between 0 and 2, got {temperature}")
        if not 0 < top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {top_p}")
        if len(stop) > MAX_STOPS or not all(stop):
            problems.append(f"stop takes up to {MAX_STOPS} non-empty strings, got {stop}")
        if body.seed is not None and not 0 <= body.seed < MAX_SEED - limits.max_n:
            problems.append(f"seed must be between 0 and {MAX_SEED - limits.max_n - 1}, got {body.seed}")
        if not inputs:
            problems.append("the prompt is empty")
        completion = max((len(w) for w in prompt.label_ids), default=0) if prompt.is_classification else max_tokens
        for i, ids in enumerate(inputs):
            where = f"prompt {i}" if len(inputs) > 1 else "the prompt"
            bad = [t for t in ids if not 0 <= t < vocab]
            if not ids:
                problems.append(f"{where} is empty: it needs at least one token")
            elif bad:
                problems.append(f"{where} has token ids outside the vocabulary (0 to {vocab - 1}): {bad[:5]}")
            elif len(ids) > limits.max_prompt_tokens:
                problems.append(f"{where} has {len(ids)} tokens, more than this server's limit of "
                                f"{limits.max_prompt_tokens}; shorten it")  # fmt: skip
            elif limits.context and prompt.num_tokens + len(ids) + completion > limits.context:
                problems.append(
                    f"{where}: this model's maximum context length is {limits.context} tokens, but the request needs "
                    f"{prompt.num_tokens + len(ids) + completion} ({prompt.num_tokens} soft-prompt tokens, "
                    f"{len(ids)} prompt tokens, {completion} for the completion); shorten the prompt or max_tokens"
                )
        if problems:
            raise ApiError(400, "; ".join(problems))
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=body.seed,
                            ignore_eos=body.ignore_eos)  # fmt: skip
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return Job(prompt, inputs, sampling, n, bool(body.stream), include_usage)

    def fill(prompt: Prompt, text: str) -> str:
        """The text put into the prompt's template, as in training; a template of several fields cannot take one
        text (every field would get it), so the client formats it."""
        if prompt.task is not None and len(set(prompt.task.fields)) > 1:
            raise ApiError(400, f"{prompt.name!r} was trained on the template {prompt.task.template!r}, which has "
                           f"{len(set(prompt.task.fields))} fields: one text cannot fill them. Fill the template "
                           "yourself and send it to /v1/completions with \"raw\": true.")  # fmt: skip
        return prompt.format(text)

    def tokenize(text: str, special: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    # ---- running a job ----

    def hand_over(submit, items: list, job: Job) -> None:
        """Give work to the engine (a full queue answers 429, a stopping server 503) and count the request."""
        try:
            submit(items)
        except QueueFull as error:
            raise ApiError(429, str(error), "rate_limit_error", code="queue_full") from None
        except Stopped as error:
            raise ApiError(503, str(error), "server_error") from None
        counters.model_requests[job.prompt.name] += 1
        counters.prompt_tokens += sum(map(len, job.inputs))

    async def run_generation(job: Job):
        """Submit every choice; return the rows and the queue their (choice index, Update) arrive on."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rows = []
        for i, ids in enumerate(job.inputs):
            for j in range(job.n):
                seed = None if job.sampling.seed is None else job.sampling.seed + j
                post = lambda update, index=i * job.n + j: queue.put_nowait((index, update))  # noqa: E731
                sink = lambda update, post=post: loop.call_soon_threadsafe(post, update)  # noqa: E731
                rows.append(Sequence(ids, job.prompt.prefix, replace(job.sampling, seed=seed), sink, job.stream))
        hand_over(engine.submit, rows, job)
        return rows, queue

    async def run_scoring(job: Job) -> list[tuple[str, dict]]:
        """Classification: the chosen label word of each input and every label's log-probability."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in job.inputs]

        def sink(future):
            return lambda scores, error: loop.call_soon_threadsafe(
                lambda: future.done() or future.set_result((scores, error)))

        requests = [ScoreRequest(ids, job.prompt.label_ids, job.prompt.prefix, sink(f))
                    for ids, f in zip(job.inputs, futures)]  # fmt: skip
        hand_over(engine.submit_scoring, requests, job)
        try:
            results = await asyncio.gather(*futures)
        finally:
            for r in requests:
                r.cancelled = True  # harmless once scored; skips the work if the client left first
        labels = job.prompt.task.labels
        answers = []
        for scores, error in results:
            if error:
                raise ApiError(500, error, "server_error")
            answers.append((labels[int(scores.argmax())], dict(zip(labels, map(float, scores)))))
        return answers

    def choice(chat: bool, index: int, text: str, finish: str | None, delta: bool = False, **extra) -> dict:
        if not chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, **extra}
        if delta:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish}  # fmt: skip
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish, **extra}  # fmt: skip

    async def respond(job: Job, chat: bool, request: Request):
        build = protocol.chat_completion if chat else protocol.completion
        rid, name = protocol.new_id("chatcmpl" if chat else "cmpl"), job.prompt.name
        prompt_tokens = sum(map(len, job.inputs))
        total = len(job.inputs) * job.n

        if job.prompt.is_classification:
            answers = await run_scoring(job)
            label_tokens = [len(tokenize(" " + label, special=False)) for label, _ in answers]
            usage = protocol.usage(prompt_tokens, sum(label_tokens) * job.n)
            choices = [choice(chat, i * job.n + j, label, "stop", label_scores=scores)
                       for i, (label, scores) in enumerate(answers) for j in range(job.n)]  # fmt: skip
            if not job.stream:
                return JSONResponse(build(rid, name, choices, usage))

            async def labels_stream():
                for c in choices:
                    text = c["text"] if not chat else c["message"]["content"]
                    yield _sse(build(rid, name, [choice(chat, c["index"], text, "stop", delta=True)], None, True))
                if job.include_usage:
                    yield _sse(build(rid, name, [], usage, True))
                yield _sse("[DONE]")

            return EventStream(request, labels_stream())

        rows, queue = await run_generation(job)
        if not job.stream:
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
            failed = [u.error for u in finals.values() if u.finish_reason == "error"]
            if failed:
                raise ApiError(500, failed[0], "server_error")
            choices = [choice(chat, i, decode_new(tokenizer, finals[i].tokens), finals[i].finish_reason)
                       for i in range(total)]  # fmt: skip
            usage = protocol.usage(prompt_tokens, sum(len(u.tokens) for u in finals.values()))
            return JSONResponse(build(rid, name, choices, usage))

        async def events():
            texts = [TextStream(tokenizer, job.sampling.stop) for _ in range(total)]
            done, generated = 0, 0
            try:
                if chat:
                    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(total)]  # fmt: skip
                    yield _sse(build(rid, name, first, None, True))
                while done < total:
                    index, update = await queue.get()
                    if update.finish_reason == "error":
                        yield _sse(protocol.error_body(update.error or "generation failed", "server_error"))
                        return
                    delta = texts[index].delta(update.tokens, update.finished)
                    if update.finished:
                        done, generated = done + 1, generated + len(update.tokens)
                    if delta or update.finished:
                        finish = update.finish_reason if update.finished else None
                        yield _sse(build(rid, name, [choice(chat, index, delta, finish, delta=True)], None, True))
                if job.include_usage:
                    yield _sse(build(rid, name, [], protocol.usage(prompt_tokens, generated), True))
                yield _sse("[DONE]")
            finally:
                for row in rows:
                    row.cancelled = True

        return EventStream(request, events())

    # ---- routes ----

    @app.get("/health")
    async def health():
        return {"status": "ok", "prompts": len(registry), "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(counters, engine, len(registry)), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        base = registry.base.name
        data = []
        for p in registry.prompts.values():
            entry = {"id": p.name, "object": "model", "created": p.created, "owned_by": "softprompt",
                     "root": base, "parent": None if p.prefix is None else base}  # fmt: skip
            if p.task is not None:
                entry.update(method=p.method, num_virtual_tokens=p.num_tokens, task=p.task.task,
                             template=p.task.template, labels=p.task.labels or None)  # fmt: skip
            data.append(entry)
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        prompt = lookup(body.model)
        raw = body.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]  # one prompt: a text or a list of token ids
        inputs = [list(p) if isinstance(p, list) else tokenize(p if body.raw else fill(prompt, p)) for p in raw]
        return await respond(job_for(body, prompt, inputs, 16 if body.max_tokens is None else body.max_tokens), False,
                             request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request):
        prompt = lookup(body.model)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message", param="messages")
        if prompt.is_classification:
            # A classification prompt reads its template filled with the last user message, as in training.
            users = [m.text() for m in body.messages if m.role == "user"]
            if not users:
                raise ApiError(400, f"{prompt.name!r} classifies a user message; send one", param="messages")
            inputs = [tokenize(fill(prompt, users[-1]))]
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise ApiError(400, f"the base model of {prompt.name!r} has no chat template; use /v1/completions")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as error:  # the template's own checks (roles, order) raise template errors
                raise ApiError(400, f"the chat template refused the messages: {error}", param="messages") from None
            inputs = [tokenize(text, special=False)]  # the template writes the special tokens itself
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is None:  # chat's default: as much as the context and the limit allow
            room = (limits.context or 1 << 30) - prompt.num_tokens - len(inputs[0])
            asked = max(1, min(limits.max_tokens, room))
        return await respond(job_for(body, prompt, inputs, asked), True, request)

    @app.post("/admin/reload")
    async def reload():
        report = await asyncio.wrap_future(engine.call(registry.reload))
        return {"prompts": sorted(p for p in registry.prompts if p != registry.base.name), **report}

    return app
