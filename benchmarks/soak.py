"""Load and faults, measured (issue 26): `softprompt serve` on loopback under concurrent clients over several prompts
for a bounded time, twice: the well-behaved clients alone, then the same clients beside hostile ones while the
prompts are reloaded every few seconds (one of them rewritten each time). With --vllm, both runs go through a front
to a `vllm serve` that is killed and restarted midway through the hostile run.

- Model: the embedded SmolLM2-135M (float32, CPU); --prompts prompt-tuning artifacts (vocabulary-initialized, 8 to
  20 virtual tokens, untrained: the work does not depend on their values) with a generation template, and the bare
  model: each request picks one of them.
- Well-behaved clients: one request after another, 16 greedy tokens of a short text, every other one streamed; their
  latency is from sending to the last byte.
- Hostile clients, each cycling through: a 100 KB stop string on `stream=true, n=16, max_tokens=512`; a 50 MB body
  (declared, 64 KiB of it sent); a chunked body with no length, sent until the server answers; a stream dropped
  after its first events; a slow reader (200 bytes a second of an n=4 stream, for 15 s); a request of more rows
  than the queue; bytes that are not JSON.
- Reported per run: requests answered, errors by kind (client kind and status; `conn` a connection that failed),
  p50/p99 latency of the well-behaved clients, the server's resident memory (vLLM's too, with --vllm) sampled every
  second (start, peak, end), and whether the server was healthy and idle at the end.

    python benchmarks/soak.py --seconds 60             # the README's table
    python benchmarks/soak.py --seconds 10 --clients 4 # a smoke check
    python benchmarks/soak.py --seconds 60 --vllm      # the front, with vLLM killed and restarted

Loopback only: every server this starts listens on 127.0.0.1, with an API key.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/soak.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.completions import ROOT, free_port, wait_healthy  # noqa: E402
from benchmarks.common.machine import log, print_facts, quiet_process  # noqa: E402
from benchmarks.common.serving import percentile, request_text  # noqa: E402

KEY = "soak-key"
VLLM_KEY = "soak-vllm-key"
TEMPLATE = "Review: {text}\nIn other words:"


# ------------------------------------------------------------------------------------------------ the setting
def make_prompts(folder: Path, count: int) -> list[str]:
    """`count` prompt-tuning artifacts in `folder`, and two spare versions of the first one (`spare-a`, `spare-b`,
    beside `folder`) that the reloader swaps in; returns the model ids (the prompts', then the bare model's)."""
    from benchmarks.common.model import EMBEDDED, embedded_backbone, vocab_prompt
    from softprompt import artifact
    from softprompt.config import TaskConfig

    backbone = embedded_backbone()
    task = TaskConfig(template=TEMPLATE, task="generation", target_field="answer")
    for i in range(count):
        artifact.save(folder / f"p{i}", vocab_prompt(backbone, "prompt", 8 + 4 * i, seed=i), task, backbone)
    for i, spare in enumerate(("spare-a", "spare-b")):
        artifact.save(folder.parent / spare, vocab_prompt(backbone, "prompt", 8, seed=100 + i), task, backbone)
    return [f"p{i}" for i in range(count)] + [EMBEDDED]


class Process:
    """A server process of ours or vLLM's, in its own session (so a kill takes its children too)."""

    def __init__(self, command: list[str], env: dict, log_path: Path, url: str):
        self.command, self.env, self.log_path, self.url = command, env, log_path, url
        self.process: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log_path.open("a"),
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_healthy(self.url, self.process, self.log_path, seconds=600)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)

    def rss_mb(self) -> float:
        """Resident memory of the process and its children, MB (0 while it is down)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return 0.0
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.Error:
            return 0.0


def start_servers(work: Path, prompts: Path, vllm: bool) -> tuple[Process, Process | None]:
    """Our server (a front to a fresh vLLM with `vllm`), healthy; the keys come from the environment, as the README
    recommends."""
    from benchmarks.common.model import EMBEDDED
    from softprompt.models import embedded_model_dir

    env = {**os.environ, "SOFTPROMPT_API_KEY": KEY, "SOFTPROMPT_VLLM_API_KEY": VLLM_KEY, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_API_KEY": VLLM_KEY, "VLLM_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    backend = None
    if vllm:
        port = free_port()
        command = ["bash", str(ROOT / "scripts" / "vllm_serve.sh"), str(embedded_model_dir()), "--served-model-name",
                   "base", "--port", str(port)]  # fmt: skip
        backend = Process(command, env, work / "vllm.log", f"http://127.0.0.1:{port}").start()
    port = free_port()
    command = [sys.executable, "-c", "from softprompt.cli import main; main()", "serve", "--model", EMBEDDED,
               "--dtype", "float32", "--prompts", str(prompts), "--port", str(port), "--request-timeout", "30",
               *(["--vllm-url", backend.url] if backend else [])]  # fmt: skip
    return Process(command, env, work / "server.log", f"http://127.0.0.1:{port}").start(), backend


# ------------------------------------------------------------------------------------------------ the clients
@dataclass
class Tally:
    """What the clients of one run saw."""

    outcomes: collections.Counter = field(default_factory=collections.Counter)
    """(client kind, status or "conn") -> count."""
    latencies: list[float] = field(default_factory=list)
    """Seconds of each well-behaved request answered 200."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[kind, status] += 1
            if seconds is not None and status == 200:
                self.latencies.append(seconds)


class Clock:
    """When a run's clients stop: `seconds` after its start, and not while a fault it injected is being repaired
    (`hold`; the clients then see the repair through, for `after` seconds more)."""

    def __init__(self, seconds: float):
        self.end, self.held = time.monotonic() + seconds, False

    def over(self, margin: float = 0.0) -> bool:
        return not self.held and time.monotonic() + margin > self.end

    def hold(self) -> None:
        self.held = True

    def release(self, after: float) -> None:
        self.end, self.held = max(self.end, time.monotonic() + after), False


def post(port: int, body: bytes, timeout: float = 120, read=None) -> tuple[int, bytes | None]:
    """POST /v1/completions with the key; `read(response)` reads the answer (default: all of it). The status and
    what `read` returned."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {KEY}"})  # fmt: skip
        response = connection.getresponse()
        return response.status, (read or (lambda r: r.read()))(response)
    finally:
        connection.close()


def polite(port: int, models: list[str], tally: Tally, clock: Clock, seed: int) -> None:
    for i in itertools.count(seed * 1000):
        if clock.over():
            return
        body = {"model": models[i % len(models)], "prompt": request_text(i), "max_tokens": 16, "temperature": 0,
                "stream": i % 2 == 1}  # fmt: skip
        start = time.monotonic()
        try:
            status, answer = post(port, json.dumps(body).encode())
            status = "error event" if status == 200 and b'data: {"error"' in answer else status
        except OSError:
            status = "conn"
        tally.add("well-behaved", status, time.monotonic() - start)


def raw_upload(port: int, declared: int | None) -> int:
    """A body over any limit on a raw socket: `declared` bytes announced (64 KiB sent), or chunked with no length
    until the server answers. The status the server answered with."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        length = f"Content-Length: {declared}" if declared else "Transfer-Encoding: chunked"
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\n{length}\r\n\r\n".encode())  # fmt: skip
        answer = b""
        try:
            for _ in range(1 if declared else 1600):
                sock.sendall(b"x" * 65536 if declared else b"10000\r\n" + b"x" * 65536 + b"\r\n")
            answer = sock.recv(64)
        except OSError:
            answer = answer or sock.recv(64)
        return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "conn"


def drop_after_events(response) -> None:
    response.read(300)  # the first events; the connection then closes unread


def read_slowly(response, seconds: float = 15) -> None:
    """200 bytes a second, for `seconds` at most (then the client leaves; most of the stream may still be waiting
    in the sockets' buffers, sent long before)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until and response.read(200):
        time.sleep(1.0)


def hostile(port: int, models: list[str], tally: Tally, clock: Clock, seed: int) -> None:
    gen = {"model": models[0], "prompt": "A joyless, plodding mess.", "ignore_eos": True, "stream": True}
    attacks = [
        ("huge stop", lambda: post(port, json.dumps({**gen, "n": 16, "max_tokens": 512,
                                                      "stop": ["z" * 100_000]}).encode())[0]),
        ("huge body", lambda: raw_upload(port, 50 << 20)),
        ("chunked body", lambda: raw_upload(port, None)),
        ("dropped stream", lambda: post(port, json.dumps({**gen, "max_tokens": 256}).encode(),
                                        read=drop_after_events)[0]),
        ("slow reader", lambda: post(port, json.dumps({**gen, "n": 4, "max_tokens": 128}).encode(), timeout=300,
                                     read=read_slowly)[0]),
        ("too many rows", lambda: post(port, json.dumps({**gen, "prompt": ["a"] * 64, "n": 16}).encode())[0]),
        ("not JSON", lambda: post(port, b"\xff{" * 100)[0]),
    ]  # fmt: skip
    for i in itertools.count(seed):
        if clock.over():
            return
        kind, attack = attacks[i % len(attacks)]
        try:
            status = attack()
        except OSError:
            status = "conn"
        tally.add(kind, status)


# ------------------------------------------------------------------------------------------------ the faults
def reloader(port: int, prompts: Path, tally: Tally, clock: Clock) -> None:
    """Every 3 s: swap the first prompt's files for a spare version, then POST /admin/reload."""
    for i in itertools.count():
        if clock.over(margin=3):
            return
        time.sleep(3)
        spare = prompts.parent / ("spare-a", "spare-b")[i % 2]
        for name in os.listdir(spare):
            shutil.copyfile(spare / name, prompts / "p0" / f".{name}.tmp")
            os.replace(prompts / "p0" / f".{name}.tmp", prompts / "p0" / name)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            connection.request("POST", "/admin/reload", b"", {"Authorization": f"Bearer {KEY}"})
            response = connection.getresponse()
            report = json.loads(response.read())
            tally.add("reload", response.status if report.get("loaded") == ["p0"] else "reloaded nothing")
        except OSError:
            tally.add("reload", "conn")
        finally:
            connection.close()


def vllm_outage(backend: Process, tally: Tally, clock: Clock, at: float) -> None:
    """Kill vLLM `at` (a monotonic time) and start it again; the clients go on until 10 s after it is back."""
    time.sleep(max(0.0, at - time.monotonic()))
    clock.hold()
    start = time.monotonic()
    backend.kill()
    time.sleep(2)
    backend.start()
    tally.add(f"vLLM down {time.monotonic() - start:.0f} s (killed, restarted)", "done")
    clock.release(after=10)


def memory_sampler(processes: list[Process], samples: list[tuple[float, ...]], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        samples.append(tuple(p.rss_mb() for p in processes))


# ------------------------------------------------------------------------------------------------ the runs
@dataclass
class Run:
    name: str
    seconds: float
    tally: Tally
    memory: list[tuple[float, ...]]
    """(our server's MB, vLLM's MB with --vllm), every second."""
    idle_at_end: dict


def health(url: str) -> dict:
    """/health as the key holder sees it (its status code as "code")."""
    request = http.client.HTTPConnection(url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1]), timeout=30)
    try:
        request.request("GET", "/health", headers={"Authorization": f"Bearer {KEY}"})
        response = request.getresponse()
        return {"code": response.status, **json.loads(response.read())}
    finally:
        request.close()


def run(name: str, server: Process, backend: Process | None, prompts: Path, models: list[str], polite_clients: int,
        hostile_clients: int, seconds: float) -> Run:  # fmt: skip
    """One run: the clients (and, beside hostile ones, the reloader and vLLM's outage) for `seconds`."""
    port = int(server.url.rsplit(":", 1)[1])
    tally, memory, stop = Tally(), [], threading.Event()
    start, clock = time.monotonic(), Clock(seconds)
    threads = [threading.Thread(target=polite, args=(port, models, tally, clock, i)) for i in range(polite_clients)]
    threads += [threading.Thread(target=hostile, args=(port, models, tally, clock, i)) for i in range(hostile_clients)]
    if hostile_clients:
        threads.append(threading.Thread(target=reloader, args=(port, prompts, tally, clock)))
        if backend:
            threads.append(threading.Thread(target=vllm_outage, args=(backend, tally, clock, start + seconds / 3)))
    sampler = threading.Thread(target=memory_sampler, args=([server, *([backend] if backend else [])], memory, stop))
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 60  # what was cut off (slow readers, dropped streams) leaves the batch
    while (state := health(server.url)).get("running") and time.monotonic() < deadline:
        time.sleep(0.5)
    log(f"{name}: {sum(n for (k, s), n in tally.outcomes.items() if s == 200)} requests answered in {elapsed:.0f} s")
    return Run(name, elapsed, tally, memory, state)


def report(runs: list[Run], clients: tuple[int, int]) -> None:
    print(f"\n| run ({clients[0]} well-behaved clients, {clients[1]} hostile) | seconds | answered (200) | "
          "well-behaved p50 / p99 (s) | our server's memory start / peak / end (MB) | at the end |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in runs:
        answered = sum(n for (_, status), n in r.tally.outcomes.items() if status == 200)
        lat = r.tally.latencies
        latency = f"{percentile(lat, 50):.2f} / {percentile(lat, 99):.2f}" if lat else "-"
        ours = [m[0] for m in r.memory]
        mem = f"{ours[0]:.0f} / {max(ours):.0f} / {ours[-1]:.0f}" if ours else "-"
        end = f"/health {r.idle_at_end.get('code')}, {r.idle_at_end.get('running')} running"
        print(f"| {r.name} | {r.seconds:.0f} | {answered} | {latency} | {mem} | {end} |")
    print("\n| run | client kind | answers by status |\n| --- | --- | --- |")
    for r in runs:
        kinds = sorted({kind for kind, _ in r.tally.outcomes})
        for kind in kinds:
            statuses = sorted((str(s), n) for (k, s), n in r.tally.outcomes.items() if k == kind)
            print(f"| {r.name} | {kind} | {', '.join(f'{s}: {n}' for s, n in statuses)} |")
    for r in runs:
        step = max(1, len(r.memory) // 12)
        for i, whose in enumerate(["our server", "vLLM"][: len(r.memory[0]) if r.memory else 0]):
            trace = " ".join(f"{m[i]:.0f}" for m in r.memory[::step])
            print(f"\nmemory of {whose}, {r.name} (MB, every {step} s; 0: down): {trace}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="Length of each of the two runs.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients of the hostile run.")
    parser.add_argument("--hostile-share", type=float, default=0.25, help="Share of them that are hostile.")
    parser.add_argument("--prompts", type=int, default=4, help="Prompt artifacts served (and the bare model).")
    parser.add_argument("--vllm", action="store_true", help="Through a front to vLLM, killed and restarted midway.")
    args = parser.parse_args()
    quiet_process(2)
    hostile_clients = max(1, round(args.clients * args.hostile_share))
    polite_clients = args.clients - hostile_clients
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        models = make_prompts(work / "prompts", args.prompts)
        server, backend = start_servers(work, work / "prompts", args.vllm)
        try:
            setting = (server, backend, work / "prompts", models, polite_clients)
            runs = [run("well-behaved only", *setting, 0, args.seconds),
                    run("with hostile clients, reloads" + (", vLLM killed" if backend else ""), *setting,
                        hostile_clients, args.seconds)]  # fmt: skip
        finally:
            server.kill()
            if backend:
                backend.kill()
    print_facts(" (the server in its own process; vLLM too, with --vllm)")
    report(runs, (polite_clients, hostile_clients))


if __name__ == "__main__":
    main()
