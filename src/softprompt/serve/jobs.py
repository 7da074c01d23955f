"""Request bodies into jobs: the model id looked up, the text put into the prompt's template (or the chat template)
and tokenized, and everything checked against the server's limits, every problem in one 400. What bounds the work
of reading a request (how many prompts, how many characters, the stop strings) is checked before any tokenizing;
the routes run this module in a worker thread, off the event loop."""

from __future__ import annotations

from dataclasses import dataclass

from . import protocol
from .engines.base import Sampling
from .protocol import ApiError
from .registry import Prompt, Registry
from .served import ServedModel

MAX_SEED = 2**63
"""Seeds (plus the choice index) must stay below this: a torch generator takes a signed 64-bit seed."""
GREEDY_BELOW = 1e-5
"""Temperatures under this decode greedily, as they mean to: dividing the logits by one (5e-324, say) overflows to
infinities, whose probabilities are NaN."""


@dataclass
class Limits:
    """What one request may ask (ServeConfig's fields of the same names say each one's why)."""

    max_prompt_tokens: int = 2048
    """Longest prompt in tokens (after the template)."""
    max_tokens: int = 512
    """Most new tokens one choice may ask for."""
    max_n: int = 16
    """Most choices per prompt."""
    context: int | None = None
    """The model's context (soft prompt + prompt + new tokens); None: unknown, unchecked."""
    max_body_bytes: int = 1 << 20
    max_prompts: int = 64
    max_prompt_chars: int = 65536
    max_stops: int = 4
    max_stop_chars: int = 256
    max_rows: int = 256
    request_timeout: float = 600.0


def shown(value, limit: int = 80) -> str:
    """`value` as an error message quotes it: its repr, cut to `limit` characters (a client's text can be long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class Job:
    """A request resolved into rows: its prompt, token inputs and sampling (choice j of a seeded request uses
    seed + j)."""

    prompt: Prompt
    inputs: list[list[int]]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool


class Intake:
    """Turns the bodies of /v1/completions and /v1/chat/completions into jobs, or raises the ApiError to answer."""

    def __init__(self, registry: Registry, model: ServedModel, limits: Limits):
        self.registry, self.limits, self.tokenizer = registry, limits, model.tokenizer
        self.vocab = model.vocab_size  # ids a client may send

    def lookup(self, model: str) -> Prompt:
        prompt = self.registry.get(model)
        if prompt is None:
            known = ", ".join(sorted(self.registry.prompts)[:20])
            raise ApiError(404, f"The model {shown(model)} does not exist. Loaded: {known}.", "not_found_error",
                           "model", "model_not_found")  # fmt: skip
        return prompt

    def completion(self, body: protocol.CompletionRequest) -> Job:
        prompt = self.lookup(body.model)
        raw = body.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]  # one prompt: a text or a list of token ids
        self.check_size(body, [len(p) for p in raw if isinstance(p, str)], len(raw), "prompt")
        inputs = [list(p) if isinstance(p, list) else self.tokenize(p if body.raw else self.fill(prompt, p))
                  for p in raw]  # fmt: skip
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return self.job_for(body, prompt, inputs, max_tokens)

    def check_size(self, body: protocol.Common, chars: list[int], prompts: int, param: str) -> None:
        """Refuse at once (400) what would be costly to read: too many prompts, a text too long, stop strings too
        many or too long. `chars`: the length of each text to tokenize; `param`: the field that holds them."""
        limits, problems = self.limits, []
        if prompts > limits.max_prompts:
            problems.append((param, f"{param} holds {prompts} prompts, more than this server's limit of "
                                    f"{limits.max_prompts} per request; send them in several requests"))  # fmt: skip
        long = [(i, n) for i, n in enumerate(chars) if n > limits.max_prompt_chars]
        if long:
            where = "the messages have" if param == "messages" else f"prompt {long[0][0]} has"
            problems.append((param, f"{where} {long[0][1]} characters, more than this server's limit of "
                                    f"{limits.max_prompt_chars}; shorten it"))  # fmt: skip
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stops or not all(stop):
            problems.append(("stop", f"stop takes up to {limits.max_stops} non-empty strings, got {len(stop)}: "
                                     f"{shown(stop)}"))  # fmt: skip
        elif any(len(s) > limits.max_stop_chars for s in stop):
            problems.append(("stop", f"a stop string has {max(map(len, stop))} characters, more than this server's "
                                     f"limit of {limits.max_stop_chars}"))  # fmt: skip
        if problems:
            raise ApiError(400, "; ".join(message for _, message in problems), param=problems[0][0])

    def chat(self, body: protocol.ChatRequest) -> Job:
        prompt = self.lookup(body.model)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message", param="messages")
        self.check_size(body, [sum(len(m.text()) + len(m.role) for m in body.messages)], 1, "messages")
        if prompt.is_classification:
            # A classification prompt reads its template filled with the last user message, as in training.
            users = [m.text() for m in body.messages if m.role == "user"]
            if not users:
                raise ApiError(400, f"{prompt.name!r} classifies a user message; send one", param="messages")
            inputs = [self.tokenize(self.fill(prompt, users[-1]))]
        else:
            inputs = [self.chat_input(body, prompt)]
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is None:  # chat's default: as much as the context and the limit allow
            room = (self.limits.context or 1 << 30) - prompt.num_tokens - len(inputs[0])
            asked = max(1, min(self.limits.max_tokens, room))
        return self.job_for(body, prompt, inputs, asked)

    def chat_input(self, body: protocol.ChatRequest, prompt: Prompt) -> list[int]:
        """The messages through the base model's chat template, tokenized."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the base model of {prompt.name!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own checks (roles, order) raise template errors
            raise ApiError(400, f"the chat template refused the messages: {error}", param="messages") from None
        return self.tokenize(text, special=False)  # the template writes the special tokens itself

    def job_for(self, body: protocol.Common, prompt: Prompt, inputs: list[list[int]], max_tokens: int) -> Job:
        """Check the request against the limits, collecting every problem into one message."""
        sampling, n, problems = self.sampling(body, max_tokens)
        if not inputs:
            problems.append("the prompt is empty")
        rows = len(inputs) * (1 if prompt.is_classification else n)  # a label is scored once, whatever n
        if rows > self.limits.max_rows:
            problems.append(f"this request needs {rows} rows ({len(inputs)} prompt(s) x n={n}), more than this server "
                            f"takes in one request ({self.limits.max_rows}); send fewer prompts or a smaller n")
        completion = max((len(w) for w in prompt.label_ids), default=0) if prompt.is_classification else max_tokens
        for i, ids in enumerate(inputs):
            problems += self.input_problems(f"prompt {i}" if len(inputs) > 1 else "the prompt", ids, prompt,
                                            completion)  # fmt: skip
        if problems:
            raise ApiError(400, "; ".join(problems))
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return Job(prompt, inputs, sampling, n, bool(body.stream), include_usage)

    def sampling(self, body: protocol.Common, max_tokens: int) -> tuple[Sampling, int, list[str]]:
        """The body's sampling and choice count, with what is wrong in them."""
        limits = self.limits
        problems = [f"{name} is not supported by this server" for name in body.unsupported()]
        n = 1 if body.n is None else body.n
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if not 1 <= n <= limits.max_n:
            problems.append(f"n must be between 1 and {limits.max_n}, got {n}")
        if not 1 <= max_tokens <= limits.max_tokens:
            problems.append(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if not 0 <= temperature <= 2:
            problems.append(f"temperature must be between 0 and 2, got {temperature}")
        if not 0 < top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {top_p}")
        if body.seed is not None and not 0 <= body.seed < MAX_SEED - limits.max_n:
            problems.append(f"seed must be between 0 and {MAX_SEED - limits.max_n - 1}, got {body.seed}")
        temperature = 0.0 if 0 <= temperature < GREEDY_BELOW else temperature
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=body.seed,
                            ignore_eos=body.ignore_eos)  # fmt: skip
        return sampling, n, problems

    def input_problems(self, where: str, ids: list[int], prompt: Prompt, completion: int) -> list[str]:
        """What is wrong with one input's token ids (at most one problem: the first found)."""
        limits, vocab = self.limits, self.vocab
        bad = [t for t in ids if not 0 <= t < vocab]
        if not ids:
            return [f"{where} is empty: it needs at least one token"]
        if bad:
            return [f"{where} has token ids outside the vocabulary (0 to {vocab - 1}): {bad[:5]}"]
        if len(ids) > limits.max_prompt_tokens:
            return [f"{where} has {len(ids)} tokens, more than this server's limit of {limits.max_prompt_tokens}; "
                    "shorten it"]  # fmt: skip
        needed = prompt.num_tokens + len(ids) + completion
        if limits.context and needed > limits.context:
            return [f"{where}: this model's maximum context length is {limits.context} tokens, but the request needs "
                    f"{needed} ({prompt.num_tokens} soft-prompt tokens, {len(ids)} prompt tokens, {completion} for "
                    "the completion); shorten the prompt or max_tokens"]  # fmt: skip
        return []

    def fill(self, prompt: Prompt, text: str) -> str:
        """The text put into the prompt's template, as in training; a template of several fields cannot take one
        text (every field would get it), so the client formats it."""
        if prompt.task is not None and len(set(prompt.task.fields)) > 1:
            raise ApiError(400, f"{prompt.name!r} was trained on the template {prompt.task.template!r}, which has "
                           f"{len(set(prompt.task.fields))} fields: one text cannot fill them. Fill the template "
                           "yourself and send it to /v1/completions with \"raw\": true.")  # fmt: skip
        return prompt.format(text)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]
