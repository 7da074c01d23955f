"""Serving through vLLM (`softprompt serve --vllm-url`, `softprompt.serve.vllm_embeds.prompt_embeds`) against a real `vllm serve
--enable-prompt-embeds` process on a loopback port, from the environment scripts/setup_vllm.sh builds (.venv-vllm).
The oracle is our own engine: the same request alone through `softprompt serve` without --vllm-url, or `generate`.
A missing vLLM environment fails these tests; it never skips them."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.data.corpora import sentiment_splits
from softprompt.errors import SoftPromptError
from softprompt.scoring.generate import generate
from softprompt.models import embedded_model_dir, load_model
from softprompt.serve import ServeConfig, build
from softprompt.training.loop import train
from softprompt.serve.vllm_embeds import InputEmbeddings, encode, prompt_embeds

from conftest import free_port, random_prompt, tiny_config, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_SERVE = ROOT / "scripts" / "vllm_serve.sh"
KEY = "front-key"
VLLM_KEY = "vllm-key"
"""vLLM's own key (VLLM_API_KEY, as the README's recipe sets it): the front sends it, nobody else has it."""
GEN_TEMPLATE = "Review: {text}\nIn other words:"
CLS_TEMPLATE = "Review: {text}\nSentiment:"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Vllm:
    """A `vllm serve` process of one model folder on a fixed loopback port; `kill` and `start` again at will."""

    def __init__(self, model: Path, log: Path, max_model_len: int = 2048):
        if not VLLM_PYTHON.exists():
            pytest.fail(f"no vLLM environment at {VLLM_PYTHON.parent.parent}: run `bash scripts/setup_vllm.sh` (the "
                        "README's test command does)")  # fmt: skip
        self.model, self.log, self.port, self.max_model_len = model, log, free_port(), max_model_len
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Vllm":
        """Through scripts/vllm_serve.sh (a fixed context and KV space, as the README's recipe): 1 GiB of KV cache
        and 2,048 positions per sequence for the embedded model, which the long-prompt test exceeds on purpose."""
        command = ["bash", str(VLLM_SERVE), str(self.model), "--served-model-name", "base", "--max-logprobs", "20",
                   "--max-model-len", str(self.max_model_len), "--port", str(self.port)]  # fmt: skip
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_API_KEY": VLLM_KEY}
        self.process = subprocess.Popen(command, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
        if wait:
            self.wait()
        return self

    def wait(self) -> None:
        """Until healthy; if vLLM exits first, fail with its own reason (the last error line it printed) first."""
        deadline = time.monotonic() + 600
        while not healthy(self.url):
            if self.process.poll() is not None:
                log = self.log.read_text()
                reasons = re.findall(r"^.*\b\w*(?:Error|Exception): .*$", log, re.MULTILINE)
                pytest.fail(f"vllm serve exited with {self.process.returncode}: "
                            f"{reasons[-1] if reasons else 'no error line'}\n{log[-4000:]}")  # fmt: skip
            assert time.monotonic() < deadline, f"vllm serve did not come up within 600 s:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the engine core is a child process: the whole group
            self.process.wait(timeout=30)


@contextmanager
def running_vllm(model: Path, log: Path, max_model_len: int):
    server = Vllm(model, log, max_model_len).start()
    try:
        yield server
    finally:
        server.kill()


def greedy_ids(server: Vllm, embeds: torch.Tensor, max_tokens: int, eos: int) -> list[int]:
    """vLLM's greedy token ids after `embeds`, cut at the first EOS (as `generate` ends a row); asked with the
    official openai client, as the README's recipe does."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=VLLM_KEY, max_retries=0, timeout=120)
    reply = client.completions.create(model="base", prompt=None, max_tokens=max_tokens, temperature=0,
                                      extra_body={"prompt_embeds": encode(embeds), "return_token_ids": True,
                                                  "ignore_eos": True})  # fmt: skip
    ids = reply.choices[0].model_extra["token_ids"]
    return ids[: ids.index(eos)] if eos in ids else ids


# ---- prompt_embeds on tiny random models of three architectures ----


def save_vllm_sized(arch: str, folder: Path, seed: int) -> Path:
    """A tiny random model whose heads are 64 wide (vLLM's CPU attention takes 32 to 256), with the tiny tokenizer."""
    config = tiny_config(arch)
    config.update(dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                       intermediate_size=256))  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["qwen3"])  # Llama: the embedded model below; each further one starts vLLM (25 s)
def test_prompt_embeds_give_our_greedy_tokens_on_tiny_models(arch, tmp_path):
    folder = save_vllm_sized(arch, tmp_path / arch, seed=7)
    backbone = backbone_for(*load_model(str(folder)))
    task = TaskConfig(template="question {text} answer", task="generation", target_field="answer")
    for i, n in enumerate([3, 8]):
        artifact.save(tmp_path / f"p{i}", random_prompt(backbone, "prompt", n, seed=20 + i), task, backbone)
    texts = ["one two three", "five six"]
    with running_vllm(folder, tmp_path / "vllm.log", max_model_len=128) as server:  # the tiny config's positions
        compared = 0
        for i in range(2):
            prefix = artifact.prefix_of(artifact.load(tmp_path / f"p{i}"), backbone)
            for text in texts:
                ids = backbone.tokenizer(f"question {text} answer")["input_ids"]
                ours = generate(backbone, [ids], prefix, max_new_tokens=12)[0]
                embeds = prompt_embeds(tmp_path / f"p{i}", text, model=str(folder))
                theirs = greedy_ids(server, embeds, 12, backbone.tokenizer.eos_token_id)
                assert theirs == ours, (arch, i, text)
                compared += len(ours)
        assert compared >= 20, "the random model ended too early for this test"


def test_input_embeddings_read_only_the_table_and_match_the_model(tmp_path):
    folder = tmp_path / "llama"
    tiny_model("llama", seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    backbone = backbone_for(*load_model(str(folder)))
    front = InputEmbeddings.load(str(folder))
    assert front.fingerprint == backbone.fingerprint
    assert torch.equal(front.embed([5, 6, 7]), backbone.embed(torch.tensor([5, 6, 7])))
    saved = random_prompt(backbone, "prompt", 4, seed=2)
    task = TaskConfig(template="question {text} answer", task="generation", target_field="answer")
    artifact.save(tmp_path / "p", saved, task, backbone)
    ids = backbone.tokenizer("question one two answer")["input_ids"]
    explicit = torch.cat([saved.embeddings.detach(), backbone.embed(torch.tensor(ids))])  # [P; E] by hand
    assert torch.equal(prompt_embeds(tmp_path / "p", "one two", model=str(folder)), explicit)
    assert torch.equal(torch.load(io.BytesIO(base64.b64decode(encode(explicit)))), explicit)
    artifact.save(tmp_path / "q", random_prompt(backbone, "prefix", 4, seed=2), task, backbone)
    with pytest.raises(SoftPromptError, match="prefix-tuning artifact: its key/values enter every attention layer"):
        prompt_embeds(tmp_path / "q", "one two", model=str(folder))
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SoftPromptError, match="'gpt2' model; serving through vLLM's prompt_embeds is supported for"):
        InputEmbeddings.load(str(tmp_path / "gpt2"))


# ---- the front on the embedded model ----


@pytest.fixture(scope="module")
def site(real_backbone, tmp_path_factory):
    """Eight generation prompts and one classifier, trained a few steps on Rotten Tomatoes snippets on the embedded
    model, a prefix-tuning artifact kept apart, and our own engine's app over the same prompts (the oracle)."""
    root = tmp_path_factory.mktemp("vllm")
    records = sentiment_splits()["train"][:64]
    settings = lambda seed: TrainConfig(steps=2, batch_size=4, eval_every=0, lr=0.05, seed=seed)  # noqa: E731
    gen = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="label")
    for i in range(8):
        task = TaskEncoder(gen, real_backbone.tokenizer)
        examples = task.encode(records[i * 8 : i * 8 + 8])
        train(real_backbone, task, PromptConfig(method="prompt", num_tokens=4 + 3 * i, init="vocab"), settings(i),
              examples, root / "prompts" / f"gen{i}", progress=False)  # fmt: skip
    cls = TaskEncoder(TaskConfig(template=CLS_TEMPLATE, labels=["negative", "positive"], label_field="label"),
               real_backbone.tokenizer)  # fmt: skip
    train(real_backbone, cls, PromptConfig(method="prompt", num_tokens=10, init="vocab"), settings(8),
          cls.encode(records), root / "prompts" / "sentiment", progress=False)  # fmt: skip
    task = TaskEncoder(gen, real_backbone.tokenizer)
    train(real_backbone, task, PromptConfig(method="prefix", num_tokens=5, init="vocab"), settings(9),
          task.encode(records[:8]), root / "prefix" / "kv", progress=False)  # fmt: skip
    app, engine, _ = build(ServeConfig(prompts=root / "prompts"))
    try:
        yield dict(root=root, ours=TestClient(app, base_url="http://127.0.0.1"))  # keyless: addressed to loopback
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def vllm(site):
    server = Vllm(embedded_model_dir(), site["root"] / "vllm.log").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def front(site, vllm):
    """`softprompt serve --vllm-url` in its own process. Its timeout is generous (100 concurrent requests share 2 cores
    with vLLM); the 504 is tested on a front of its own."""
    port = free_port()
    command = [sys.executable, "-c", "from softprompt.cli import main; main()", "serve", "--prompts",
               str(site["root"] / "prompts"), "--vllm-url", vllm.url, "--vllm-timeout", "300", "--port", str(port),
               "--api-key", KEY, "--max-tokens", "1024", "--max-n", "4"]  # fmt: skip
    log = (site["root"] / "front.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                    "SOFTPROMPT_VLLM_API_KEY": VLLM_KEY})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not healthy(url):
        assert process.poll() is None, (site["root"] / "front.log").read_text()
        assert time.monotonic() < deadline, "the front did not come up within 120 s"
        time.sleep(0.3)
    try:
        yield dict(url=url, process=process, client=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0,
                                                                  timeout=120))  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def ours(site, **body) -> dict:
    """Our own engine's answer to the same request, alone."""
    response = site["ours"].post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def status_of(url: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.real_model
def test_100_concurrent_requests_over_8_prompts_equal_our_engine(site, front):
    rng = random.Random(5)
    records = sentiment_splits()["test"]
    distinct = [(f"gen{i % 8}", rng.choice(records)["text"][:120], 4 + i % 9) for i in range(25)]
    jobs = distinct * 4  # 100 at once; each distinct one asked of our engine alone once (a quarter of the time)

    def ask(job):
        name, text, max_tokens = job
        return front["client"].completions.create(model=name, prompt=text, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(max_workers=100) as pool:
        replies = list(pool.map(ask, jobs))
    expected = {job: ours(site, model=job[0], prompt=job[1], max_tokens=job[2], temperature=0) for job in distinct}
    for job, reply in zip(jobs, replies):
        assert reply.choices[0].text == expected[job]["choices"][0]["text"], job
        assert reply.usage.completion_tokens == expected[job]["usage"]["completion_tokens"]
    assert sum(len(r.choices[0].text) > 0 for r in replies) > 90


@pytest.mark.real_model
def test_streaming_n_stop_seed_auth_and_mistakes_behave_as_our_engine(site, front):
    client, text = front["client"], "A joyless, plodding mess of a film."
    plain = client.completions.create(model="gen3", prompt=text, max_tokens=20, temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="gen3", prompt=text, max_tokens=20,
                                                                            temperature=0, stream=True))  # fmt: skip
    assert streamed == plain == ours(site, model="gen3", prompt=text, max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = plain.strip().split()[2]  # a word the answer holds
    cut = client.completions.create(model="gen3", prompt=text, max_tokens=20, temperature=0, stop=[stop]).choices[0]
    reference = ours(site, model="gen3", prompt=text, max_tokens=20, temperature=0, stop=[stop])["choices"][0]
    assert (cut.text, cut.finish_reason) == (reference["text"], "stop") and stop not in cut.text
    sample = lambda seed: [c.text for c in client.completions.create(model="gen5", prompt=text, max_tokens=12, n=3,  # noqa: E731
                                                                      temperature=1.0, seed=seed).choices]
    first = sample(7)
    assert len(first) == 3 and first == sample(7) and first != sample(8)
    assert len(set(first)) > 1  # each choice its own seed (seed + index), as in our engine
    assert status_of(front["url"], "/v1/models", key=None)[0] == 401
    assert status_of(front["url"], "/v1/models", key="wrong")[0] == 401
    code, body = status_of(front["url"], "/v1/completions", {"model": "nope", "prompt": "x"})
    assert code == 404 and "does not exist" in body["error"]["message"]
    code, body = status_of(front["url"], "/v1/completions", {"model": "gen0", "prompt": "x", "max_tokens": 10**6})
    assert code == 400 and "max_tokens must be between 1 and 1024" in body["error"]["message"]
    models = {m.id for m in client.models.list().data}
    assert {f"gen{i}" for i in range(8)} | {"sentiment"} <= models


@pytest.mark.real_model
def test_classification_answers_equal_our_engine(site, front):
    texts = [r["text"] for r in sentiment_splits()["test"][:12]]
    for text in texts:
        theirs = front["client"].completions.create(model="sentiment", prompt=text).choices[0]
        expected = ours(site, model="sentiment", prompt=text)["choices"][0]
        assert theirs.text == expected["text"]
        for label, score in expected["label_scores"].items():
            assert abs(theirs.model_extra["label_scores"][label] - score) < 1e-3


@pytest.mark.real_model
def test_prefix_artifacts_are_refused_at_load(site, vllm):
    with pytest.raises(SoftPromptError, match="kv is a prefix-tuning artifact.*vLLM takes input embeddings only.*"
                                              "without --vllm-url"):
        build(ServeConfig(prompts=site["root"] / "prefix", vllm_url=vllm.url, vllm_api_key=VLLM_KEY))


@pytest.mark.real_model
def test_a_dead_backend_gives_503_and_service_returns_by_itself(site, vllm, front):
    url, client = front["url"], front["client"]
    # 1,000 tokens to go when vLLM is killed after the first: the stream cannot have ended by itself
    body = {"model": "gen1", "prompt": "An unexpected delight.", "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as stream:
        first = stream.readline()  # the stream is running in vLLM
        assert first.startswith(b"data: ")
        vllm.kill()
        rest = stream.read().decode()  # ends, with an error event, instead of hanging (urlopen's timeout says)
    assert '"error"' in rest and "vLLM backend" in rest
    code, answer = status_of(url, "/v1/completions", {"model": "gen1", "prompt": "Fine.", "max_tokens": 4})
    assert code == 503 and "unreachable" in answer["error"]["message"]
    code, health = status_of(url, "/health", key=None)
    assert code == 503 and health["backend"] == {"engine": "vllm", "status": "unavailable"}  # no address, no detail
    code, health = status_of(url, "/health")  # with our key: where vLLM is, and what is wrong
    assert code == 503 and health["backend"]["url"] == vllm.url and "unreachable" in health["backend"]["detail"]
    assert front["process"].poll() is None  # the front is still up
    vllm.start()  # the same port; nothing is done to the front
    reply = client.completions.create(model="gen1", prompt="Fine.", max_tokens=4, temperature=0).choices[0]
    assert reply.text == ours(site, model="gen1", prompt="Fine.", max_tokens=4, temperature=0)["choices"][0]["text"]
    assert status_of(url, "/health", key=None)[0] == 200


@pytest.mark.real_model
def test_a_request_vllm_refuses_gives_400_with_its_reason(front):
    """2,037 text tokens behind gen7's 25 soft tokens: more than vLLM's 2,048 positions (vLLM shortens max_tokens
    to fit, but not the prompt), though within our prompt limit and the model's context. vLLM's 400, with its reason."""
    too_long = {"model": "gen7", "prompt": " ".join(["good"] * 2030), "max_tokens": 4, "temperature": 0}
    code, body = status_of(front["url"], "/v1/completions", too_long)
    assert code == 400, (code, body)
    message = body["error"]["message"]
    assert "vLLM backend" in message and "answered 400" in message and "2048" in message, message


@pytest.mark.real_model
def test_a_silent_backend_gives_504(site, vllm):
    """vLLM stopped (SIGSTOP: its port still accepts connections, nothing answers) past --vllm-timeout: 504."""
    app, engine, _ = build(ServeConfig(prompts=site["root"] / "prompts", vllm_url=vllm.url, vllm_timeout=2,
                                       vllm_api_key=VLLM_KEY))  # fmt: skip
    try:
        os.killpg(vllm.process.pid, signal.SIGSTOP)
        try:
            response = TestClient(app, base_url="http://127.0.0.1").post(
                "/v1/completions", json={"model": "gen0", "prompt": "Fine.", "max_tokens": 4})
        finally:
            os.killpg(vllm.process.pid, signal.SIGCONT)
        assert response.status_code == 504, response.text
        assert "sent nothing for 2" in response.json()["error"]["message"]
    finally:
        engine.stop()
