"""The contract between the HTTP side and an engine, and the types they exchange.

The app builds `Sequence`s (one generated choice each) and `ScoreRequest`s (one classified input each), hands them
to an `Engine`, and hears back through each one's `sink`, called on the engine's own thread. Every engine refuses
work it cannot queue (`QueueFull`, answered 429) or takes no more (`Stopped`, 503), and ends every accepted request
with an update, an error included, so no caller waits forever. An error's text for the client names what failed,
never the exception's own words (`failure`): those go to the server's log.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...errors import SoftPromptError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STOPPED = "the server is shutting down: the request was not completed"
log = logging.getLogger("softprompt.serve")


def failure(what: str, error: BaseException) -> str:
    """What a client is told of a failure of ours: `what` failed, and the exception's kind; its text (which may name
    files, addresses or data) and traceback go to the server's log only."""
    log.error("%s failed: %s: %s", what, type(error).__name__, error, exc_info=error)
    return f"{what} failed ({type(error).__name__}); the server's log has the details"


class QueueFull(SoftPromptError):
    """Too many requests are waiting; the client should retry later."""


class Stopped(SoftPromptError):
    """The engine is stopping or stopped: it takes no more work."""


@dataclass
class EngineConfig:
    max_batch: int = 64
    """Rows decoded together; more wait in the queue and join as rows finish."""
    max_queue: int = 256
    """Rows and scoring requests that may wait; beyond this a submission is refused (HTTP 429)."""

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least 1, got {getattr(self, name)}" for name in ("max_batch", "max_queue")
                    if getattr(self, name) < 1]  # fmt: skip
        if problems:
            raise SoftPromptError("Invalid engine settings:\n  - " + "\n  - ".join(problems))


@dataclass
class Sampling:
    """How one row decodes."""

    max_tokens: int = 16
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks that need exact lengths)."""


@dataclass
class Update:
    """What a row reports: all its tokens so far (cut before a stop string), and whether it is done."""

    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None
    """stop (EOS or a stop string), length (max_tokens) or error."""
    error: str | None = None
    status: int = 500
    """The HTTP status an error answers with (503/504 when a backend is unreachable or slow)."""


class Sequence:
    """One generated choice: prompt, prompt input, sampling, and a callback `sink(Update)` called from the engine's
    thread (after every token when `stream`, else only when finished). `prompt_input` is what the served model made
    of the prompt's artifact (`ServedModel.prompt_input`): a K/V prefix for our engine, soft tokens for vLLM; None
    for the bare base model."""

    def __init__(self, prompt_ids: list[int], prompt_input: torch.Tensor | None, sampling: Sampling,
                 sink: Callable[[Update], None], stream: bool = False):  # fmt: skip
        self.prompt_ids, self.prompt_input, self.sampling = prompt_ids, prompt_input, sampling
        self.sink, self.stream = sink, stream
        self.tokens: list[int] = []
        self.cancelled = False
        """Set by the caller (client gone, deadline passed): the row leaves at the next step."""
        self.deadline: float | None = None
        """`time.monotonic()` past which nobody waits for the row (an engine that waits on others gives up then)."""
        self.generator: torch.Generator | None = None
        """A seeded row's own random numbers (made on the model's device when the row joins)."""


class ScoreRequest:
    """Classification: which of `label_ids` follows `input_ids` after `prompt_input` (as in `Sequence`).
    `sink(scores or None, error[, status])`."""

    def __init__(self, input_ids: list[int], label_ids: list[list[int]], prompt_input: torch.Tensor | None,
                 sink: Callable[..., None]):  # fmt: skip
        self.input_ids, self.label_ids, self.prompt_input, self.sink = input_ids, label_ids, prompt_input, sink
        self.cancelled = False
        self.deadline: float | None = None
        """As `Sequence.deadline`."""


@dataclass
class Stats:
    """Counters for /metrics; written by the engine's thread only."""

    decode_steps: int = 0
    prefills: int = 0
    generated_tokens: int = 0
    rows_joined_running: int = 0
    """Rows that joined a batch whose other rows were mid-generation (continuous batching at work)."""
    scored: int = 0
    batch_size_counts: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    """Decode steps by rows in the batch, per bucket of BATCH_BUCKETS (upper bounds; the last one: above all)."""
    batch_size_sum: int = 0

    def record_batch(self, size: int) -> None:
        self.batch_size_counts[next((i for i, b in enumerate(BATCH_BUCKETS) if size <= b), len(BATCH_BUCKETS))] += 1
        self.batch_size_sum += size


def emit(target: Sequence | ScoreRequest, *update) -> None:
    """Hand an update to its callback; a failing callback (its client gone) cancels that request only."""
    try:
        target.sink(*update)
    except Exception:
        target.cancelled = True


class Engine(ABC):
    """What the app needs of an engine. Submissions come from any thread and are all or none; updates arrive
    through each request's sink."""

    config: EngineConfig
    stats: Stats

    @property
    @abstractmethod
    def running(self) -> int:
        """Rows (and, where the engine counts them so, scoring requests) being worked on now."""

    @property
    @abstractmethod
    def queue_depth(self) -> int:
        """Rows and scoring requests waiting for their turn."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """The most rows (or scoring requests) one submission may hold: a larger one could never be taken, so it is
        refused as too large (400), not as busy (429)."""

    @abstractmethod
    def start(self) -> "Engine":
        """Start the engine's thread; returns the engine."""

    @abstractmethod
    def stop(self) -> None:
        """Take no more work; whatever is queued or running ends with an error."""

    @abstractmethod
    def submit(self, sequences: list[Sequence]) -> None:
        """Queue rows for generation, all or none (QueueFull, Stopped)."""

    @abstractmethod
    def submit_scoring(self, requests: list[ScoreRequest]) -> None:
        """Queue classification requests, all or none (QueueFull, Stopped)."""

    @abstractmethod
    def call(self, fn: Callable) -> Future:
        """Run `fn()` where it does not race the engine's work (loading prompts); its result in the future."""

    @abstractmethod
    async def health(self) -> dict:
        """The engine's state for /health: at least `engine` (its kind) and `status` ("ok" when it can serve); where
        known, `detail` (why not) and `url` (its backend), which /health shows to holders of the API key only."""
