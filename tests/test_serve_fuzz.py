"""A property-based fuzz of the HTTP API (hypothesis): request bodies of every shape, right and wrong (types, ranges,
NaN, huge numbers, unknown fields, malformed JSON, bytes that are not UTF-8), sent to the app in-process as a server
would. Whatever comes, the answer comes (no hang: each call has a deadline), is never a 5xx, says
`X-Content-Type-Options: nosniff`, and every error is in OpenAI's shape, in a stream too (an error event, and the
stream ends). Bounded: a fixed number of examples, derandomized, with a tiny model and at most 4 new tokens."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt import artifact
from softprompt.config import TaskConfig
from softprompt.serve.app import create_app
from softprompt.serve.engines.base import EngineConfig
from softprompt.serve.engines.local import LocalEngine
from softprompt.serve.jobs import Limits
from softprompt.serve.registry import Registry

from conftest import tiny_backbone
from conftest import random_prompt as build
from test_serve import CHAT_TEMPLATE, CLS_TEMPLATE, GEN_TEMPLATE, LABELS

ERROR_KEYS = {"message", "type", "param", "code"}
EXAMPLES = os.environ.get("SOFTPROMPT_FUZZ_EXAMPLES")
"""Unset: 120 examples per test, the same ones every run (CI); a number: that many, new ones each run (a search)."""
FUZZ = settings(max_examples=int(EXAMPLES or 120), derandomize=EXAMPLES is None, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app over a tiny Llama (with a chat template), a generation and a classification prompt; small limits so
    that valid requests are quick."""
    root = tmp_path_factory.mktemp("fuzz")
    backbone = tiny_backbone("llama", seed=4)
    backbone.tokenizer.chat_template = CHAT_TEMPLATE
    gen = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="answer")
    cls = TaskConfig(template=CLS_TEMPLATE, labels=LABELS, label_field="label")
    artifact.save(root / "prompts" / "gen", build(backbone, "prefix", 2, 1), gen, backbone)
    artifact.save(root / "prompts" / "cls", build(backbone, "prompt", 2, 2), cls, backbone)
    registry = Registry(backbone, "tiny", root / "prompts")
    registry.reload(strict=True)
    engine = LocalEngine(backbone, EngineConfig(max_batch=16, max_queue=32)).start()
    limits = Limits(max_prompt_tokens=32, max_tokens=4, max_n=3, max_body_bytes=1 << 16, max_prompts=8,
                    max_prompt_chars=2000, max_stop_chars=16, request_timeout=30)  # fmt: skip
    try:
        yield create_app(registry, engine, limits, None, "127.0.0.1")
    finally:
        engine.stop()


def send(app, method: str, path: str, body: bytes, content_type: bytes = b"application/json") -> list[dict]:
    """The messages the app sends for one request, given as a server would; a hang fails after 60 s."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", content_type),
                         (b"content-length", str(len(body)).encode())]}  # fmt: skip
    messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays

    async def scenario():
        async def record(message):
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, record), 60)

    asyncio.run(scenario())
    return sent


def check_answer(sent: list[dict]) -> None:
    """No 5xx; nosniff; errors in OpenAI's shape, whole or in a stream (which then ends); answers that parse."""
    start = sent[0]
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert start["status"] < 500, (start["status"], body[:500])
    assert headers.get("x-content-type-options") == "nosniff", headers
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events, body
        for data in events[:-1]:
            assert "choices" in json.loads(data), data
        if events[-1] != "[DONE]":
            error = json.loads(events[-1])
            assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS, error
        return
    answer = json.loads(body)
    if start["status"] >= 400:
        assert set(answer) == {"error"} and set(answer["error"]) == ERROR_KEYS, answer
        assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    else:
        assert isinstance(answer.get("choices"), list), answer


def anything():
    """JSON values of every kind, NaN and huge integers included, nested a little."""
    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    nest = lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)  # noqa: E731
    return st.recursive(leaves, nest, max_leaves=8)


WORDS = st.sampled_from(["the", "cat", "red", "dog", "good", "film", "zz", "é", "\x00", "\ud7ff", " ", "<eos>"])
TEXTS = st.lists(WORDS, max_size=12).map(" ".join) | st.text(max_size=60)
TOKEN_IDS = st.lists(st.integers(3, 127), min_size=1, max_size=12)
SAMPLING = {
    "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 3), "seed": st.integers(0, 2**32), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "stop": TEXTS.filter(bool) | st.lists(st.lists(WORDS, min_size=1, max_size=3).map(" ".join), max_size=4),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}  # fmt: skip
"""Options as a client means them: each within its range."""
PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXTS}), max_size=3)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXTS | PARTS})
MODELS = st.sampled_from(["gen", "cls", "tiny"])
PROMPTS = TEXTS | TOKEN_IDS | st.lists(TEXTS, min_size=1, max_size=3) | st.lists(TOKEN_IDS, min_size=1, max_size=3)
COMPLETION = st.fixed_dictionaries({"model": MODELS, "prompt": PROMPTS}, optional={**SAMPLING, "raw": st.booleans()})
CHAT = st.fixed_dictionaries({"model": MODELS, "messages": st.lists(MESSAGE, min_size=1, max_size=4)},
                             optional={**SAMPLING, "max_completion_tokens": st.integers(1, 4)})  # fmt: skip
KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
        "stream_options", "raw", "logprobs", "echo", "best_of", "max_completion_tokens", "ignore_eos", "anything"]
GARBAGE = (anything() | st.sampled_from([float("nan"), float("inf"), -1, 0, 10**6, 2**64])
           | st.text(min_size=1000, max_size=3000) | st.lists(st.text(max_size=30), min_size=5, max_size=12))


@st.composite
def mutated(draw, valid: st.SearchStrategy) -> dict:
    """A valid body with up to three of its fields dropped, or replaced by any value, or an unknown one added: most
    bodies are near a valid one, where checks are easiest to miss."""
    body = draw(valid)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(GARBAGE)
    return body


@FUZZ
@given(body=mutated(COMPLETION))
def test_completions_answer_every_body_in_openais_shape(app, body):
    check_answer(send(app, "POST", "/v1/completions", json.dumps(body).encode()))


@FUZZ
@given(body=mutated(CHAT))
def test_chat_answers_every_body_in_openais_shape(app, body):
    check_answer(send(app, "POST", "/v1/chat/completions", json.dumps(body).encode()))


@settings(FUZZ, max_examples=60)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                             "/admin/reload", "/v1/prompts/gen", "/v1/prompts/../x", "/static/nothing", "/nowhere"]),
       body=st.binary(max_size=200) | st.text(max_size=100).map(str.encode) | st.just(b"{" * 5000),
       content_type=st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data", b""]))  # fmt: skip
def test_any_route_method_and_bytes_get_an_answer_in_shape(app, method, path, body, content_type):
    sent = send(app, method, path, body, content_type)
    if sent[0]["status"] < 400 and not path.startswith("/v1/c"):  # a route's own answer (a list, a report, text)
        assert sent[0]["status"] < 300 and (b"x-content-type-options", b"nosniff") in sent[0]["headers"]
        return
    check_answer(sent)
