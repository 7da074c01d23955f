"""The playground page (`GET /`, static files in softprompt/serve/static/) in a real headless Chromium driven by
Selenium, against a server on loopback over a tiny model with two prompts (prompt tuning for classification, prefix
tuning for generation): the page lists the prompts with their details, sends one text to both prompts and the base
model, and each answer it shows is the one the API gives for that request (the test asks the API itself). With an
API key the page asks for it, says clearly when it is wrong, and sends it as a header only. No console errors.

Chromium and chromedriver come from Debian's packages (scripts/setup_browser.sh installs them); without them this test
fails, it does not skip."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import uvicorn
from safetensors.torch import load_file
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from softprompt import artifact
from softprompt.artifact import inspection
from softprompt.config import TaskConfig
from softprompt.serve.app import Api, create_app
from softprompt.serve.engines.base import EngineConfig
from softprompt.serve.engines.local import LocalEngine
from softprompt.serve.jobs import Limits
from softprompt.serve.registry import Registry
from softprompt.serve.vllm_embeds import InputEmbeddings

from conftest import random_prompt as build
from conftest import tiny_backbone, tiny_tokenizer

KEY = "playground-key-42"
GEN_TEMPLATE = "question {text} answer"
CLS_TEMPLATE = "review {text} sentiment"
LABELS = ["negative", "positive"]
TRAINING = {"steps": 12, "last_step": 10, "best_step": 8, "stopped_early": True,
            "valid": {"accuracy": 0.75, "macro_f1": 0.7, "n": 4}}  # fmt: skip
TEXT = "this movie was great fun"
MAX_TOKENS = 12


def wait_until(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {seconds} s: {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny Llama and two artifacts: "sentiment" (classification, prompt tuning, with a training summary) and
    "writer" (generation, prefix tuning, none)."""
    root = tmp_path_factory.mktemp("playground")
    backbone = tiny_backbone("llama", seed=4)
    cls = TaskConfig(template=CLS_TEMPLATE, labels=LABELS, label_field="label")
    gen = TaskConfig(template=GEN_TEMPLATE, task="generation", target_field="answer")
    artifact.save(root / "prompts" / "sentiment", build(backbone, "prompt", 3, 35), cls, backbone, training=TRAINING)
    artifact.save(root / "prompts" / "writer", build(backbone, "prefix", 2, 11), gen, backbone)
    registry = Registry(backbone, "tiny", root / "prompts")
    registry.reload(strict=True)
    engine = LocalEngine(backbone, EngineConfig(max_batch=8, max_queue=32)).start()
    try:
        yield dict(root=root, backbone=backbone, registry=registry, engine=engine)
    finally:
        engine.stop()


class Server:
    """The app on uvicorn in a thread of this process, on a free loopback port (the engine is the site's; the registry
    too unless one is given)."""

    def __init__(self, site, api_key: str | None = None, registry: Registry | None = None):
        limits = Limits(max_prompt_tokens=40, max_tokens=64, max_n=2)
        app = create_app(registry or site["registry"], site["engine"], limits, api_key)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)  # fmt: skip
        self.server, self.key = uvicorn.Server(config), api_key
        self.thread = threading.Thread(target=self.server.run, name="playground-uvicorn", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        assert self.server.started, "the server did not start"
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def call(self, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict | str]:
        """(status, parsed JSON or text) of a request with `key` (default: the server's own)."""
        request = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                         method="GET" if body is None else "POST")  # fmt: skip
        if key or self.key:
            request.add_header("Authorization", f"Bearer {key or self.key}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw, kind = response.status, response.read().decode(), response.headers["content-type"]
        except urllib.error.HTTPError as error:
            status, raw, kind = error.code, error.read().decode(), error.headers["content-type"]
        return status, json.loads(raw) if kind.startswith("application/json") else raw

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def server(site):
    s = Server(site)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(site):
    s = Server(site, KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver (no download: both paths given), its console log kept."""
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail("the playground test needs Chromium and chromedriver on PATH: run scripts/setup_browser.sh (it "
                    "installs Debian's chromium and chromium-driver), or `apt-get install chromium chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def errors(driver) -> list[dict]:
    """The console's errors since the last call (reading the log empties it)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def by_model(driver, selector: str) -> dict:
    """The elements `selector` finds, by their data-model (prompt cards, answers), in page order."""
    return {e.get_attribute("data-model"): e for e in driver.find_elements(By.CSS_SELECTOR, selector)}


def answer_states(driver) -> list[str]:
    return [a.get_attribute("data-state") for a in driver.find_elements(By.CSS_SELECTOR, "#answers .answer")]


def field(card, name: str) -> str:
    return card.find_element(By.CSS_SELECTOR, f'[data-field="{name}"]').text


def text_of(element) -> str:
    return element.get_property("textContent")


def screenshot(driver, path, width: int) -> None:
    """The whole page at `width` (the window grown to the page's height), as a PNG."""
    driver.set_window_size(width, 1000)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(height + 140, 4000))  # + the window's frame, which headless Chromium counts
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def test_static_files_are_open_and_the_details_endpoint_says_what_inspect_says(site, keyed):
    for path in ("/", "/ui", "/static/app.js", "/static/style.css"):
        status, body = keyed.call(path, key="wrong")  # the page's own files need no key, and hold no data
        assert status == 200 and body, path
    status, page = keyed.call("/")
    assert 'data-auth="required"' in page and "{{auth}}" not in page
    assert keyed.call("/v1/prompts/sentiment", key="wrong")[0] == 401  # what the server knows needs the key
    status, details = keyed.call("/v1/prompts/sentiment")
    folder = site["root"] / "prompts" / "sentiment"
    assert status == 200 and details == {"id": "sentiment", "object": "prompt",
                                         **inspection.describe(artifact.load(folder), folder, site["backbone"])}
    assert details["training"] == TRAINING and len(details["nearest_tokens"]) == 3
    status, writer = keyed.call("/v1/prompts/writer")
    assert status == 200 and writer["method"] == "prefix" and "nearest_tokens" not in writer
    status, body = keyed.call("/v1/prompts/tiny")
    assert status == 404 and "bare base model" in body["error"]["message"]
    status, body = keyed.call("/v1/prompts/nothing")
    assert status == 404 and "does not exist" in body["error"]["message"]


def test_details_of_a_prompt_changed_on_disk_wait_for_a_reload(site, tmp_path):
    for name in ("mood", "gone"):
        shutil.copytree(site["root"] / "prompts" / "sentiment", tmp_path / "prompts" / name)
    registry = Registry(site["backbone"], "tiny", tmp_path / "prompts")
    registry.reload(strict=True)
    server = Server(site, registry=registry)
    try:
        assert server.call("/v1/prompts/mood")[1]["training"] == TRAINING  # described, and kept for the next call
        config = tmp_path / "prompts" / "mood" / artifact.CONFIG
        config.write_text(config.read_text().replace('"best_step": 8', '"best_step": 9.0'))
        shutil.rmtree(tmp_path / "prompts" / "gone")
        for name in ("mood", "gone"):  # what is served is the version loaded, no longer what the files say
            status, body = server.call(f"/v1/prompts/{name}")
            assert status == 409 and "changed on disk since it was loaded" in body["error"]["message"], name
            assert "POST /admin/reload" in body["error"]["message"]
        report = server.call("/admin/reload", {})[1]
        assert report["loaded"] == ["mood"] and report["unloaded"] == ["gone"]
        status, details = server.call("/v1/prompts/mood")
        assert status == 200 and details["training"]["best_step"] == 9
        assert server.call("/v1/prompts/gone")[0] == 404
    finally:
        server.close()


def nearest_by_hand(vectors: torch.Tensor, table: torch.Tensor, tokenizer, k: int = 5) -> list[list[str]]:
    """The k tokens of `table` (vocab, hidden) of highest cosine with each row of `vectors`, computed here (the pad
    token's row is zero: its cosine is 0, not 0/0)."""
    unit = lambda m: m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    cosines = unit(vectors) @ unit(table).T
    return [[tokenizer.decode([i]) for i in row] for row in cosines.topk(k, dim=-1).indices.tolist()]


def test_in_front_of_vllm_the_details_read_the_fronts_embedding_table(site, tmp_path):
    """`serve --vllm-url` holds no model, only its input embeddings: the nearest tokens come from that table. The
    front's model (seed 9) is another than the engine's (the site's, seed 4), so reading the wrong table shows."""
    front_model = tiny_backbone("llama", seed=9)
    front_model.model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    folder = tmp_path / "prompts" / "sentiment"
    cls = TaskConfig(template=CLS_TEMPLATE, labels=LABELS, label_field="label")
    artifact.save(folder, build(front_model, "prompt", 3, 35), cls, front_model)
    front = InputEmbeddings.load(str(tmp_path / "tiny"))
    registry = Registry(front, str(tmp_path / "tiny"), tmp_path / "prompts")
    assert registry.reload(strict=True)["loaded"] == ["sentiment"]
    api = Api(registry, site["engine"], Limits(), None)
    vectors = load_file(folder / artifact.WEIGHTS)["prompt_embeddings"].float()  # the saved soft tokens, read here
    tokenizer, table = tiny_tokenizer(), front_model.model.get_input_embeddings().weight.detach()
    expected = nearest_by_hand(vectors, table, tokenizer)
    engines = nearest_by_hand(vectors, site["backbone"].model.get_input_embeddings().weight.detach(), tokenizer)
    assert expected != engines, "both tables give the same nearest tokens: the test could not tell them apart"
    assert api.prompt_details("sentiment")["nearest_tokens"] == expected


def test_page_lists_the_prompts_and_answers_as_the_api_does(site, server, browser, tmp_path):
    browser.set_window_size(1280, 1000)
    browser.get(server.url + "/")
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, '#prompt-cards .card[data-loaded="true"]')) == 2,
               "both prompts' details on the page")  # fmt: skip
    assert browser.title == "softprompt playground" and not visible(browser, "key-form")
    assert "Base model tiny, 2 prompts" in browser.find_element(By.ID, "server-line").text

    # the prompts and their details
    shown = by_model(browser, "#prompt-cards .card")
    assert set(shown) == {"sentiment", "writer"}
    sentiment, writer = shown["sentiment"], shown["writer"]
    assert [field(sentiment, f) for f in ("method", "task", "template", "labels", "num_virtual_tokens")] == [
        "prompt tuning", "classification", CLS_TEMPLATE, "negative, positive", "3"]  # fmt: skip
    assert [field(writer, f) for f in ("method", "task", "template", "num_virtual_tokens")] == [
        "prefix tuning", "generation", GEN_TEMPLATE, "2"]  # fmt: skip
    size = (site["root"] / "prompts" / "sentiment" / artifact.WEIGHTS).stat().st_size
    assert field(sentiment, "size") == (f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} B")
    assert field(sentiment, "training") == ("10 steps (stopped early); best validation at step 8: accuracy 0.750, "
                                            "macro_f1 0.700 (4 examples)")  # fmt: skip
    assert field(writer, "training") == "not recorded"
    folder = site["root"] / "prompts" / "sentiment"
    expected = inspection.describe(artifact.load(folder), folder, site["backbone"])
    sentiment.find_element(By.CSS_SELECTOR, "details.nearest summary").click()  # open the table
    rows = sentiment.find_elements(By.CSS_SELECTOR, "details.nearest tbody tr")
    table = [[cell.get_attribute("data-token") for cell in row.find_elements(By.CSS_SELECTOR, "td[data-token]")]
             for row in rows]  # fmt: skip
    assert table == expected["nearest_tokens"] and len(table) == 3
    assert float(rows[0].find_element(By.CSS_SELECTOR, "td[data-cosine]").get_attribute("data-cosine")) == (
        expected["nearest_cosines"][0][0])  # fmt: skip
    assert not writer.find_elements(By.CSS_SELECTOR, "details.nearest") and "no nearest vocabulary" in writer.text

    # accessible basics: every input has a label
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, textarea')].filter(e => !e.labels.length).map(e => e.id)")
    assert unlabelled == []

    # one text to both prompts and the base model, sent with Enter from the text box
    targets = browser.find_elements(By.CSS_SELECTOR, "#target-list input:checked")
    assert [box.get_attribute("value") for box in targets] == ["sentiment", "writer", "tiny"]
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    browser.find_element(By.ID, "text").send_keys(TEXT, Keys.ENTER)
    wait_until(lambda: answer_states(browser) == ["done"] * 3, "three answers on the page")
    answers = by_model(browser, "#answers .answer")
    assert list(answers) == ["sentiment", "writer", "tiny"]
    request = dict(prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0)

    status, reply = server.call("/v1/completions", dict(model="sentiment", **request))  # the API's own answer
    assert status == 200
    label, scores = reply["choices"][0]["text"], reply["choices"][0]["label_scores"]
    page = answers["sentiment"]
    assert page.get_attribute("data-label") == label and page.find_element(By.CSS_SELECTOR, ".label-word").text == label
    bars = page.find_elements(By.CSS_SELECTOR, ".bars li")
    assert {b.get_attribute("data-label-word"): float(b.get_attribute("data-logprob")) for b in bars} == scores
    for bar in bars:
        percent = float(bar.find_element(By.CSS_SELECTOR, ".num").text.rstrip("%"))
        assert abs(percent - 100 * math.exp(scores[bar.get_attribute("data-label-word")])) <= 0.051
    assert [b.get_attribute("data-label-word") for b in bars if "chosen" in b.get_attribute("class")] == [label]

    for name in ("writer", "tiny"):
        status, reply = server.call("/v1/completions", dict(model=name, **request))
        assert status == 200
        choice, page = reply["choices"][0], answers[name]
        assert text_of(page.find_element(By.CSS_SELECTOR, ".text")) == choice["text"], name
        assert page.get_attribute("data-finish-reason") == choice["finish_reason"], name
        assert int(page.get_attribute("data-events")) >= 1  # it came as a stream
    assert any(text_of(a.find_element(By.CSS_SELECTOR, ".text")) for a in (answers["writer"], answers["tiny"])), (
        "both generations were empty: nothing was compared")  # fmt: skip
    screenshot(browser, tmp_path / "playground.png", 1280)

    # readable at a phone's width: nothing wider than the window
    browser.set_window_size(390, 900)
    wait_until(lambda: browser.execute_script("return window.innerWidth") < 500, "the narrow window")
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 390 px window"
    screenshot(browser, tmp_path / "playground-narrow.png", 390)
    assert errors(browser) == []


def test_with_an_api_key_the_page_asks_for_it_and_says_when_it_is_wrong(keyed, browser, tmp_path):
    browser.set_window_size(1280, 1000)
    browser.get(keyed.url + "/ui")
    wait_until(lambda: visible(browser, "key-form"), "the key form")
    assert not visible(browser, "prompts") and errors(browser) == []  # asked first: no refused call
    browser.find_element(By.ID, "key").send_keys("not-the-key", Keys.ENTER)
    wait_until(lambda: visible(browser, "notice"), "the wrong key's message")
    message = browser.find_element(By.ID, "notice").text
    assert "The server refused the API key (401 Unauthorized)" in message and "Invalid or missing API key" in message
    assert visible(browser, "key-form") and not visible(browser, "prompts")
    screenshot(browser, tmp_path / "wrong-key.png", 1280)
    refused = errors(browser)
    assert refused and all("401" in e["message"] for e in refused), refused  # the refused call, nothing else

    browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, '#prompt-cards .card[data-loaded="true"]')) == 2,
               "the prompts, with the right key")  # fmt: skip
    assert not visible(browser, "notice") and not visible(browser, "key-form")
    browser.find_element(By.ID, "text").send_keys("great", Keys.ENTER)
    wait_until(lambda: answer_states(browser) == ["done"] * 3, "three answers with the key")
    urls = browser.execute_script("return [location.href, ...performance.getEntriesByType('resource')"
                                  ".map(r => r.name)]")  # fmt: skip
    assert not any(KEY in url for url in urls)  # the key goes as a header, never in a URL
    assert errors(browser) == []
