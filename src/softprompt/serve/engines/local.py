"""Our engine: continuous batching of generation requests across prompts, in one worker thread.

Each running row (one generated choice) holds its own prompt's K/V prefix, its prompt tokens and what it generated,
all in one `RunningBatch` (backbones/running.py), which owns the cache. Between decode steps, rows that finished
leave and waiting rows join: they are prefilled together (their prefixes stacked, shorter ones left-padded with masked
slots) and merged into the running batch. Since positions count real slots only, a row's tokens do not depend on who
shares its batch. This file keeps scheduling and sampling. Classification requests are scored between steps, up to
`max_batch` of them in one mixed batch per step (a full queue of them is spread over steps, so decoding goes on).
Every torch call happens in the worker thread; other threads submit work and get
updates through callbacks (the HTTP side forwards them to asyncio queues).
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Callable

import torch

from ...backbones import Backbone, RunningBatch
from ...scoring.generate import advance, eos_ids, next_tokens
from ...scoring.mixed import label_scores_mixed, stack
from .base import (STOPPED, Engine, EngineConfig, QueueFull, ScoreRequest, Sequence, Stats, Stopped, Update, emit,
                   failure)  # fmt: skip

WORKER_GONE = "the server's engine has stopped working: the request was not completed; the server needs a restart"


class LocalEngine(Engine):
    """Continuous batching of every prompt's rows on `backbone`, in one worker thread."""

    def __init__(self, backbone: Backbone, config: EngineConfig | None = None):
        backbone.check_joinable()
        self.backbone, self.config = backbone, config or EngineConfig()
        self.eos = eos_ids(backbone.tokenizer, getattr(backbone.model, "generation_config", None))
        self.stats = Stats()
        self._lock = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._scoring: collections.deque[ScoreRequest] = collections.deque()
        self._jobs: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._rows: list[Sequence] = []  # running, in the order of the batch's rows
        self._batch = RunningBatch(backbone)  # their cache
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._gone = False  # the worker ended without a stop

    # ---- submitting (any thread) ----

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._scoring)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def capacity(self) -> int:
        return self.config.max_queue

    @property
    def worker_gone(self) -> bool:
        """Started, but its thread has ended without a stop (nothing would ever run what is queued)."""
        return self._gone or (self._thread is not None and not self._thread.is_alive() and not self._stopping)

    def _enqueue(self, queue: collections.deque, items: list) -> None:
        with self._lock:
            if self._stopping:
                raise Stopped(STOPPED)
            if self.worker_gone:
                raise Stopped(WORKER_GONE)
            if self.queue_depth + len(items) > self.config.max_queue:
                raise QueueFull(
                    f"the server is busy: {self.queue_depth} requests are waiting (limit {self.config.max_queue}, "
                    f"this request adds {len(items)}); retry later"
                )
            queue.extend(items)
            self._lock.notify()

    async def health(self) -> dict:
        """The engine's own state for /health: ok while its worker thread runs (not only while nobody stopped it)."""
        if self._stopping:
            return {"engine": "softprompt", "status": "stopping"}
        if self.worker_gone:
            return {"engine": "softprompt", "status": "unavailable", "detail": "the engine's worker thread has ended"}
        return {"engine": "softprompt", "status": "ok"}

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue rows for generation, all or none (QueueFull)."""
        self._enqueue(self._waiting, sequences)

    def submit_scoring(self, requests: list[ScoreRequest]) -> None:
        self._enqueue(self._scoring, requests)

    def call(self, fn: Callable) -> Future:
        """Run `fn()` in the worker thread between steps (torch work such as loading prompts)."""
        future: Future = Future()
        with self._lock:
            if self._stopping or self.worker_gone:
                future.set_exception(Stopped(STOPPED if self._stopping else WORKER_GONE))
                return future
            self._jobs.append((fn, future))
            self._lock.notify()
        if self._thread is None:  # not started (tests driving `step` by hand)
            self._run_jobs()
        return future

    # ---- the worker ----

    def start(self) -> "LocalEngine":
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take no more work; every waiting or running row, scoring request and job ends with an error (after the
        worker's current step), so no caller waits forever."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is None:
            self._abandon()
        else:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._stopping or self._waiting or self._scoring or self._jobs or self._rows):
                        self._lock.wait()
                    if self._stopping:
                        break
                try:
                    self.step()
                except Exception as error:  # `step` ends what it touched; whatever escapes must not end the worker
                    self._fail_running(failure("generation", error))
        finally:  # a stop, or the thread ending otherwise: nothing queued may wait for it
            self._abandon(STOPPED if self._stopping else WORKER_GONE)

    def _abandon(self, message: str = STOPPED) -> None:
        """On stop (or the worker's end): end everything still queued or running with an error; submissions are
        refused from here on."""
        with self._lock:
            self._gone = not self._stopping
            waiting, scoring, jobs = list(self._waiting), list(self._scoring), list(self._jobs)
            self._waiting.clear()
            self._scoring.clear()
            self._jobs.clear()
        for seq in waiting:
            emit(seq, Update(list(seq.tokens), True, "error", message))
        for request in scoring:
            emit(request, None, message)
        for _, future in jobs:
            future.set_exception(Stopped(message))
        self._fail_running(message)

    @torch.no_grad()
    def step(self) -> None:
        """One round: jobs, classification scoring, rows joining, one decode step for all running rows."""
        self._run_jobs()
        if self._stopping:
            return
        self._score()
        try:
            self._keep(list(range(len(self._rows))))  # cancelled rows leave before they cost a step
            self._admit()
            if self._rows:
                self._decode()
        except Exception as error:  # a failure ends the rows it touched, never the server
            self._fail_running(failure("generation", error))

    def _run_jobs(self) -> None:
        while self._jobs and not self._stopping:  # jobs left at a stop fail in `_abandon`
            with self._lock:
                fn, future = self._jobs.popleft()
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller
                future.set_exception(error)

    def _take(self, queue: collections.deque, limit: int) -> list:
        with self._lock:
            taken = []
            while queue and len(taken) < limit:
                item = queue.popleft()
                if not item.cancelled:
                    taken.append(item)
            return taken

    def _score(self) -> None:
        requests = self._take(self._scoring, self.config.max_batch)  # the rest wait for the next steps
        if not requests:
            return
        try:
            scores = label_scores_mixed(self.backbone, [r.input_ids for r in requests], [r.label_ids for r in requests],
                                        [r.prompt_input for r in requests])  # fmt: skip
        except Exception as error:
            message = failure("scoring", error)
            for r in requests:
                emit(r, None, message)
            return
        self.stats.scored += len(requests)
        for r, s in zip(requests, scores):
            emit(r, s, None)

    def _admit(self) -> None:
        """Prefill waiting rows (as many as fit) into the running batch and give each its first token. A failure
        while joining ends the joining rows only: `RunningBatch.join` leaves the running rows as they were."""
        joining = self._take(self._waiting, self.config.max_batch - len(self._rows))
        for seq in [s for s in joining if s.sampling.max_tokens <= 0]:
            emit(seq, Update([], True, "length"))
        joining = [s for s in joining if s.sampling.max_tokens > 0]
        if not joining:
            return
        try:
            for seq in joining:
                if seq.sampling.seed is not None and seq.sampling.temperature > 0:
                    seq.generator = torch.Generator(device=self.backbone.device).manual_seed(seq.sampling.seed)
            prefix, prefix_mask = stack(self.backbone, [s.prompt_input for s in joining])
            logits = self._batch.join([s.prompt_ids for s in joining], prefix, prefix_mask)
        except Exception as error:
            message = failure("generation", error)
            for seq in joining:
                emit(seq, Update(list(seq.tokens), True, "error", message))
            return
        self.stats.prefills += 1
        running = len(self._rows)
        self._rows += joining
        self._finish_step(self._sample(logits, joining), first=running)
        if running:  # joined rows mid-generation that go on after their first token
            self.stats.rows_joined_running += sum(seq in self._rows for seq in joining)

    def _decode(self) -> None:
        """Feed every running row its newest token (the last one it kept: a row that ended on EOS or a stop string
        has left); sample the next; finished and cancelled rows leave."""
        self.stats.decode_steps += 1
        self.stats.record_batch(len(self._rows))
        logits = self._batch.step([seq.tokens[-1] for seq in self._rows])
        self._finish_step(self._sample(logits, self._rows))

    def _finish_step(self, tokens: list[int | None], first: int = 0) -> None:
        """Add a sampled token to each row from `first` on; the rows that end leave the batch."""
        rows = self._rows
        ended = {first + i for i, token in enumerate(tokens) if self._advance(rows[first + i], token)}
        self._keep([i for i in range(len(rows)) if i not in ended])

    def _keep(self, keep: list[int]) -> None:
        keep = [i for i in keep if not self._rows[i].cancelled]
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int | None]:
        """One token per row from (B, vocab) logits: greedy rows at once, sampled rows each with its own generator
        (so a seeded row draws the same numbers whoever shares its batch). A row whose draw fails (NaN logits, say)
        ends with an error and gets None; the other rows go on."""
        tokens = [0] * len(rows)
        greedy = [i for i, s in enumerate(rows) if s.sampling.temperature == 0]
        if greedy:
            for i, token in zip(greedy, logits[greedy].argmax(-1).tolist()):
                tokens[i] = token
        for i, seq in enumerate(rows):
            if seq.sampling.temperature > 0:
                p = seq.sampling
                try:
                    tokens[i] = int(next_tokens(logits[i : i + 1], p.temperature, p.top_p, seq.generator)[0])
                except Exception as error:
                    tokens[i] = None
                    emit(seq, Update(list(seq.tokens), True, "error", failure("generation", error)))
        return tokens

    def _advance(self, seq: Sequence, token: int | None) -> bool:
        """Add a sampled token to a row (`generate.advance`, the rule `generate` follows); report it; True when the
        row is done."""
        if token is None:
            return True  # its draw failed: it has sent its error
        p = seq.sampling
        reason = advance(self.backbone.tokenizer, self.eos, seq.tokens, token, max_tokens=p.max_tokens, stop=p.stop,
                         ignore_eos=p.ignore_eos)  # fmt: skip
        self.stats.generated_tokens += not (token in self.eos and not p.ignore_eos)  # EOS is not generated text
        if reason or seq.stream:
            emit(seq, Update(list(seq.tokens), reason is not None, reason))
        return reason is not None or seq.cancelled

    def _fail_running(self, message: str) -> None:
        for seq in self._rows:
            emit(seq, Update(list(seq.tokens), True, "error", message))
        self._rows, self._batch = [], RunningBatch(self.backbone)
