"""Serving behaviours seen from a client, against a server running in this process on loopback (so a test can reach
its engine): a streaming client that hangs up, an engine failure in one request, classification streamed, token-id
prompts, chat with n/seed/stop, shutdown with requests in flight, and sliding-window models. Every answer is compared
with the library's own `generate` / `label_scores` for the same request run alone."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch
import uvicorn
from starlette.responses import StreamingResponse
from transformers import AutoModelForCausalLM

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import TaskConfig
from softprompt.data import Example, TaskEncoder
from softprompt.errors import SoftPromptError
from softprompt.scoring.evaluate import label_scores
from softprompt.scoring.generate import decode_new, generate
from softprompt.models import load_model
from softprompt.serve.app import create_app
from softprompt.serve.engines import local as engine_module
from softprompt.serve.engines.base import STOPPED, EngineConfig
from softprompt.serve.engines.local import LocalEngine
from softprompt.serve.jobs import Limits
from softprompt.serve.registry import Registry

from conftest import run_main, tiny_backbone, tiny_config, tiny_model, tiny_tokenizer
from conftest import random_prompt as build
from test_serve import CHAT_TEMPLATE, CLS_TEMPLATE, GEN_TEMPLATE, LABELS, asgi_request

ENDLESS = 20000
"""max_tokens of rows meant to run until the test ends them (with ignore_eos, far more than any wait lets happen)."""


def wait_until(condition, what: str, seconds: float = 30) -> None:
    """Poll another thread's progress (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {seconds} s: {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny Llama with a chat template, a generation prompt of each method and a classification prompt saved as
    artifacts, and their K/V for the oracles."""
    root = tmp_path_factory.mktemp("behaviours")
    backbone = tiny_backbone("llama", seed=4)
    backbone.tokenizer.chat_template = CHAT_TEMPLATE
    gen = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="answer")
    cls = TaskConfig(template=CLS_TEMPLATE, labels=LABELS, label_field="label")
    made = {"gen": (build(backbone, "prefix", 3, 11), gen), "chat": (build(backbone, "prompt", 2, 12), gen),
            "cls": (build(backbone, "prompt", 3, 35), cls)}  # fmt: skip
    for name, (method, task) in made.items():
        artifact.save(root / "prompts" / name, method, task, backbone)
    with torch.no_grad():
        kv = {name: method.kv(backbone).detach() for name, (method, _) in made.items()}
    return dict(root=root, backbone=backbone, kv=kv, cls=cls)


class Live:
    """The app on a uvicorn server in a thread of this process, with its own engine."""

    def __init__(self, site, max_batch: int = 16):
        backbone = site["backbone"]
        registry = Registry(backbone, "tiny", site["root"] / "prompts")
        registry.reload(strict=True)
        self.engine = LocalEngine(backbone, EngineConfig(max_batch=max_batch, max_queue=64)).start()
        app = create_app(registry, self.engine, Limits(max_prompt_tokens=40, max_tokens=ENDLESS, max_n=4))
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        assert self.server.started, "the server did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def close(self) -> None:
        self.engine.stop()  # ends whatever still runs, so the server's graceful shutdown has nothing to wait for
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture
def live(site):
    server = Live(site)
    try:
        yield server
    finally:
        server.close()


def post(live: Live, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a POST."""
    request = urllib.request.Request(live.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def events(live: Live, path: str, body: dict, timeout: float = 60) -> list:
    """The data of every server-sent event of a streamed request: parsed JSON, or "[DONE]"."""
    request = urllib.request.Request(live.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line.decode().rstrip("\r\n") for line in response]
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def metrics(live: Live) -> dict[str, float]:
    with urllib.request.urlopen(live.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")}


def requests_with(status: int, endpoint: str = "/v1/completions") -> str:
    return f'softprompt_requests_total{{endpoint="{endpoint}",status="{status}"}}'


def recording(engine: LocalEngine) -> list[list]:
    """The rows of every submission to `engine` from now on, one list per request."""
    submitted, submit = [], engine.submit

    def record(rows):
        submitted.append(rows)
        submit(rows)

    engine.submit = record
    return submitted


def ids_of(site, text: str) -> list[int]:
    return site["backbone"].tokenizer(text)["input_ids"]


def alone(site, name: str | None, ids: list[int], max_tokens: int, **options) -> str:
    """The library's plain single-request `generate` on these ids: the oracle for the server."""
    backbone = site["backbone"]
    out = generate(backbone, [ids], site["kv"].get(name), max_new_tokens=max_tokens, **options)[0]
    return decode_new(backbone.tokenizer, out)


# ---- 1. a streaming client that hangs up ----


def test_a_streaming_client_that_hangs_up_leaves_the_batch_and_counts_as_499(site, live):
    submitted = recording(live.engine)
    body = {"model": "gen", "prompt": "the cat", "max_tokens": ENDLESS, "ignore_eos": True, "n": 2, "stream": True}
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", live.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
        received = b""
        while received.count(b"data: ") < 4:  # a few tokens of each choice
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the stream early: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        rows = submitted[0]
        assert len(rows) == 2 and all(row in live.engine._rows for row in rows)
    # the client has gone: its rows leave at the next step, long before they could finish
    wait_until(lambda: not any(row in live.engine._rows for row in rows), "the rows to leave the batch")
    assert all(row.cancelled and len(row.tokens) < ENDLESS for row in rows)
    left = [len(row.tokens) for row in rows]
    wait_until(lambda: metrics(live).get(requests_with(499)) == 1, "the request to be counted as 499")
    # the batch goes on for others: a request after it gets the tokens generated alone
    reply = live.client.completions.create(model="gen", prompt="red dog", max_tokens=12, temperature=0)
    assert reply.choices[0].text == alone(site, "gen", ids_of(site, GEN_TEMPLATE.format(text="red dog")), 12)
    assert [len(row.tokens) for row in rows] == left  # no step ran them after they left
    counted = metrics(live)
    assert counted[requests_with(499)] == 1 and counted[requests_with(200)] == 1


def asgi_call(app, method: str, path: str, body: bytes = b"", slow_reader_leaves_after: int | None = None,
              on_end=None) -> list:  # fmt: skip
    """Drive the app as a server would, without sockets; returns the messages it sent. With
    `slow_reader_leaves_after`, every body chunk takes 50 ms to send (tokens pile up behind it) and the client hangs
    up during the send of that many chunks. `on_end()` runs in the event loop as soon as the app has answered."""
    sent = []

    async def scenario() -> None:
        scope, receive, left = asgi_request(method, path, body)

        async def send(message):
            sent.append(message)
            if slow_reader_leaves_after and message["type"] == "http.response.body":
                if sum(m["type"] == "http.response.body" for m in sent) == slow_reader_leaves_after:
                    left.set()  # the disconnect arrives while this send still waits on a full socket
                await asyncio.sleep(0.05)

        await asyncio.wait_for(app(scope, receive, send), 60)
        if on_end:
            on_end()

    asyncio.run(scenario())
    return sent


def test_a_stream_cut_while_a_chunk_is_being_sent_is_ended_before_it_is_counted(site, monkeypatch):
    """The hang-up where Starlette stops the stream in the middle of a send: the events generator is left suspended,
    not closed. Its rows must still be cancelled and the request counted as 499 when the request ends, not whenever
    the generator is collected."""
    kept = []  # the generators, alive as a reference cycle keeps them until the garbage collector runs
    init = StreamingResponse.__init__
    monkeypatch.setattr(StreamingResponse, "__init__", lambda self, content, *args, **kwargs: kept.append(content)
                        or init(self, content, *args, **kwargs))  # fmt: skip
    engine = LocalEngine(site["backbone"]).start()
    app = create_app(Registry(site["backbone"], "tiny"), engine, Limits(max_tokens=ENDLESS))
    submitted = recording(engine)
    try:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": ENDLESS, "ignore_eos": True, "stream": True}
        at_end = []  # whether the row was cancelled when the request was over (later, a closed loop cancels it)
        sent = asgi_call(app, "POST", "/v1/completions", json.dumps(body).encode(), slow_reader_leaves_after=5,
                         on_end=lambda: at_end.append(submitted[0][0].cancelled))  # fmt: skip
        assert sent[0]["status"] == 200 and sum(m["type"] == "http.response.body" for m in sent) < 50
        assert len(kept) == 1 and len(submitted[0]) == 1 and at_end == [True]
        wait_until(lambda: engine.running == 0, "the row to leave the batch")
        text = b"".join(m.get("body", b"") for m in asgi_call(app, "GET", "/metrics")).decode()
        assert f"{requests_with(499)} 1" in text.splitlines() and requests_with(200) not in text
    finally:
        engine.stop()


# ---- 2. an engine failure in one request ----


def test_an_engine_failure_answers_500_for_its_request_only(site, live, monkeypatch, caplog):
    fail_at = {4242: 1, 4343: 3}  # the draw of a seed that raises: the 1st comes as its row joins, the 3rd in a step
    draws = collections.Counter()
    real = engine_module.next_tokens

    def failing(logits, temperature, top_p, generator):
        seed = generator.initial_seed() if generator is not None else None
        draws[seed] += 1
        if draws[seed] == fail_at.get(seed):
            raise RuntimeError(f"injected failure (seed {seed})")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(engine_module, "next_tokens", failing)
    sampled = dict(temperature=1.0, max_tokens=12)
    jobs = {
        "fail_now": lambda: post(live, "/v1/completions", dict(model="gen", prompt="the cat", seed=4242, **sampled)),
        "fail_later": lambda: events(live, "/v1/completions", dict(model="gen", prompt="red dog", seed=4343,
                                                                   **sampled)),
        "greedy": lambda: post(live, "/v1/completions", dict(model="gen", prompt="good film", max_tokens=12,
                                                             temperature=0)),
        "chat": lambda: post(live, "/v1/chat/completions", dict(model="chat", seed=7, n=2, **sampled,
                                                                messages=[{"role": "user", "content": "hello"}])),
        "base": lambda: post(live, "/v1/completions", dict(model="tiny", prompt="one two three", max_tokens=12,
                                                           temperature=0)),
    }  # fmt: skip
    inside, release = threading.Event(), threading.Event()
    live.engine.call(lambda: inside.set() or release.wait(30))  # holds the worker: all rows join in one batch
    assert inside.wait(30)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        wait_until(lambda: live.engine.queue_depth == 6, "every row to wait")
        release.set()
        got = {name: future.result(timeout=60) for name, future in futures.items()}
    monkeypatch.undo()

    # the client hears what failed, not the exception's text (which may name the server's files): that is logged
    generic = "generation failed (RuntimeError); the server's log has the details"
    status, body = got["fail_now"]
    assert status == 500 and body["error"]["type"] == "server_error"
    assert body["error"]["message"] == generic
    *streamed, last = got["fail_later"]  # two tokens, then the error; no [DONE]
    assert last == {"error": {"message": generic, "type": "server_error", "param": None, "code": None}}
    logged = [r.getMessage() for r in caplog.records if r.name == "softprompt.serve"]
    assert logged == [f"generation failed: RuntimeError: injected failure (seed {seed})" for seed in (4242, 4343)]
    prompt = ids_of(site, GEN_TEMPLATE.format(text="red dog"))
    assert "".join(e["choices"][0]["text"] for e in streamed) == alone(site, "gen", prompt, 2, temperature=1.0,
                                                                       seed=4343)  # fmt: skip
    assert len(alone(site, "gen", prompt, 12, temperature=1.0, seed=4343).split()) > 3, "the row ended too early"

    # the rows that shared every step with the failing ones got what they get alone
    status, body = got["greedy"]
    want = alone(site, "gen", ids_of(site, GEN_TEMPLATE.format(text="good film")), 12)
    assert status == 200 and body["choices"][0]["text"] == want and len(want.split()) > 3
    status, body = got["chat"]
    chat_ids = ids_of(site, "user hello answer")  # CHAT_TEMPLATE's rendering of this conversation
    assert status == 200
    for j, c in enumerate(sorted(body["choices"], key=lambda c: c["index"])):
        assert c["message"]["content"] == alone(site, "chat", chat_ids, 12, temperature=1.0, seed=7 + j), j
    status, body = got["base"]
    assert status == 200 and body["choices"][0]["text"] == alone(site, None, ids_of(site, "one two three"), 12)
    assert metrics(live)[requests_with(500)] == 1
    assert draws[4343] == 3, "the row with seed 4343 did not reach the draw that fails"


# ---- 3. classification, streamed ----


def test_a_streamed_classification_equals_the_plain_answer_and_label_scores(site, live):
    texts = ["the cat was red", "good film", "very boring book", "hello world", "not fun"]
    task = TaskEncoder(site["cls"], site["backbone"].tokenizer)
    examples = [Example(ids_of(site, CLS_TEMPLATE.format(text=t)), task.label_ids[0]) for t in texts]
    scores = label_scores(site["backbone"], task, examples, site["kv"]["cls"])  # (texts, labels)
    want = [LABELS[int(s.argmax())] for s in scores]
    assert len(set(want)) == 2, "the random classifier gives one label to every text: nothing to tell apart"

    request = dict(model="cls", prompt=texts, n=2, max_tokens=4)
    status, plain = post(live, "/v1/completions", request)
    assert status == 200
    choices = sorted(plain["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == [w for w in want for _ in range(2)]
    for c in choices:
        expected = dict(zip(LABELS, scores[c["index"] // 2].tolist()))
        assert c["label_scores"] == pytest.approx(expected, abs=1e-4)

    streamed = events(live, "/v1/completions", {**request, "stream_options": {"include_usage": True}})
    assert streamed[-1] == "[DONE]" and streamed[-2]["usage"] == plain["usage"] and not streamed[-2]["choices"]
    texts_by_index, finish = collections.defaultdict(str), {}
    for event in streamed[:-2]:
        for c in event["choices"]:
            texts_by_index[c["index"]] += c["text"]
            finish[c["index"]] = c["finish_reason"]
    assert [texts_by_index[i] for i in range(len(choices))] == [c["text"] for c in choices]
    assert set(finish.values()) == {"stop"} and len(finish) == len(choices)

    # in chat the last user message is classified; the stream carries the same label
    messages = [{"role": "user", "content": "ignored"}, {"role": "user", "content": texts[2]}]
    chat = live.client.chat.completions.create(model="cls", messages=messages)
    parts = live.client.chat.completions.create(model="cls", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == want[2]
    assert chat.choices[0].message.content == want[2]


# ---- 4. token-id prompts ----


def test_token_id_prompts_are_read_as_they_are(site, live):
    vocab = len(site["backbone"].tokenizer)
    prompts = [[5, 17, vocab - 1, 40], [9, 3]]
    templated = alone(site, "gen", ids_of(site, GEN_TEMPLATE.format(text=decode_new(site["backbone"].tokenizer,
                                                                                     prompts[0]))), 10)  # fmt: skip
    want = [alone(site, "gen", ids, 10) for ids in prompts]
    assert want[0] != templated, "the template changes nothing here: the test could not tell"
    one = live.client.completions.create(model="gen", prompt=prompts[0], max_tokens=10, temperature=0)
    assert one.choices[0].text == want[0] and one.usage.prompt_tokens == len(prompts[0])
    both = live.client.completions.create(model="gen", prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == want
    assert both.usage.prompt_tokens == sum(map(len, prompts))
    for prompt, bad in [([5, vocab], [vocab]), ([-1, 5], [-1]), ([[5], [vocab + 7, 6]], [vocab + 7])]:
        status, body = post(live, "/v1/completions", dict(model="gen", prompt=prompt, max_tokens=4))
        assert status == 400
        assert f"token ids outside the vocabulary (0 to {vocab - 1}): {bad}" in body["error"]["message"]
    assert live.engine.stats.prefills == 2  # the two answered requests: the refused ones never reached the engine


# ---- 5. chat with n, seed and stop ----


def test_chat_choice_j_uses_seed_plus_j_and_stop_strings_cut(site, live):
    messages = [{"role": "user", "content": "the red cat"}]
    prompt = ids_of(site, "user the red cat answer")  # CHAT_TEMPLATE's rendering
    args = dict(model="chat", messages=messages, max_tokens=14, temperature=1.0)

    def texts(reply) -> list[str]:
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = live.client.chat.completions.create(**args, n=3, seed=21)
    three, finished = texts(first), [c.finish_reason for c in sorted(first.choices, key=lambda c: c.index)]
    assert three == [alone(site, "chat", prompt, 14, temperature=1.0, seed=21 + j) for j in range(3)]
    assert len(set(three)) == 3, "the seeds gave equal answers: the test could not tell them apart"
    assert texts(live.client.chat.completions.create(**args, n=3, seed=21)) == three  # reproducible
    for j in range(3):
        assert texts(live.client.chat.completions.create(**args, n=1, seed=21 + j)) == [three[j]]

    words = three[1].split()
    assert len(words) >= 6, "the random model ended too early for this test"
    stop = " ".join(words[3:5])
    cut = [alone(site, "chat", prompt, 14, temperature=1.0, seed=21 + j, stop=[stop, "zzz"]) for j in range(3)]
    assert cut[1] == " ".join(words[:3])  # the text before the stop string
    reply = live.client.chat.completions.create(**args, n=3, seed=21, stop=[stop, "zzz"])
    assert texts(reply) == cut
    for c, full, reason in zip(sorted(reply.choices, key=lambda c: c.index), three, finished):
        assert stop not in c.message.content and full.startswith(c.message.content)
        assert c.finish_reason == ("stop" if stop in full else reason)
    streamed = ["", "", ""]
    for chunk in live.client.chat.completions.create(**args, n=3, seed=21, stop=[stop, "zzz"], stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == cut


# ---- 6. shutdown with requests in flight ----


def held_once_both_join(engine: LocalEngine) -> tuple[threading.Event, threading.Event]:
    """Gate `engine`'s worker: no step until two rows wait, so both join in one step; then, with both running, it
    holds between steps until `release` is set (so neither row can finish first, however slow the machine).
    Returns (joined, release)."""
    joined, release, step = threading.Event(), threading.Event(), engine.step

    def gated_step() -> None:
        if joined.is_set():
            release.wait(60)
        elif engine.queue_depth < 2:
            time.sleep(0.01)
            return
        step()
        if engine.running == 2:
            joined.set()

    engine.step = gated_step  # what the worker's loop calls
    return joined, release


def test_requests_in_flight_at_shutdown_get_an_error(site):
    live = Live(site, max_batch=2)
    joined, release = held_once_both_join(live.engine)
    try:
        endless = dict(model="gen", max_tokens=ENDLESS, ignore_eos=True)
        with ThreadPoolExecutor(4) as pool:
            streaming = pool.submit(events, live, "/v1/completions", dict(prompt="the cat", **endless))
            running = pool.submit(post, live, "/v1/completions", dict(prompt="red dog", **endless))
            assert joined.wait(60), "the two rows did not join"  # and the worker now holds between steps
            queued = pool.submit(post, live, "/v1/completions", dict(model="gen", prompt="good film", max_tokens=4))
            scoring = pool.submit(post, live, "/v1/completions", dict(model="cls", prompt="fun book"))
            wait_until(lambda: live.engine.queue_depth == 2, "a row and a classification to wait")
            assert live.engine.running == 2
            stopper = threading.Thread(target=live.engine.stop)
            stopper.start()
            wait_until(lambda: live.engine._stopping, "the stop to begin")
            release.set()
            stopper.join(30)
            assert not stopper.is_alive(), "the engine did not stop"
            answers = {name: f.result(timeout=30) for name, f in
                       [("running", running), ("queued", queued), ("scoring", scoring)]}  # fmt: skip
            *tokens, last = streaming.result(timeout=30)
        for name, (status, body) in answers.items():
            assert (status, body["error"]["message"], body["error"]["type"]) == (500, STOPPED, "server_error"), name
        assert tokens and all("choices" in e for e in tokens) and last["error"]["message"] == STOPPED
        status, body = post(live, "/v1/completions", dict(model="gen", prompt="the cat", max_tokens=2))
        assert status == 503 and body["error"]["message"] == STOPPED  # stopped: no new work is taken
        assert live.engine.running == 0 and live.engine.queue_depth == 0
    finally:
        release.set()
        live.close()


HELD_ENGINE_CLI = [sys.executable, "-c", """
import os, time
from pathlib import Path
from softprompt.serve.engines.local import LocalEngine
from softprompt.cli import main

release, step = Path(os.environ["ENGINE_RELEASE"]), LocalEngine.step

def held_step(self):
    if not release.exists() and (self.running or self.queue_depth < 2):
        time.sleep(0.01)  # no step until both requests wait; once they run, none until the release file exists
        return
    step(self)

LocalEngine.step = held_step
main()
"""]
"""`softprompt` whose engine lets two waiting rows join in one step, then holds them (running, unfinished) until the
file ENGINE_RELEASE exists."""


def test_an_interrupted_server_ends_the_requests_in_flight_then_exits(tmp_path):
    """The real `softprompt serve` process, interrupted (Ctrl-C) while a streamed and a plain request run: uvicorn
    stops listening and drains them (each completes, equal to `generate` alone), then the process exits. The engine is
    held (HELD_ENGINE_CLI) from the moment both rows run until uvicorn reports it waits for their connections, so
    neither can finish before the signal, however slow the machine."""
    tiny_model("llama", seed=4).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    release = tmp_path / "release"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "SOFTPROMPT_CACHE": str(tmp_path / "cache"),
           "ENGINE_RELEASE": str(release)}  # fmt: skip
    command = [*HELD_ENGINE_CLI, "serve", "--model", str(tmp_path / "tiny"), "--port", str(port)]
    log_path = tmp_path / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = SimpleNamespace(url=f"http://127.0.0.1:{port}")  # what `events` and `post` need

    def health() -> dict | None:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            return None

    try:
        wait_until(lambda: health() is not None or process.poll() is not None, "the server to start", 120)
        assert process.poll() is None, log_path.read_text()
        request = dict(model="tiny", prompt=[5, 6, 7], max_tokens=32, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(events, server, "/v1/completions", request)
            plain = pool.submit(post, server, "/v1/completions", dict(request, prompt=[8, 9]))
            wait_until(lambda: (health() or {}).get("running") == 2, "both requests to run", 60)
            process.send_signal(signal.SIGINT)
            wait_until(lambda: "Waiting for connections to close" in log_path.read_text(),
                       "uvicorn to wait for the requests in flight", 60)  # fmt: skip
            assert health() is None  # it no longer listens
            release.touch()
            streamed, plain = streamed.result(timeout=120), plain.result(timeout=120)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=20)
        log.close()
    backbone = backbone_for(*load_model(str(tmp_path / "tiny")))
    want = [decode_new(backbone.tokenizer, generate(backbone, [ids], None, max_new_tokens=32)[0])
            for ids in ([5, 6, 7], [8, 9])]  # fmt: skip
    assert all(len(text.split()) > 3 for text in want), "the random model ended too early for this test"
    *chunks, end = streamed
    assert end == "[DONE]" and "".join(c["choices"][0]["text"] for c in chunks) == want[0]
    status, body = plain
    assert status == 200 and body["choices"][0]["text"] == want[1]


# ---- 7. sliding-window models ----


@pytest.mark.parametrize("arch, window", [("mistral", {"sliding_window": 4}),
                                          ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                                     "max_window_layers": 1})])  # fmt: skip
def test_serve_refuses_sliding_window_models(arch, window, tmp_path, monkeypatch, capsys):
    settings = {k: v for k, v in tiny_config(arch).to_dict().items() if k != "layer_types"}  # derived again
    torch.manual_seed(0)
    windowed = AutoModelForCausalLM.from_config(type(tiny_config(arch))(**{**settings, **window}),
                                                dtype=torch.float32).eval()  # fmt: skip
    full = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.arange(5, 17)[None]  # longer than the window: the window changes what the last token sees
    with torch.no_grad():
        assert not torch.allclose(windowed(ids).logits[0, -1], full(ids).logits[0, -1], atol=1e-4)
    name = type(windowed).__name__
    with pytest.raises(SoftPromptError, match=f"{name} uses sliding-window attention; the serving engine cannot"):
        LocalEngine(backbone_for(windowed, tiny_tokenizer()))
    LocalEngine(backbone_for(full, tiny_tokenizer()))  # the same weights without a window are served

    windowed.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    capsys.readouterr()

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    code, _, err = run_main(monkeypatch, capsys, ["serve", "--model", tmp_path / "model"])
    assert code == 2 and "Traceback" not in err
    assert any(line.startswith(f"error: {name} uses sliding-window attention") for line in err.splitlines()), err
