"""Typed configs: one source of truth for every default, validated on construction, serialized as JSON."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from .errors import SoftPromptError
from .methods import REGISTRY

METHODS = tuple(REGISTRY)
INITS = ("random", "vocab", "text", "labels", "demos")
TASKS = ("classification", "generation")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("linear", "cosine", "constant")
TOO_LONG = ("truncate", "refuse")
TRACKERS = ("tensorboard", "wandb", "mlflow")
REPORT_TO = ("auto", *TRACKERS, "all", "none")
"""What `report_to` takes (see trackers.py)."""
PLACEHOLDER = re.compile(r"\{(\w+)\}")
"""A `{field}` in a template."""


def _check(problems: list[str], what: str) -> None:
    if problems:
        raise SoftPromptError(f"Invalid {what}:\n  - " + "\n  - ".join(problems))


@dataclass
class PromptConfig:
    """What is learned and how it starts."""

    method: Literal["prompt", "prefix"] = "prefix"
    """`prefix`: per-layer key/values (Li & Liang 2021), the default: on the tasks of benchmarks/defaults.py it
    learned as much as prompt tuning or more, in less time; `prompt`: soft input embeddings (Lester et al. 2021),
    what vLLM's `prompt_embeds` can serve."""
    num_tokens: int | None = None
    """Number of virtual tokens. Unset: 96 for prefix tuning on a generation task (or all that its training
    examples fill, when fewer), 10 for prefix tuning on a classification task, else 20 (`default_start`)."""
    init: Literal["random", "vocab", "text", "labels", "demos"] | None = None
    """Unset: demos for prefix tuning on a generation task, else text (`default_start`, measured). random: uniform
    in ±init_range; vocab: embeddings of frequent tokens; text: the tokens of `init_text` (truncated or repeated);
    labels: each label word seeds one slot, frequent tokens fill the rest; demos: training examples with their
    answers, one per line in a seeded order, as many as fill num_tokens (the last one cut: the demonstrations' count
    follows from num_tokens and their length), each hidden from its own row in training (leave-one-out). For prefix
    tuning the non-random inits take the frozen model's own key/values over those tokens."""
    init_text: str | None = None
    """Text for `init=text` (the CLI and PromptTuner default to the template's literal words)."""
    init_range: float = 0.5
    """Half-width of the uniform range for `init=random`."""
    vocab_size_for_init: int = 5000
    """`vocab`/`labels` inits sample from the first this-many token ids (BPE orders merges by frequency)."""
    prefix_mlp: bool = False
    """Prefix tuning only: train through an MLP reparameterization, folded into plain key/values when saved."""
    mlp_hidden: int = 512
    """Hidden width of that MLP (and of the residual one)."""
    residual: bool = False
    """Prompt tuning only: train P through a residual MLP, P + LayerNorm(up(ReLU(down(P)))) (Razdaibiedina et al.
    2023), which starts as P itself and is folded into plain embeddings when saved."""
    slot_dropout: float = 0.0
    """In training, each row hides each slot of its prompt with this probability, drawn anew for every row of every
    step (a row keeps at least one slot): token dropout, as in context tuning (Lu et al. 2025), so that few examples
    are not learned by heart. Validation, evaluation and serving see every slot."""

    def for_tasks(self, kinds: Collection[str]) -> PromptConfig:
        """These settings with num_tokens and init made explicit: the given ones, else `default_start`'s for this
        method on tasks of `kinds` (classification, generation; tasks of several kinds, or none given, as in
        distillation whose records hold no answers to demonstrate: the start every task can take)."""
        num_tokens, init = default_start(self.method, next(iter(kinds)) if len(set(kinds)) == 1 else None, self.init)
        return dataclasses.replace(self, num_tokens=self.num_tokens or num_tokens, init=init)

    def folded(self) -> "PromptConfig":
        """The settings of what gets saved: any reparameterization (prefix MLP, residual MLP) folded away."""
        return dataclasses.replace(self, prefix_mlp=False, residual=False)

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.num_tokens is not None and self.num_tokens < 1:
            problems.append(f"num_tokens must be at least 1, got {self.num_tokens}")
        if self.init is not None and self.init not in INITS:
            problems.append(f"init {self.init!r} is not one of {', '.join(INITS)}")
        if self.init == "text" and not (self.init_text or "").strip():
            problems.append("init=text needs a non-empty init_text (--init-text)")
        if self.init_range <= 0:
            problems.append(f"init_range must be positive, got {self.init_range}")
        if self.mlp_hidden < 1:
            problems.append(f"mlp_hidden must be at least 1, got {self.mlp_hidden}")
        if not 0 <= self.slot_dropout < 1:
            problems.append(f"slot_dropout must be at least 0 and below 1, got {self.slot_dropout}")
        if self.prefix_mlp and not getattr(REGISTRY.get(self.method), "supports_mlp", False):
            with_mlp = ", ".join(name for name, method in REGISTRY.items() if method.supports_mlp)
            problems.append(f"prefix_mlp applies to method={with_mlp} only (--method {with_mlp})")
        if self.residual and not getattr(REGISTRY.get(self.method), "supports_residual", False):
            with_residual = ", ".join(name for name, method in REGISTRY.items() if method.supports_residual)
            problems.append(f"residual applies to method={with_residual} only (--method {with_residual})")
        _check(problems, "prompt settings")


MEASURED_STARTS = {("prefix", "generation"): (96, "demos"), ("prefix", "classification"): (10, "text")}
"""(num_tokens, init) by (method, task kind) where measurement chose them; every other case takes OTHER_START."""
OTHER_START = (20, "text")


def default_start(method: str, kind: str | None, init: str | None = None) -> tuple[int, str]:
    """(num_tokens, init) where they are not given, as benchmarks/defaults.py measured them (README: "The defaults
    against LoRA"): prefix tuning on a generation task starts from the model's own key/values over 96 tokens of
    training examples with their answers (against 20 tokens of the template's words: translation 25.9 -> 29.2 chrF,
    within a point of LoRA; pinyin-tones 89.3 -> 95.2); on a classification task from 10 tokens of the template's
    words (against 20: as good or better on all four classification tasks, mean +1.9 points; demonstrations learned
    less); everything else from 20 tokens of the template's words. A given `init` other than that start's keeps 20."""
    num_tokens, default_init = MEASURED_STARTS.get((method, kind), OTHER_START)
    init = init or default_init
    return (num_tokens if init == default_init else OTHER_START[0]), init


@dataclass
class TaskConfig:
    """How records become model input and what the model must produce."""

    template: str = "{text}"
    """Input text with `{field}` placeholders filled from each record, e.g. 'Review: {text}\\nSentiment:'."""
    task: Literal["classification", "generation"] = "classification"
    """classification: pick one of `labels`; generation: produce the text of `target_field`."""
    labels: list[str] = field(default_factory=list)
    """Label words (the verbalizer), e.g. negative and positive; on the command line, comma-separated."""
    label_field: str | None = None
    """Record field holding the label: one of the label words, or its index in `labels`."""
    target_field: str | None = None
    """Record field holding the target text (generation)."""

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if not self.fields:
            problems.append(f"template {self.template!r} names no {{field}}: it would ignore the data")
        if self.task == "classification":
            if len(self.labels) < 2:
                problems.append(f"classification needs at least two label words (--labels a,b), got {self.labels}")
            if len(set(self.labels)) != len(self.labels):
                problems.append(f"label words repeat: {self.labels}")
            if any(not label.strip() for label in self.labels):
                problems.append("a label word is empty")
            if not self.label_field:
                problems.append("classification needs --label-field")
        elif self.task == "generation" and not self.target_field:
            problems.append("generation needs --target-field")
        _check(problems, "task settings")

    @classmethod
    def infer(cls, template: str, labels: str | list[str] | None, label_field: str | None,
              target_field: str | None) -> "TaskConfig":  # fmt: skip
        """The task from what is given: label words (a list, or one comma-separated string) make it
        classification; a target field without them, generation."""
        if isinstance(labels, str):
            labels = [x.strip() for x in labels.split(",")] if labels else []
        labels = list(labels or [])
        task = "generation" if target_field and not labels else "classification"
        return cls(template=template, task=task, labels=labels, label_field=label_field, target_field=target_field)

    @property
    def fields(self) -> list[str]:
        return PLACEHOLDER.findall(self.template)

    def fill_text(self, text: str) -> str:
        """The template with every field set to `text`: how one input text reaches a prompt trained on it."""
        return PLACEHOLDER.sub(lambda _: text, self.template)


SELECTABLE = {"classification": ("accuracy", "macro_f1", "gold_logprob", "loss"),
              "generation": ("chrf", "bleu", "exact_match", "loss")}
"""The validation metrics `TrainConfig.select_by` may name, by task kind."""


@dataclass
class TrainConfig:
    """The optimization."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per optimizer step (split across gradient accumulation and processes)."""
    grad_accum: int = 1
    """Micro-batches accumulated per step."""
    lr: float | None = None
    """Peak learning rate (default: the method's own, 0.03 for prefix tuning and 0.01 for prompt tuning)."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw or adafactor."""
    weight_decay: float = 0.0
    """The optimizer's weight decay on the prompt's parameters."""
    warmup_steps: int = 10
    """Steps of linear warmup to the peak learning rate."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear, cosine or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    eval_every: int = 25
    """Evaluate on the validation set every this many steps (0: never)."""
    eval_size: int = 300
    """Validation examples used per evaluation (the first ones of the file)."""
    holdout: float = 0.1
    """Share of the training data held out to choose the best prompt by when no validation data is given (a seeded
    draw, at most eval_size examples; none when that would be under 16 examples, at eval_every 0, or at 0: then the
    last prompt is kept)."""
    patience: int = 6
    """Stop after this many evaluations without improvement (0: never stop early)."""
    no_learning_after: float = 0.3
    """Share of the steps after which a run that has not learned says so, once, with what to try: its validation no
    better than the starting prompt's, or without validation data its training loss not 2 % lower than at the start
    (0: never check)."""
    seed: int = 0
    """Seed of the prompt's initialization and of the order of the training examples."""
    max_length: int = 512
    """Longest example (input + target) in tokens."""
    too_long: Literal["truncate", "refuse"] = "truncate"
    """An example longer than max_length: truncate (cut its input from the left, with a warning) or refuse the
    data."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (0: only on interruption)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: less memory, one more forward per step."""
    compile: bool = False
    """Compile the frozen decoder's training pass (torch.compile, inductor; on a CPU it needs a C++ compiler):
    fused kernels for its norms, rotary embeddings and activations. Its first steps take minutes on a CPU while it
    compiles, so it pays back on long runs only; without a working compiler the run says why and stays eager."""
    shard_model: bool = False
    """Under several processes, shard the frozen decoder layers across them (FSDP2): each holds 1/N of their
    weights. Implied by `accelerate launch --use_fsdp`."""
    report_to: Literal["auto", "tensorboard", "wandb", "mlflow", "all", "none"] = "auto"
    """Experiment trackers for the run's metrics and settings (besides metrics.jsonl): tensorboard (files under
    OUT/tensorboard), wandb, mlflow, all (every installed one) or none; auto is $SOFTPROMPT_REPORT_TO when set, else
    tensorboard when it is installed, else none."""
    select_by: Literal["auto", "accuracy", "macro_f1", "gold_logprob", "chrf", "bleu", "exact_match", "loss"] = "auto"
    """The validation metric that picks the best prompt (and a search's candidates), the loss breaking ties: auto
    (classification: accuracy; generation: chrF), accuracy, macro_f1 or gold_logprob (classification), chrf, bleu or
    exact_match (generation, from greedy decoding), loss (either; lower is better: for classification the gold label
    words' negative log-probability)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % max(self.grad_accum, 1):
            problems.append(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.too_long not in TOO_LONG:
            problems.append(f"too_long {self.too_long!r} is not one of {', '.join(TOO_LONG)}")
        if self.report_to not in REPORT_TO:
            problems.append(f"report_to {self.report_to!r} is not one of {', '.join(REPORT_TO)}")
        for name in ("warmup_steps", "eval_every", "patience", "weight_decay", "max_grad_norm", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.holdout < 1:
            problems.append(f"holdout is a share of the training data, from 0 to below 1; got {self.holdout}")
        if not 0 <= self.no_learning_after <= 1:
            problems.append(f"no_learning_after is a share of the steps, from 0 to 1; got {self.no_learning_after}")
        if self.eval_size < 1 or self.max_length < 2:
            problems.append("eval_size must be at least 1 and max_length at least 2")
        if self.select_by != "auto" and not any(self.select_by in names for names in SELECTABLE.values()):
            problems.append(f"select_by {self.select_by!r} is not one of auto, "
                            f"{', '.join(dict.fromkeys(n for names in SELECTABLE.values() for n in names))}")
        _check(problems, "training settings")

    def for_method(self, method: str) -> TrainConfig:
        """These settings with the learning rate made explicit: the given one, else `method`'s default."""
        return self if self.lr is not None else dataclasses.replace(self, lr=REGISTRY[method].default_lr)

    def check_select_by(self, task: str) -> None:
        """Refuse a `select_by` metric that a `task` (classification or generation) does not report."""
        if self.select_by not in ("auto", *SELECTABLE[task]):
            raise SoftPromptError(f"--select-by {self.select_by} is not a {task} metric: a {task} task is selected "
                                  f"by one of auto, {', '.join(SELECTABLE[task])}.")  # fmt: skip


def build_all(*builders):
    """Build every config, reporting the problems of all of them at once."""
    built, errors = [], []
    for build in builders:
        try:
            built.append(build())
        except SoftPromptError as error:
            errors.append(str(error))
    if errors:
        raise SoftPromptError("\n".join(errors))
    return built


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, data: dict):
    """Build a config from JSON, ignoring keys a newer version may have added."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string under it) in the dataclass `cls` and its bases, whitespace collapsed: a
    setting's one description, which the CLI shows as its help."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source to read (a frozen install): options without help, not no CLI
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):  # fmt: skip
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
