"""The HTTP side's router: an OpenAI-compatible FastAPI app in front of an engine.

Each route is one `Api` method; what they share lives beside: `guard` checks every request before its route (Host,
API key, cross-site writes, body size) and counts it, `jobs` turns a request body into a checked job (in a worker
thread: tokenizing never runs on the event loop), `answers` runs it on the engine and answers (whole or as
server-sent events). Every mistake is a 4xx, every failure a 5xx, all with an OpenAI-style error body that names no
exception text nor folder of the server's (the log has them); unknown model ids are 404. `GET /` (and `/ui`) is the
playground, a static page (static/) that speaks to the API above like any client.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from .. import artifact
from ..artifact import inspection
from ..errors import SoftPromptError
from . import prometheus, protocol
from .answers import Answers
from .engines.base import Engine
from .guard import Guard, Rules
from .jobs import Intake, Limits
from .protocol import ApiError
from .registry import Registry

ROUTES = ("/", "/ui", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/admin/reload")  # fmt: skip
STATIC = Path(__file__).parent / "static"
"""The playground's files: index.html, served at / and /ui, and what it loads from /static/."""
PAGE_SECURITY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
"""The page's Content-Security-Policy: its own files and this server's API, nothing else."""


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
    """A bug of ours: 500 without the exception's text (Starlette re-raises it after this answer, so the server logs
    it with its traceback). Outside the guard, so the header it adds to every answer is added here."""
    body = protocol.error_body("internal error: the server's log has the details", "server_error")
    return JSONResponse(body, status_code=500, headers={"X-Content-Type-Options": "nosniff"})


class Api:
    """The app's handlers and what they share: the registry, the engine, the request intake and answers, the API key
    and the request counters."""

    def __init__(self, registry: Registry, engine: Engine, limits: Limits, api_key: str | None):
        self.registry, self.engine, self.api_key = registry, engine, api_key
        self.limits = replace(limits, max_rows=min(limits.max_rows, engine.capacity))  # a larger one never fits
        self.counters = prometheus.Counters()
        self.intake = Intake(registry, registry.model, self.limits)
        self.answers = Answers(engine, registry.model.tokenizer, self.counters, limits.request_timeout)
        self.details: dict[str, tuple[tuple, dict]] = {}
        """Prompt id -> (its files' signature, its description), computed on its first request."""
        auth = "required" if api_key else "none"
        self.page_html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{auth}}", auth)

    def deadline(self) -> float:
        """The `time.monotonic()` by which a request that starts now must be answered."""
        return time.monotonic() + self.limits.request_timeout

    # ---- routes ----

    async def health(self, request: Request):
        """The server's state and its engine's (503 while it cannot serve: its worker gone, vLLM unreachable); what
        the engine says of its backend's address and of what went wrong only to a request with the API key."""
        engine = self.engine
        try:
            backend = await asyncio.wait_for(engine.health(), 10)
        except asyncio.TimeoutError:
            backend = {"status": "unavailable", "detail": "the engine did not say how it is within 10 s"}
        if not getattr(request.state, "key_given", False):
            backend = {k: v for k, v in backend.items() if k not in ("url", "detail")}
        body = {"status": backend["status"], "prompts": len(self.registry), "running": engine.running,
                "waiting": engine.queue_depth, "backend": backend}  # fmt: skip
        return JSONResponse(body, status_code=200 if backend["status"] == "ok" else 503)

    async def metrics(self):
        text = prometheus.render(self.counters, self.engine, len(self.registry))
        return PlainTextResponse(text, media_type=prometheus.CONTENT_TYPE)

    async def models(self):
        base = self.registry.base.name
        data = []
        for p in self.registry.prompts.values():
            entry = {"id": p.name, "object": "model", "created": p.created, "owned_by": "softprompt",
                     "root": base, "parent": None if p.prompt_input is None else base}  # fmt: skip
            if p.task is not None:
                entry.update(method=p.method, num_virtual_tokens=p.num_tokens, task=p.task.task,
                             template=p.task.template, labels=p.task.labels or None)  # fmt: skip
            data.append(entry)
        return {"object": "list", "data": data}

    async def completions(self, body: protocol.CompletionRequest, request: Request):
        deadline = self.deadline()
        job = await run_in_threadpool(self.intake.completion, body)
        return await self.answers.respond(job, False, request, deadline)

    async def chat_completions(self, body: protocol.ChatRequest, request: Request):
        deadline = self.deadline()
        job = await run_in_threadpool(self.intake.chat, body)
        return await self.answers.respond(job, True, request, deadline)

    async def reload(self):
        """Reload the prompt artifacts where the engine says (our engine: its thread, between batches), one reload at
        a time (`Registry.reload` holds a lock)."""
        try:
            report = await asyncio.wait_for(asyncio.wrap_future(self.engine.call(self.registry.reload)),
                                            self.limits.request_timeout)  # fmt: skip
        except asyncio.TimeoutError:
            raise self.answers.late() from None
        return {"prompts": sorted(p for p in self.registry.prompts if p != self.registry.base.name), **report}

    def prompt_details(self, name: str):
        """What `softprompt inspect` reports of a served prompt: its metadata, training summary, size on disk and, for
        prompt tuning, each virtual token's nearest vocabulary tokens. Read-only; read from its files while they are
        the version loaded (409 once they changed, until a reload), once per version (a plain `def`: FastAPI runs it
        in a worker thread, off the event loop)."""
        prompt = self.intake.lookup(name)
        if prompt.folder is None:
            raise ApiError(404, f"{name!r} is the bare base model: it has no prompt artifact to describe.",
                           "not_found_error", "name", "model_not_found")  # fmt: skip
        changed = (f"the files of {name!r} changed on disk since it was loaded, and what is served is the version "
                   "loaded: POST /admin/reload to serve (and describe) the files as they are now")
        if not self.registry.unchanged(prompt):
            raise ApiError(409, changed, param="name")
        cached = self.details.get(name)
        if cached is None or cached[0] != prompt.signature:
            try:
                report = inspection.describe(artifact.load(prompt.folder), prompt.folder,
                                             vocabulary=self.registry.model.vocabulary())  # fmt: skip
            except (SoftPromptError, OSError):  # rewritten or removed between the check and the read
                raise ApiError(409, changed, param="name") from None
            cached = self.details[name] = (prompt.signature, {"id": name, "object": "prompt", **report})
        return cached[1]

    async def page(self):
        """The playground: the prompts and their details, one text sent to several of them and the base model."""
        return HTMLResponse(self.page_html, headers={"Content-Security-Policy": PAGE_SECURITY,
                                                     "Cache-Control": "no-cache"})  # fmt: skip


def create_app(registry: Registry, engine: Engine, limits: Limits | None = None, api_key: str | None = None,
               host: str | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app: the error handlers, the guard and the routes, all on one `Api`. `host`: the address the
    server listens on (a keyless loopback one refuses requests addressed to other names); None: not checked."""
    api = Api(registry, engine, limits or Limits(), api_key)
    app = FastAPI(title="softprompt", docs_url=None, redoc_url=None, openapi_url=None)
    app.exception_handler(ApiError)(api_error)
    app.exception_handler(RequestValidationError)(invalid_body)
    app.exception_handler(HTTPException)(http_error)
    app.exception_handler(Exception)(server_error)
    rules = Rules(api_key, host, api.limits.max_body_bytes, _open, _route)
    app.add_middleware(Guard, rules=rules, counters=api.counters)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/admin/reload")(api.reload)
    app.get("/v1/prompts/{name}")(api.prompt_details)
    app.get("/")(api.page)
    app.get("/ui")(api.page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
