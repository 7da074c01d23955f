"""/metrics: the server's counters (HTTP side and engine) as Prometheus text exposition (format 0.0.4), written by
hand: a few lines, no dependency."""

from __future__ import annotations

import collections

from .engines.base import BATCH_BUCKETS, Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counters:
    """HTTP-side counts, touched only from the event loop's thread."""

    def __init__(self) -> None:
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count
        self.model_requests: collections.Counter = collections.Counter()  # model id -> served requests
        self.prompt_tokens = 0


def _labels(**labels) -> str:
    escape = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def render(counters: Counters, engine: Engine, loaded_prompts: int) -> str:
    stats = engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("softprompt_requests_total", "counter", "HTTP requests by endpoint and status code.",
           [(_labels(endpoint=e, status=s), n) for (e, s), n in sorted(counters.requests.items())])
    metric("softprompt_model_requests_total", "counter", "Completion requests accepted, by model id.",
           [(_labels(model=m), n) for m, n in sorted(counters.model_requests.items())])
    metric("softprompt_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
           [("", counters.prompt_tokens)])
    metric("softprompt_generated_tokens_total", "counter", "Tokens generated.", [("", stats.generated_tokens)])
    metric("softprompt_classifications_total", "counter", "Inputs scored by classification prompts.",
           [("", stats.scored)])
    metric("softprompt_decode_steps_total", "counter", "Decode steps of the running batch.", [("", stats.decode_steps)])
    metric("softprompt_prefill_batches_total", "counter", "Batches of joining rows prefilled.", [("", stats.prefills)])
    metric("softprompt_rows_joined_running_total", "counter",
           "Rows that joined a batch while its other rows were mid-generation.", [("", stats.rows_joined_running)])
    counts, cumulative, buckets = list(stats.batch_size_counts), 0, []
    for bound, count in zip([*map(str, BATCH_BUCKETS), "+Inf"], counts):
        cumulative += count
        buckets.append((_labels(le=bound), cumulative))
    lines.extend(["# HELP softprompt_batch_size Rows in the batch at each decode step.",
                  "# TYPE softprompt_batch_size histogram"])
    lines.extend(f"softprompt_batch_size_bucket{labels} {value}" for labels, value in buckets)
    lines.extend([f"softprompt_batch_size_sum {stats.batch_size_sum}", f"softprompt_batch_size_count {cumulative}"])
    metric("softprompt_queue_depth", "gauge", "Rows and scoring requests waiting.", [("", engine.queue_depth)])
    metric("softprompt_running_rows", "gauge", "Rows being generated.", [("", engine.running)])
    metric("softprompt_loaded_prompts", "gauge", "Prompts loaded (not counting the base model).",
           [("", loaded_prompts)])
    return "\n".join(lines) + "\n"
