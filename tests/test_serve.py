"""Serving: the continuous-batching engine in-process (rows joining and leaving mid-generation give each row the
tokens `generate` gives it alone), then a real `softprompt serve` process on loopback driven with the official
`openai` client: completions, chat, streaming, n, stop, seed, classification, limits, auth, reload, metrics, and
100 concurrent requests over 8 prompts, each greedy answer equal to that prompt's single-request output from the
library's plain `generate` (an independent path from the engine). Failures (a row that cannot join, a stop, a client
that leaves) end only the requests they concern, and every request hears of its end."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.cli import main
from softprompt.config import TaskConfig
from softprompt.errors import SoftPromptError
from softprompt.scoring.generate import decode_new, generate
from softprompt.models import load_model
from softprompt.backbones import cache_rows
from softprompt.serve.answers import TextStream
from softprompt.serve.app import create_app
from softprompt.serve.engines.base import (STOPPED, EngineConfig, QueueFull, Sampling, ScoreRequest, Sequence, Stopped,
                                           Update)  # fmt: skip
from softprompt.serve.engines.local import LocalEngine
from softprompt.serve.registry import Registry

from conftest import ARCHS, WORDS, run_main, tiny_backbone, tiny_model, tiny_tokenizer
from conftest import random_prompt as build
from test_mixed import reference_label_logprob
from test_backbones_seq2seq import tiny_t5

KEY = "test-key-123"
GEN_TEMPLATE = "question {text} answer"
CLS_TEMPLATE = "review {text} sentiment"
LABELS = ["negative", "positive"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}answer{% endif %}")  # fmt: skip
GEN_PROMPTS = [f"task{i}" for i in range(8)]
TWO_FIELDS = "context {context} question {question} answer"


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def wait_until(condition, what: str) -> None:
    """Poll another thread's progress (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


# ---- the engine, in-process ----


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_rows_join_and_leave_mid_generation(arch):
    backbone = tiny_backbone(arch, seed=1)
    with torch.no_grad():
        prefixes = [build(backbone, "prompt", 3, 1).kv(backbone), build(backbone, "prefix", 6, 2).kv(backbone),
                    build(backbone, "prompt", 1, 3).kv(backbone), None]  # fmt: skip
    rng = random.Random(0)
    requests = [([rng.randrange(3, 128) for _ in range(rng.randint(1, 8))], prefixes[i % 4], 3 + i % 7)
                for i in range(12)]  # fmt: skip
    engine = LocalEngine(backbone, EngineConfig(max_batch=5))
    finals = {}
    rows = [Sequence(ids, prefix, Sampling(max_tokens=m), lambda u, i=i: finals.__setitem__(i, u))
            for i, (ids, prefix, m) in enumerate(requests)]  # fmt: skip
    engine.submit(rows[:3])
    engine.step()
    engine.step()
    engine.submit(rows[3:])  # these join a batch mid-generation, in groups, as earlier rows finish
    for _ in range(200):
        if len(finals) == len(rows):
            break
        engine.step()
    assert engine.stats.rows_joined_running > 0 and engine.running == 0
    for i, (ids, prefix, m) in enumerate(requests):
        alone = generate(backbone, [ids], prefix, max_new_tokens=m)[0]
        assert finals[i].tokens == alone, i
        assert finals[i].finish_reason == ("length" if len(alone) == m else "stop")


def test_cancelled_row_leaves_and_others_continue():
    backbone = tiny_backbone("qwen2", seed=2)
    prefix = build(backbone, "prefix", 4, 1).kv(backbone).detach()
    prompts = [[5, 6, 7], [8, 9], [10]]
    updates: dict[int, list] = {0: [], 1: [], 2: []}
    rows = [Sequence(p, prefix, Sampling(max_tokens=12), updates[i].append, stream=True)
            for i, p in enumerate(prompts)]  # fmt: skip
    engine = LocalEngine(backbone)
    engine.submit(rows)
    engine.step()  # prefill (first token) and one decode step
    engine.step()
    rows[1].cancelled = True
    while engine.running:
        engine.step()
    assert [len(u.tokens) for u in updates[1]] == [1, 2, 3] and not updates[1][-1].finished  # left at once
    for i in (0, 2):
        final = updates[i][-1]
        assert final.finished and final.tokens == generate(backbone, [prompts[i]], prefix, max_new_tokens=12)[0]
        assert len(final.tokens) > 3, "the random model ended too early for this test"
        counts = [len(u.tokens) for u in updates[i]]
        assert counts[: len(final.tokens)] == list(range(1, len(final.tokens) + 1))  # one update per token


def test_queue_limit_refuses_whole_submissions():
    engine = LocalEngine(tiny_backbone("llama"), EngineConfig(max_batch=2, max_queue=3))
    row = lambda: Sequence([5, 6], None, Sampling(max_tokens=2), lambda u: None)  # noqa: E731
    engine.submit([row(), row()])
    with pytest.raises(QueueFull, match="2 requests are waiting .limit 3, this request adds 2"):
        engine.submit([row(), row()])
    assert engine.queue_depth == 2


def test_prompt_kv_is_computed_once_per_prompt(tmp_path, monkeypatch):
    backbone = tiny_backbone("llama", seed=3)
    task = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="answer")
    for i, method in enumerate(["prompt", "prefix", "prompt"]):
        artifact.save(tmp_path / f"p{i}", build(backbone, method, 2 + i, i), task, backbone)
    calls = []
    original = type(backbone).prefix_from_embeddings
    monkeypatch.setattr(type(backbone), "prefix_from_embeddings", lambda self, e: calls.append(1) or original(self, e))
    registry = Registry(backbone, "tiny", tmp_path)
    registry.reload(strict=True)
    assert len(calls) == 2  # the two prompt-tuning artifacts, once each
    engine, done = LocalEngine(backbone), []
    engine.submit([Sequence([5 + i, 6], registry.get(f"p{i % 3}").prompt_input, Sampling(max_tokens=4), done.append)
                   for i in range(9)])  # fmt: skip
    while engine.running or engine.queue_depth:
        engine.step()
    assert len(done) == 9 and len(calls) == 2  # requests never re-run a soft prompt
    assert registry.reload()["unchanged"] == ["p0", "p1", "p2"] and len(calls) == 2


def test_a_failure_while_rows_join_ends_those_rows_only(monkeypatch, caplog):
    backbone = tiny_backbone("qwen2", seed=2)
    prefix = build(backbone, "prefix", 4, 1).kv(backbone).detach()
    prompts = [[5, 6, 7], [10]]
    finals: dict[str, Update] = {}
    sink = lambda key: lambda u: finals.__setitem__(key, u)  # noqa: E731
    engine = LocalEngine(backbone)
    engine.submit([Sequence(p, prefix, Sampling(max_tokens=12), sink(f"run{i}")) for i, p in enumerate(prompts)])
    engine.step()
    assert engine.running == 2
    # a seed torch cannot take: creating the row's generator raises
    engine.submit([Sequence([8, 9], prefix, Sampling(max_tokens=5, temperature=1.0, seed=2**64), sink("seed"))])
    engine.step()
    assert finals["seed"].finish_reason == "error" and "generation failed (ValueError)" in finals["seed"].error
    assert "Overflow" in caplog.records[-1].getMessage()  # the exception's text is logged, not sent

    def out_of_memory(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cache_rows, "merge", out_of_memory)  # merging the joining rows into the running batch
    engine.submit([Sequence([11], None, Sampling(max_tokens=5), sink("merge"))])
    engine.step()
    monkeypatch.undo()
    assert finals["merge"].finish_reason == "error" and "(RuntimeError)" in finals["merge"].error
    assert "out of memory" in caplog.records[-1].getMessage()
    assert engine.running == 2  # the running rows went on
    while engine.running:
        engine.step()
    for i, p in enumerate(prompts):
        alone = generate(backbone, [p], prefix, max_new_tokens=12)[0]
        assert finals[f"run{i}"].finish_reason != "error" and finals[f"run{i}"].tokens == alone
        assert len(alone) > 3, "the random model ended too early for this test"


def test_a_merge_that_fails_midway_leaves_the_running_cache_as_it_was(monkeypatch):
    backbone = tiny_backbone("llama", seed=4)
    prefix = build(backbone, "prefix", 3, 1).kv(backbone).detach()
    running = backbone.new_cache(prefix, 2)  # (2, heads, 3, d) per layer
    mask = torch.ones(2, 3, dtype=torch.long)
    joining = backbone.new_cache(build(backbone, "prefix", 5, 2).kv(backbone).detach(), 1)  # longer: pads `running`
    before = [(layer.keys.clone(), layer.values.clone()) for layer in running.layers]
    assert len(before) >= 2
    cat, calls = torch.cat, []

    def cat_failing_at_the_third_call(*args, **kwargs):  # the second layer's keys
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat_failing_at_the_third_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache_rows.merge(running, mask, joining, torch.ones(1, 5, dtype=torch.long))
    monkeypatch.undo()
    for layer, (keys, values) in zip(running.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_stop_ends_every_waiting_and_running_request():
    engine = LocalEngine(tiny_backbone("llama", seed=5), EngineConfig(max_batch=2)).start()
    updates: dict[int, list[Update]] = collections.defaultdict(list)
    endless = Sampling(max_tokens=10**6, ignore_eos=True)
    row = lambda i: Sequence([5 + i, 6], None, endless, updates[i].append)  # noqa: E731
    engine.submit([row(0), row(1)])
    wait_until(lambda: engine.running == 2, "two running rows")
    inside, release = threading.Event(), threading.Event()
    blocker = engine.call(lambda: inside.set() or release.wait(60))  # holds the worker between steps
    assert inside.wait(60)
    engine.submit([row(2), row(3)])  # queued: the batch is full
    scored = []
    engine.submit_scoring([ScoreRequest([5, 6], [[7], [8]], None, lambda s, e: scored.append((s, e)))])
    pending = engine.call(lambda: "never run")
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    wait_until(lambda: engine._stopping, "the stop to begin")
    release.set()
    stopper.join(60)
    assert not stopper.is_alive()
    for i in range(4):
        assert [(u.finished, u.finish_reason, u.error) for u in updates[i]] == [(True, "error", STOPPED)], i
    assert scored == [(None, STOPPED)]
    assert blocker.result(timeout=0) is True
    with pytest.raises(Stopped, match="shutting down"):
        pending.result(timeout=0)
    with pytest.raises(Stopped, match="shutting down"):
        engine.submit([row(4)])
    assert engine.running == 0 and engine.queue_depth == 0


def asgi_request(method: str, path: str, body: bytes):
    """What a server hands the app for one request, without sockets: its scope, a `receive` that delivers `body`
    and then waits, and the event that, once set, makes `receive` report the client gone."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    left, messages = asyncio.Event(), [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    return scope, receive, left


def test_a_client_leaving_a_plain_request_cancels_its_rows():
    backbone = tiny_backbone("llama", seed=6)
    engine = LocalEngine(backbone)  # not started: its rows wait in the queue until the test steps it
    app = create_app(Registry(backbone, "tiny"), engine)
    body = json.dumps({"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "n": 3}).encode()

    async def scenario() -> list[dict]:
        scope, receive, left = asgi_request("POST", "/v1/completions", body)
        sent = []

        async def send(message):
            sent.append(message)

        handler = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(6000):
            if engine.queue_depth == 3 or handler.done():
                break
            await asyncio.sleep(0.01)
        assert engine.queue_depth == 3, sent
        left.set()  # the client hangs up
        await asyncio.wait_for(handler, 60)
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    engine.step()
    assert engine.stats.prefills == 0 and engine.running == 0 and engine.queue_depth == 0  # nothing computed


def test_serve_refuses_encoder_decoder_models(tmp_path, monkeypatch, capsys):
    refusal = r"T5ForConditionalGeneration \(encoder-decoder\) cannot batch continuously: the serving engine batches"
    with pytest.raises(SoftPromptError, match=refusal + " decoder-only"):
        LocalEngine(backbone_for(tiny_t5(), tiny_tokenizer()))
    tiny_t5().save_pretrained(tmp_path / "t5")
    tiny_tokenizer().save_pretrained(tmp_path / "t5")
    capsys.readouterr()  # saving's progress bar

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    code, _, err = run_main(monkeypatch, capsys, ["serve", "--model", tmp_path / "t5"])
    assert code == 2 and "Traceback" not in err
    assert any(line.startswith("error: T5ForConditionalGeneration (encoder-decoder) cannot batch continuously") for line in err.splitlines()), err


def test_reload_keeps_the_prompts_when_their_folder_is_gone(tmp_path):
    backbone = tiny_backbone("llama", seed=3)
    task = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="answer")
    artifact.save(tmp_path / "prompts" / "p0", build(backbone, "prefix", 2, 0), task, backbone)
    registry = Registry(backbone, "tiny", tmp_path / "prompts")
    assert registry.reload(strict=True)["loaded"] == ["p0"]
    (tmp_path / "prompts").rename(tmp_path / "moved")
    report = registry.reload()
    assert "is not a directory (any more)" in report["errors"][str(tmp_path / "prompts")]
    assert registry.get("p0") is not None and not report["unloaded"]
    with pytest.raises(SoftPromptError, match="is not a directory"):
        registry.reload(strict=True)


def test_text_stream_holds_back_what_a_stop_string_may_remove():
    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids(["the", "cat", "was", "red"])
    # The engine finds "was red" at the 4th token and finishes with the tokens before it ("the cat").
    stream = TextStream(tok, ["was red", "xyz"])  # 7 characters: tokens ending in the last 6 stay back
    assert [stream.delta(ids[:k], False) for k in range(1, 4)] == ["", "", "the"]
    assert stream.delta(ids[:2], True) == " cat"
    stream = TextStream(tok, ["red dog"])  # never completed: everything comes out by the end
    assert [stream.delta(ids[:k], False) for k in range(1, 5)] == ["", "", "the", " cat"]
    assert stream.delta(ids, True) == " was red"
    plain = TextStream(tok, [])
    assert [plain.delta(ids[:k], k == 4) for k in range(1, 5)] == ["the", " cat", " was", " red"]


def test_serve_command_refuses_bad_settings_before_loading_anything(monkeypatch, capsys, tmp_path):
    cases = [(["--prompts", tmp_path / "missing"], "is not a directory"),
             (["--prompts", tmp_path, "--max-batch", 0, "--max-n", 0],
              "max_batch must be at least 1, got 0\n  - max_n must be at least 1"),
             (["--api-key", " "], "api_key is empty")]  # fmt: skip
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["softprompt", "serve", "--model", tmp_path / "no-model", *map(str, args)])
        with pytest.raises(SystemExit) as exit:
            main()
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


# ---- a real server process ----


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny Llama on disk (with a chat template), 8 generation prompts and a classification prompt of both methods
    and several lengths, a spare prompt for the reload test, and an in-process copy of everything for oracles."""
    root = tmp_path_factory.mktemp("serve")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tiny_model("llama", seed=4).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    backbone = backbone_for(*load_model(str(root / "tiny")))
    gen = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="answer")
    cls = TaskConfig(template=CLS_TEMPLATE, labels=LABELS, label_field="label")
    made = {}
    for i, name in enumerate(GEN_PROMPTS):
        made[name] = build(backbone, ["prompt", "prefix"][i % 2], 1 + i, 10 + i)
        artifact.save(root / "prompts" / name, made[name], gen, backbone)
    made["sentiment"] = build(backbone, "prompt", 3, 30)
    artifact.save(root / "prompts" / "sentiment", made["sentiment"], cls, backbone)
    made["two"] = build(backbone, "prefix", 2, 50)
    two = TaskConfig(template=TWO_FIELDS, task="generation", target_field="answer")
    artifact.save(root / "prompts" / "two", made["two"], two, backbone)
    made["late"] = build(backbone, "prefix", 5, 40)
    artifact.save(root / "spare" / "late", made["late"], gen, backbone)
    with torch.no_grad():
        kv = {name: method.kv(backbone).detach() for name, method in made.items()}
    return dict(root=root, backbone=backbone, made=made, kv=kv)


HOST = "127.0.0.2"
"""Where the module's server listens (`serve --host`): loopback too (all of 127.0.0.0/8 is, on Linux), but not the
default 127.0.0.1."""


def answers_health(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(site):
    """`softprompt serve --host 127.0.0.2`. Its port is held on 127.0.0.1 by a socket that never listens (with
    SO_REUSEADDR, as uvicorn's: a server that ignored --host could still bind there), so nothing else answers there."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "SOFTPROMPT_CACHE": str(site["root"] / "cache")}  # fmt: skip
    command = [sys.executable, "-c", "from softprompt.cli import main; main()", "serve",
               "--model", str(site["root"] / "tiny"), "--prompts", str(site["root"] / "prompts"),
               "--host", HOST, "--port", str(port), "--api-key", KEY, "--max-batch", "16", "--max-queue", "120",
               "--max-tokens", "64", "--max-prompt-tokens", "40", "--max-n", "4"]  # fmt: skip
    log = (site["root"] / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (answers_health(HOST, port) or answers_health("127.0.0.1", port)):  # up, wherever it listens
            if process.poll() is not None:
                log_text = (site["root"] / "server.log").read_text()
                pytest.fail(f"the server exited with {process.returncode}:\n{log_text}")
            assert time.monotonic() < deadline, "the server did not come up within 180 s"
            time.sleep(0.3)
        yield dict(url=f"http://{HOST}:{port}", process=process, port=port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        held.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def expected(site, name: str, text: str, max_tokens: int, template: str = GEN_TEMPLATE, **options) -> str:
    """The library's plain single-request `generate` on the same input: the oracle for the server."""
    backbone = site["backbone"]
    ids = backbone.tokenizer(template.replace("{text}", text))["input_ids"]
    out = generate(backbone, [ids], site["kv"].get(name), max_new_tokens=max_tokens, **options)[0]
    return decode_new(backbone.tokenizer, out)


def http(server, path: str, method: str = "GET", key: str | None = KEY, body: bytes | None = None):
    """(status, text) of a raw HTTP call."""
    request = urllib.request.Request(server["url"] + path, data=body, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_serve_listens_on_the_host_it_is_given_only(server):
    """`--host 127.0.0.2`: the server answers there, and nothing answers on 127.0.0.1 at the same port."""
    port = server["port"]
    where = {host: answers_health(host, port) for host in (HOST, "127.0.0.1")}
    assert where == {HOST: True, "127.0.0.1": False}, f"/health answers at port {port} of: {where}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server["port"]), timeout=10).close()


def test_models_lists_every_prompt_and_the_base(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny", "sentiment", "two", *GEN_PROMPTS}


def test_completions_equal_plain_generate(site, client):
    rng = random.Random(1)
    for name in ["task0", "task3", "task6", "tiny"]:
        text = sentence(rng, 4)
        template = "{text}" if name == "tiny" else GEN_TEMPLATE  # the bare model reads the text as it is
        reply = client.completions.create(model=name, prompt=text, max_tokens=10, temperature=0)
        assert reply.choices[0].text == expected(site, name, text, 10, template)
        assert reply.usage.completion_tokens <= 10 and reply.model == name
    raw = client.completions.create(model="task1", prompt="hello world", max_tokens=6, temperature=0,
                                    extra_body={"raw": True})  # fmt: skip
    assert raw.choices[0].text == expected(site, "task1", "hello world", 6, "{text}")


def test_chat_applies_the_base_models_chat_template(site, client):
    messages = [{"role": "user", "content": "hello world"}]
    reply = client.chat.completions.create(model="task2", messages=messages, max_tokens=8, temperature=0)
    # the test's own template renders this conversation as "user hello world answer"
    assert reply.choices[0].message.content == expected(site, "task2", "user hello world answer", 8, "{text}")
    assert reply.choices[0].message.role == "assistant"


def test_chat_max_completion_tokens_caps_the_answer_as_max_tokens_does(site, client):
    """OpenAI's newer name for max_tokens in chat: the same cap, checked against `generate` with that many tokens;
    given both, max_completion_tokens is the one read (OpenAI deprecates max_tokens in its favour)."""
    messages = [{"role": "user", "content": "the red cat"}]
    rendered = "user the red cat answer"  # the test's chat template's rendering of this conversation
    free = client.chat.completions.create(model="task3", messages=messages, max_tokens=20, temperature=0)
    assert free.usage.completion_tokens > 7, "the random model ended too early for this test"
    args = dict(model="task3", messages=messages, temperature=0)
    for asked in [dict(max_completion_tokens=4), dict(max_completion_tokens=4, max_tokens=7),
                  dict(max_completion_tokens=7, max_tokens=4)]:  # fmt: skip
        cap = asked["max_completion_tokens"]
        reply = client.chat.completions.create(**args, **asked)
        assert reply.choices[0].message.content == expected(site, "task3", rendered, cap, "{text}"), asked
        assert reply.usage.completion_tokens == cap and reply.choices[0].finish_reason == "length", asked
        plain = client.chat.completions.create(**args, max_tokens=cap)
        assert plain.choices[0].message.content == reply.choices[0].message.content, asked
    with pytest.raises(openai.BadRequestError, match="must be between 1 and 64, got 65"):  # the server's limit
        client.chat.completions.create(**args, max_completion_tokens=65, max_tokens=4)


def test_a_template_of_several_fields_takes_raw_text_only(site, client):
    with pytest.raises(openai.BadRequestError, match='has 2 fields: one text cannot fill them.*"raw": true'):
        client.completions.create(model="two", prompt="red dog", max_tokens=4)
    text = TWO_FIELDS.format(context="the cat", question="red dog")
    reply = client.completions.create(model="two", prompt=text, max_tokens=6, temperature=0, extra_body={"raw": True})
    assert reply.choices[0].text == expected(site, "two", text, 6, "{text}")


def test_streaming_gives_the_same_text(site, client):
    full = client.completions.create(model="task4", prompt="the cat", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="task4", prompt="the cat", max_tokens=12, temperature=0,
                                            stream=True))  # fmt: skip
    assert len(chunks) > 2, "one chunk per token"
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text == expected(site, "task4", "the cat", 12)
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    messages = [{"role": "user", "content": "red dog"}]
    chat = client.chat.completions.create(model="task5", messages=messages, max_tokens=8, temperature=0)
    parts = client.chat.completions.create(model="task5", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == chat.choices[0].message.content


def test_stop_strings_cut_the_text_streamed_or_not(site, client):
    free = expected(site, "task7", "good film", 16)
    words = free.split()
    assert len(words) >= 6, "the random model ended too early for this test"
    stop = " ".join(words[3:5])
    want = expected(site, "task7", "good film", 16, stop=[stop, "zzz"])
    assert want == decode_new(site["backbone"].tokenizer, site["backbone"].tokenizer(free)["input_ids"][:3])
    reply = client.completions.create(model="task7", prompt="good film", max_tokens=16, temperature=0,
                                      stop=[stop, "zzz"])  # fmt: skip
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="task7", prompt="good film", max_tokens=16, temperature=0,
                                       stop=stop, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want


def test_n_and_seed(site, client):
    args = dict(model="task1", prompt="this movie", max_tokens=10, temperature=1.0)
    one = client.completions.create(**args, seed=7)
    assert one.choices[0].text == expected(site, "task1", "this movie", 10, temperature=1.0, seed=7)
    three = client.completions.create(**args, n=3, seed=7)
    texts = [c.text for c in sorted(three.choices, key=lambda c: c.index)]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [expected(site, "task1", "this movie", 10, temperature=1.0, seed=7 + j) for j in range(3)]
    assert [c.text for c in client.completions.create(**args, n=3, seed=7).choices] == texts  # reproducible
    streamed = ["", "", ""]
    for chunk in client.completions.create(**args, n=3, seed=7, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    nucleus = client.completions.create(**args, top_p=1e-6, seed=3)  # the nucleus is the top token alone
    assert nucleus.choices[0].text == expected(site, "task1", "this movie", 10)


def test_classification_prompt_answers_with_its_best_label(site, client):
    backbone, tok = site["backbone"], site["backbone"].tokenizer
    embeddings = site["made"]["sentiment"].embeddings.detach()
    label_ids = [tok(" " + label, add_special_tokens=False)["input_ids"] for label in LABELS]
    rng = random.Random(2)
    texts = [sentence(rng, 3) for _ in range(4)]
    reply = client.completions.create(model="sentiment", prompt=texts, max_tokens=4, temperature=0)
    for text, c in zip(texts, sorted(reply.choices, key=lambda c: c.index)):
        ids = tok(CLS_TEMPLATE.replace("{text}", text))["input_ids"]
        scores = [reference_label_logprob(backbone, "prompt", embeddings, ids, w) for w in label_ids]
        assert c.text == LABELS[scores.index(max(scores))]
    chat = client.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": texts[0]}])
    assert chat.choices[0].message.content == sorted(reply.choices, key=lambda c: c.index)[0].text


def test_limits_and_mistakes_answer_4xx_and_the_server_stays_up(server, client):
    cases = [
        (openai.BadRequestError, "more than this server's limit of 40",
         dict(model="task0", prompt=" ".join(["good"] * 45), max_tokens=4)),
        (openai.BadRequestError, "max_tokens must be between 1 and 64", dict(model="task0", prompt="a", max_tokens=65)),
        (openai.BadRequestError, "n must be between 1 and 4", dict(model="task0", prompt="a", n=5)),
        (openai.BadRequestError, "temperature must be between 0 and 2", dict(model="task0", prompt="a", temperature=3)),
        (openai.BadRequestError, "logprobs is not supported", dict(model="task0", prompt="a", logprobs=2)),
        (openai.NotFoundError, "The model 'nope' does not exist", dict(model="nope", prompt="a")),
        # 124 rows could never fit the queue (--max-queue 120): too large (400), not busy (429, retry later)
        (openai.BadRequestError, r"needs 124 rows \(31 prompt\(s\) x n=4\), more than this server takes in one "
         r"request \(120\)", dict(model="task0", prompt=["good"] * 31, n=4)),
        (openai.BadRequestError, r"seed must be between 0 and 9223372036854775803, got 18446744073709551616",
         dict(model="task0", prompt="a", seed=2**64)),
        (openai.BadRequestError, "seed must be between 0", dict(model="task0", prompt="a", seed=-1)),
        (openai.BadRequestError, r"has token ids outside the vocabulary \(0 to 127\): \[-1\]",
         dict(model="task0", prompt=[5, -1, 6])),
        (openai.BadRequestError, r"prompt 1 has token ids outside the vocabulary \(0 to 127\): \[128, 1000000\]",
         dict(model="tiny", prompt=[[5], [5, 128, 1000000]])),
    ]  # fmt: skip
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            client.completions.create(**args)
    status, text = http(server, "/v1/completions", "POST", body=b"{not json")
    assert status == 400 and "Invalid request" in json.loads(text)["error"]["message"]
    status, text = http(server, "/v1/completions", "POST", body=json.dumps({"model": "task0"}).encode())
    assert status == 400 and "prompt: Field required" in json.loads(text)["error"]["message"]
    assert http(server, "/v1/nothing")[0] == 404
    assert http(server, "/health", key=None)[0] == 200 and server["process"].poll() is None


def test_api_key_guards_everything_but_health(server):
    bad = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Invalid or missing API key"):
        bad.completions.create(model="task0", prompt="a", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    body = json.dumps({"model": "task0", "prompt": "a", "max_tokens": 2}).encode()
    for key in (None, "wrong"):
        assert http(server, "/v1/completions", "POST", key=key, body=body)[0] == 401
        assert http(server, "/v1/models", key=key)[0] == 401
        assert http(server, "/metrics", key=key)[0] == 401
        assert http(server, "/admin/reload", "POST", key=key)[0] == 401
    assert http(server, "/health", key=None)[0] == 200
    assert http(server, "/v1/completions", "POST", body=body)[0] == 200


def test_reload_adds_changes_and_removes_prompts(site, server, client):
    prompts = site["root"] / "prompts"
    shutil.copytree(site["root"] / "spare" / "late", prompts / "late")
    shutil.copytree(site["root"] / "spare" / "late", prompts / "broken")
    weights = prompts / "broken" / "prompt.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    try:
        status, text = http(server, "/admin/reload", "POST")
        report = json.loads(text)
        assert status == 200 and report["loaded"] == ["late"] and "corrupted or truncated" in report["errors"]["broken"]
        assert "late" in {m.id for m in client.models.list()} and "broken" not in {m.id for m in client.models.list()}
        reply = client.completions.create(model="late", prompt="one two", max_tokens=8, temperature=0)
        assert reply.choices[0].text == expected(site, "late", "one two", 8)
        for name in ("config.json", "prompt.safetensors"):  # the folder now holds task0's prompt
            shutil.copyfile(prompts / "task0" / name, prompts / "late" / name)
        assert json.loads(http(server, "/admin/reload", "POST")[1])["loaded"] == ["late"]
        reply = client.completions.create(model="late", prompt="one two", max_tokens=8, temperature=0)
        assert reply.choices[0].text == expected(site, "task0", "one two", 8)
    finally:
        shutil.rmtree(prompts / "late")
        shutil.rmtree(prompts / "broken")
    report = json.loads(http(server, "/admin/reload", "POST")[1])
    assert report["unloaded"] == ["late"] and not report["errors"] and not report["loaded"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="one two", max_tokens=2)


def test_100_concurrent_requests_over_8_prompts(site, server, client):
    rng = random.Random(3)
    jobs = [(GEN_PROMPTS[i % 8], sentence(rng, rng.randint(1, 6)), 4 + i % 13) for i in range(100)]

    def ask(job):
        name, text, max_tokens = job
        return client.completions.create(model=name, prompt=text, max_tokens=max_tokens, temperature=0).choices[0]

    with ThreadPoolExecutor(max_workers=100) as pool:
        replies = list(pool.map(ask, jobs))
    for (name, text, max_tokens), reply in zip(jobs, replies):
        assert reply.text == expected(site, name, text, max_tokens), (name, text, max_tokens)
    assert sum(len(r.text) > 0 for r in replies) > 80, "too many empty answers to test anything"
    assert http(server, "/health", key=None)[0] == 200 and server["process"].poll() is None
    metrics = dict(line.rsplit(" ", 1) for line in http(server, "/metrics")[1].splitlines() if line[:1] != "#")
    assert float(metrics["softprompt_rows_joined_running_total"]) > 0  # rows joined mid-generation
    assert float(metrics['softprompt_batch_size_bucket{le="8"}']) < float(metrics["softprompt_batch_size_count"])
    assert float(metrics['softprompt_requests_total{endpoint="/v1/completions",status="200"}']) >= 100
    assert float(metrics["softprompt_generated_tokens_total"]) >= sum(len(r.text.split()) for r in replies)
    assert float(metrics["softprompt_queue_depth"]) == 0
