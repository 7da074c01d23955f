"""The OpenAI-compatible request bodies, response objects and errors (the subset this server implements)."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions", "best_of",
               "frequency_penalty", "presence_penalty")  # fmt: skip
"""Options a client may send that this server does not implement: refused when set to anything but their default."""
DEFAULTS = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "echo": False, "logprobs": False}


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown options are ignored, unsupported ones refused by name

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    """Default 1 (as OpenAI's); 0 is greedy."""
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    """Extension: keep generating past EOS."""

    def unsupported(self) -> list[str]:
        extra = self.model_extra or {}
        return [k for k in UNSUPPORTED if extra.get(k) not in (None, DEFAULTS.get(k))]


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    raw: bool = False
    """Extension: send the text as it is, not put into the prompt's template."""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text; content parts of type text are joined."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:  # fmt: skip
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """A request answered with an error: its HTTP status and OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion(rid: str, model: str, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def chat_completion(rid: str, model: str, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
