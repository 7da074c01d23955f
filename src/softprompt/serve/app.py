"""The HTTP side: an OpenAI-compatible FastAPI app in front of the engine.

Handlers check a request against the limits, tokenize, hand rows to the engine and await their updates on an
asyncio queue (the engine's worker thread posts into it with `call_soon_threadsafe`); streaming answers are
server-sent events. Every user mistake is a 4xx with an OpenAI-style error body; unknown model ids are 404.
`GET /` (and `/ui`) is the playground, a static page (static/) that speaks to the API above like any client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from .. import artifact, inspection
from ..errors import SoftPromptError
from ..generate import decode_new
from . import metrics, protocol
from .engine import Engine, QueueFull, Sampling, ScoreRequest, Sequence, Stopped, Update
from .registry import Prompt, Registry

ROUTES = ("/", "/ui", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/admin/reload")  # fmt: skip
STATIC = Path(__file__).parent / "static"
"""The playground's files: index.html, served at / and /ui, and what it loads from /static/."""
PAGE_SECURITY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
"""The page's Content-Security-Policy: its own files and this server's API, nothing else."""
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


def _route(path: str) -> str:
    """The path as a metrics label: a known route, or "other" (so random paths cannot grow the counters)."""
    if path.startswith("/v1/prompts/"):
        return "/v1/prompts/{name}"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ROUTES else "other"


def _open(path: str) -> bool:
    """Paths served without the API key: the health check and the playground's own files (which hold no data; the
    page asks for the key and sends it with every API call)."""
    return path in ("/health", "/", "/ui") or path.startswith("/static/")


def _vocabulary(backbone):
    """What `inspection.describe` reads the vocabulary from: our backbone, or in front of vLLM (which holds the
    model) the input-embedding table that the front loaded."""
    if hasattr(backbone, "model"):
        return backbone
    table = SimpleNamespace(weight=backbone.table)
    return SimpleNamespace(tokenizer=backbone.tokenizer, model=SimpleNamespace(get_input_embeddings=lambda: table))


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
        return _sse(self.build(self.id, self.model, choices, usage, True))

    async def label_events(self, choices: list[dict], usage: dict, include_usage: bool):
        """A classification answer as a stream: each finished choice in one chunk."""
        for c in choices:
            text = c["message"]["content"] if self.chat else c["text"]
            yield self.event([self.choice(c["index"], text, "stop", delta=True)])
        if include_usage:
            yield self.event([], usage)
        yield _sse("[DONE]")


# ---- errors: every one an OpenAI-style body ----


async def api_error(_, error: ApiError):
    return JSONResponse(error.body, status_code=error.status)


async def invalid_body(_, error: RequestValidationError):
    """A body that does not parse: 400 (not FastAPI's 422), naming the first ten problems."""
    where = lambda e: ".".join(str(p) for p in e["loc"] if p != "body") or "body"  # noqa: E731
    problems = [f"{where(e)}: {e['msg']}" for e in error.errors()]
    return JSONResponse(protocol.error_body("Invalid request: " + "; ".join(problems[:10])), status_code=400)


async def http_error(_, error: HTTPException):
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(protocol.error_body(str(error.detail), kind), status_code=error.status_code)


async def server_error(_, error: Exception):
    message = f"internal error: {type(error).__name__}: {error}"
    return JSONResponse(protocol.error_body(message, "server_error"), status_code=500)


class Api:
    """The app's handlers and what they share: the registry, the engine, the limits, the API key and the request
    counters."""

    def __init__(self, registry: Registry, engine: Engine, limits: Limits, api_key: str | None):
        self.registry, self.engine, self.limits, self.api_key = registry, engine, limits, api_key
        self.tokenizer = registry.backbone.tokenizer
        self.vocab = min(len(self.tokenizer), registry.backbone.shapes.vocab_size)  # ids a client may send
        self.counters = metrics.Counters()
        self.details: dict[str, tuple[tuple, dict]] = {}
        """Prompt id -> (its files' signature, its description), computed on its first request."""
        auth = "required" if api_key else "none"
        self.page_html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{auth}}", auth)

    # ---- auth and counting (the middleware) ----

    async def auth_and_count(self, request: Request, call_next):
        """Refuse a wrong or missing key (all but /health and the page's files) and count every request by route and
        status."""
        path = request.url.path
        if self.api_key and not _open(path):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                response = JSONResponse(protocol.error_body(
                    "Invalid or missing API key: send the header 'Authorization: Bearer <key>' with the server's "
                    "--api-key.", "authentication_error", code="invalid_api_key"), status_code=401)  # fmt: skip
                self.counters.requests[(_route(path), 401)] += 1
                return response
        response = await call_next(request)
        response.body_iterator = self.counted(response.body_iterator, request, response.status_code, path)
        return response

    async def counted(self, body, request: Request, status: int, path: str):
        """`body`, the request counted once it is sent: a stream whose client left midway set its status to 499."""
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.counters.requests[(_route(path), getattr(request.state, "status", status))] += 1

    # ---- resolving a request ----

    def lookup(self, model: str) -> Prompt:
        prompt = self.registry.get(model)
        if prompt is None:
            known = ", ".join(sorted(self.registry.prompts)[:20])
            raise ApiError(404, f"The model {model!r} does not exist. Loaded: {known}.", "not_found_error", "model",
                           "model_not_found")  # fmt: skip
        return prompt

    def job_for(self, body: protocol.Common, prompt: Prompt, inputs: list[list[int]], max_tokens: int | None) -> Job:
        """Check the request against the limits, collecting every problem into one message."""
        limits, vocab = self.limits, self.vocab
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

    def fill(self, prompt: Prompt, text: str) -> str:
        """The text put into the prompt's template, as in training; a template of several fields cannot take one
        text (every field would get it), so the client formats it."""
        if prompt.task is not None and len(set(prompt.task.fields)) > 1:
            raise ApiError(400, f"{prompt.name!r} was trained on the template {prompt.task.template!r}, which has "
                           f"{len(set(prompt.task.fields))} fields: one text cannot fill them. Fill the template "
                           "yourself and send it to /v1/completions with \"raw\": true.")  # fmt: skip
        return prompt.format(text)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    # ---- running a job ----

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
                rows.append(Sequence(ids, job.prompt.prefix, replace(job.sampling, seed=seed), sink, job.stream))
        self.hand_over(self.engine.submit, rows, job)
        return rows, queue

    async def run_scoring(self, job: Job) -> list[tuple[str, dict]]:
        """Classification: the chosen label word of each input and every label's log-probability."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in job.inputs]
        requests = [ScoreRequest(ids, job.prompt.label_ids, job.prompt.prefix, partial(_resolve, loop, f))
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

    async def respond(self, job: Job, chat: bool, request: Request):
        """Run `job` and answer it: labels for a classification prompt, else generated text; whole or streamed."""
        reply = Reply(chat, job.prompt.name)
        if job.prompt.is_classification:
            return await self.answer_labels(job, reply, request)
        rows, queue = await self.run_generation(job)
        if job.stream:
            return EventStream(request, self.generation_events(job, reply, rows, queue))
        return await self.collect(job, reply, rows, queue, request)

    async def answer_labels(self, job: Job, reply: Reply, request: Request):
        answers = await self.run_scoring(job)
        label_tokens = [len(self.tokenize(" " + label, special=False)) for label, _ in answers]
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
                    yield _sse(protocol.error_body(update.error or "generation failed", "server_error"))
                    return
                delta = texts[index].delta(update.tokens, update.finished)
                if update.finished:
                    done, generated = done + 1, generated + len(update.tokens)
                if delta or update.finished:
                    finish = update.finish_reason if update.finished else None
                    yield reply.event([reply.choice(index, delta, finish, delta=True)])
            if job.include_usage:
                yield reply.event([], protocol.usage(sum(map(len, job.inputs)), generated))
            yield _sse("[DONE]")
        finally:
            for row in rows:
                row.cancelled = True

    # ---- routes ----

    async def health(self):
        """The server's state and its engine's; 503 while the engine's backend (vLLM) cannot be reached."""
        engine = self.engine
        backend = await engine.health()
        body = {"status": backend["status"], "prompts": len(self.registry), "running": engine.running,
                "waiting": engine.queue_depth, "backend": backend}  # fmt: skip
        return JSONResponse(body, status_code=200 if backend["status"] == "ok" else 503)

    async def metrics_endpoint(self):
        text = metrics.render(self.counters, self.engine, len(self.registry))
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    async def models(self):
        base = self.registry.base.name
        data = []
        for p in self.registry.prompts.values():
            entry = {"id": p.name, "object": "model", "created": p.created, "owned_by": "softprompt",
                     "root": base, "parent": None if p.prefix is None else base}  # fmt: skip
            if p.task is not None:
                entry.update(method=p.method, num_virtual_tokens=p.num_tokens, task=p.task.task,
                             template=p.task.template, labels=p.task.labels or None)  # fmt: skip
            data.append(entry)
        return {"object": "list", "data": data}

    async def completions(self, body: protocol.CompletionRequest, request: Request):
        prompt = self.lookup(body.model)
        raw = body.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]  # one prompt: a text or a list of token ids
        inputs = [list(p) if isinstance(p, list) else self.tokenize(p if body.raw else self.fill(prompt, p))
                  for p in raw]  # fmt: skip
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await self.respond(self.job_for(body, prompt, inputs, max_tokens), False, request)

    async def chat_completions(self, body: protocol.ChatRequest, request: Request):
        prompt = self.lookup(body.model)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message", param="messages")
        if prompt.is_classification:
            # A classification prompt reads its template filled with the last user message, as in training.
            users = [m.text() for m in body.messages if m.role == "user"]
            if not users:
                raise ApiError(400, f"{prompt.name!r} classifies a user message; send one", param="messages")
            inputs = [self.tokenize(self.fill(prompt, users[-1]))]
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, f"the base model of {prompt.name!r} has no chat template; use /v1/completions")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as error:  # the template's own checks (roles, order) raise template errors
                raise ApiError(400, f"the chat template refused the messages: {error}", param="messages") from None
            inputs = [self.tokenize(text, special=False)]  # the template writes the special tokens itself
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is None:  # chat's default: as much as the context and the limit allow
            room = (self.limits.context or 1 << 30) - prompt.num_tokens - len(inputs[0])
            asked = max(1, min(self.limits.max_tokens, room))
        return await self.respond(self.job_for(body, prompt, inputs, asked), True, request)

    async def reload(self):
        """Reload the prompt artifacts on the engine's thread, between batches."""
        report = await asyncio.wrap_future(self.engine.call(self.registry.reload))
        return {"prompts": sorted(p for p in self.registry.prompts if p != self.registry.base.name), **report}

    def prompt_details(self, name: str):
        """What `softprompt inspect` reports of a served prompt: its metadata, training summary, size on disk and, for
        prompt tuning, each virtual token's nearest vocabulary tokens. Read-only; read from its files while they are
        the version loaded (409 once they changed, until a reload), once per version (a plain `def`: FastAPI runs it
        in a worker thread, off the event loop)."""
        prompt = self.lookup(name)
        if prompt.folder is None:
            raise ApiError(404, f"{name!r} is the bare base model: it has no prompt artifact to describe.",
                           "not_found_error", "name", "model_not_found")  # fmt: skip
        changed = (f"the files of {name!r} in {prompt.folder} changed on disk since it was loaded, and what is served "
                   "is the version loaded: POST /admin/reload to serve (and describe) the files as they are now")
        if not self.registry.unchanged(prompt):
            raise ApiError(409, changed, param="name")
        cached = self.details.get(name)
        if cached is None or cached[0] != prompt.signature:
            try:
                report = inspection.describe(artifact.load(prompt.folder), prompt.folder,
                                             _vocabulary(self.registry.backbone))  # fmt: skip
            except (SoftPromptError, OSError):  # rewritten or removed between the check and the read
                raise ApiError(409, changed, param="name") from None
            cached = self.details[name] = (prompt.signature, {"id": name, "object": "prompt", **report})
        return cached[1]

    async def page(self):
        """The playground: the prompts and their details, one text sent to several of them and the base model."""
        return HTMLResponse(self.page_html, headers={"Content-Security-Policy": PAGE_SECURITY,
                                                     "Cache-Control": "no-cache"})  # fmt: skip


def create_app(registry: Registry, engine: Engine, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: the error handlers, the auth-and-count middleware and the routes, all on one `Api`."""
    api = Api(registry, engine, limits or Limits(), api_key)
    app = FastAPI(title="softprompt", docs_url=None, redoc_url=None, openapi_url=None)
    app.exception_handler(ApiError)(api_error)
    app.exception_handler(RequestValidationError)(invalid_body)
    app.exception_handler(HTTPException)(http_error)
    app.exception_handler(Exception)(server_error)
    app.middleware("http")(api.auth_and_count)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_endpoint)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/admin/reload")(api.reload)
    app.get("/v1/prompts/{name}")(api.prompt_details)
    app.get("/")(api.page)
    app.get("/ui")(api.page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
