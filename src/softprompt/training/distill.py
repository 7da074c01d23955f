"""Context distillation: a soft prompt learns to make the frozen model, reading a short template, answer as a teacher
answers reading a long text prompt (an instruction and demonstrations); Snell, Klein & Zhong (2022), "Learning by
Distilling Context".

The teacher is the student's own frozen model, or a larger one sharing its tokenizer. Its template's text before the
first {field} is the same for every record, so the teacher reads it once and it becomes a K/V prefix of the shape
every method's `kv()` returns; a teacher row carries only the rest of the template. What the teacher says does not
change during training, so it is computed once beforehand: for classification its distribution over the label words,
for generation its greedy continuation, which becomes the student's target. Along that continuation both models'
full-vocabulary distributions are compared, the teacher's recomputed per batch (a data set's worth would not fit in
memory). Records need no labels; where they have them, `alpha` mixes in the ordinary cross-entropy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..backbones.causal import CausalBackbone
from ..config import PLACEHOLDER, PromptConfig, TrainConfig, to_dict
from ..data import Example, Records, TaskEncoder, collate, fill
from ..errors import SoftPromptError
from ..scoring.evaluate import generate_in_order, label_scores
from ..scoring.scorer import label_logprobs, position_logprobs
from ..models import context_size
from .loop import Run, loss_on, train
from .setup import training_device


@dataclass
class DistillConfig:
    """What the student learns from."""

    teacher_template: str
    """The teacher's long text prompt with {field} placeholders: an instruction, demonstrations, then the input."""
    alpha: float = 0.0
    """Weight of the ordinary cross-entropy on the records' gold labels or targets (0: pure distillation; above 0
    every record needs one)."""
    teacher_model: str | None = None
    """A (larger) teacher model sharing the student's tokenizer (None: the student's own frozen model)."""
    max_new_tokens: int = 32
    """Generation: the longest teacher continuation the student learns."""

    def __post_init__(self) -> None:
        problems = []
        if not PLACEHOLDER.search(self.teacher_template):
            problems.append(f"the teacher template {self.teacher_template!r} names no {{field}}: it would ignore the "
                            "data")  # fmt: skip
        if not 0 <= self.alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if problems:
            raise SoftPromptError("Invalid distillation settings:\n  - " + "\n  - ".join(problems))


@dataclass
class _DistillTraining(TrainConfig):
    """The training settings with the distillation's: through the one config `train` takes, they reach the
    artifact's training summary and a checkpoint's identity (a run resumed with another teacher is refused)."""

    distillation: DistillConfig | None = None


@dataclass
class DistillExample(Example):
    """A training example and what the teacher said about it. Its `target_ids` are the teacher's answer (its most
    probable label word, or its continuation): where the student's loss is read, and what the trainer counts."""

    teacher_ids: list[int] = field(default_factory=list)
    """The teacher's row: the rest of its template, filled and tokenized without special tokens."""
    teacher_logprobs: torch.Tensor | None = None
    """Classification: the teacher's log-distribution over the label words, (num_labels,)."""
    gold_ids: list[int] | None = None
    """The gold label word's or target's tokens, where the record has them (`alpha`'s cross-entropy)."""


def check_vocabulary(teacher: Backbone, student: Backbone) -> None:
    """The KL compares the two models' distributions id by id: both must have the same ids for the same tokens."""
    problems = []
    if teacher.shapes.vocab_size != student.shapes.vocab_size:
        problems.append(f"its logits cover {teacher.shapes.vocab_size} token ids, the student's "
                        f"{student.shapes.vocab_size}")  # fmt: skip
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        problems.append("its tokenizer's vocabulary differs from the student's")
    if problems:
        raise SoftPromptError(
            f"The teacher model {teacher.name} cannot teach {student.name}: {'; '.join(problems)}. Distillation "
            "compares next-token distributions id by id, so the teacher must share the student's tokenizer."
        )


@dataclass
class Teacher:
    """The teacher model and its template, whose constant head it has read once."""

    backbone: Backbone
    prefix: torch.Tensor | None
    """(num_layers, 2, kv_heads, n, head_dim): the teacher's K/V over its template's text before the first {field}
    (with the tokenizer's BOS if it adds one); None where that is no token at all."""
    rest: str
    """The template from its first {field} on: what each row reads after the prefix."""

    @classmethod
    def of(cls, backbone: Backbone, template: str) -> "Teacher":
        if not isinstance(backbone, CausalBackbone):  # an encoder reads its text both ways: no part of it is fixed
            raise SoftPromptError(f"{backbone.name} ({backbone.kind}) cannot be a teacher: the constant part of its "
                                  "text cannot be cached as a prefix; use a causal LM.")  # fmt: skip
        start = PLACEHOLDER.search(template).start()
        ids = backbone.tokenizer(template[:start])["input_ids"]
        context = context_size(backbone.model)
        if context and len(ids) >= context:
            raise SoftPromptError(f"The teacher template's text before its first {{field}} runs past the teacher "
                                  f"model's context of {context} positions ({len(ids)} tokens); shorten "
                                  "it.")  # fmt: skip
        return cls(backbone, backbone.prefix_from_ids(ids) if ids else None, template[start:])

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[-2]

    def row_ids(self, record: dict) -> list[int]:
        return self.backbone.tokenizer(fill(self.rest, record), add_special_tokens=False)["input_ids"]


def _where(records: list[dict], source: str):
    """How messages name record i: file and line for records from `read_records`."""
    return records.where if isinstance(records, Records) else lambda i: f"{source}, example {i + 1}"


def teacher_rows(teacher: Teacher, records: list[dict], source: str = "train") -> list[list[int]]:
    """Each record's teacher row; every record lacking a field of the teacher template is named at once."""
    fields = list(dict.fromkeys(PLACEHOLDER.findall(teacher.rest)))
    present = {key for record in records for key in record}
    absent = [f"{source}: --teacher-template names the field {{{name}}}, but no record has it (the records have: "
              f"{', '.join(sorted(map(str, present)))})" for name in fields if name not in present]  # fmt: skip
    where, lacking = _where(records, source), []
    for i, record in enumerate(records):  # fields some records have: each record without them
        names = [name for name in fields if name in present and record.get(name) is None]
        if names:
            lacking.append(f"{where(i)}: missing field(s) {', '.join(names)} of --teacher-template")
    problems = absent + lacking[:10] + ([f"... and {len(lacking) - 10} more"] if len(lacking) > 10 else [])
    if problems:
        raise SoftPromptError("Problems in the data:\n  - " + "\n  - ".join(problems))
    return [teacher.row_ids(record) for record in records]


def check_teacher_context(teacher: Teacher, rows: list[list[int]], answer: int, where) -> None:
    """Refuse rows that, after the prefix and with `answer` tokens of room, run past the teacher's context."""
    context = context_size(teacher.backbone.model)
    needs = [teacher.prefix_length + len(row) + answer for row in rows]
    over = [f"{where(i)} ({n} positions)" for i, n in enumerate(needs) if context and n > context]
    if over:
        raise SoftPromptError(
            f"The teacher template filled with these records runs past the teacher model's context of {context} "
            f"positions (room for a {answer}-token answer included): {', '.join(over[:10])}"
            + (f" and {len(over) - 10} more" if len(over) > 10 else "") + "; shorten the teacher template."
        )


def teacher_label_logprobs(teacher: Teacher, task: TaskEncoder, rows: list[list[int]], batch_size: int = 32,
                           progress: bool = False) -> torch.Tensor:  # fmt: skip
    """(rows, num_labels): the teacher's log-distribution over the label words after each row (its prefix cached)."""
    examples = [Example(row, []) for row in rows]
    return label_scores(teacher.backbone, task, examples, teacher.prefix, batch_size, progress).log_softmax(-1)


def teacher_continuations(teacher: Teacher, rows: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                          progress: bool = False) -> list[list[int]]:  # fmt: skip
    """The teacher's greedy continuation of each row, ending with EOS where it stopped there (not at the limit)."""
    outputs = generate_in_order(teacher.backbone, [Example(row, []) for row in rows], teacher.prefix, max_new_tokens,
                                batch_size, progress, "teacher")  # fmt: skip
    eos = teacher.backbone.tokenizer.eos_token_id
    return [out + [eos] if len(out) < max_new_tokens else out for out in outputs]


def distill_examples(task: TaskEncoder, teacher: Teacher, records: list[dict], config: DistillConfig,
                     source: str = "train", batch_size: int = 32, progress: bool = False
                     ) -> list[DistillExample]:  # fmt: skip
    """Each record encoded for the student (labels required only when `alpha` uses them), its teacher row, and the
    teacher's answer, computed once."""
    source = records.path if isinstance(records, Records) else source
    students = task.encode(records, source, require_targets=config.alpha > 0)
    rows = teacher_rows(teacher, records, source)
    longest = max(map(len, task.label_ids)) if task.is_classification else config.max_new_tokens + 1
    check_teacher_context(teacher, rows, longest, _where(records, source))
    if longest >= task.max_length:
        raise SoftPromptError(f"the teacher's answers take up to {longest} tokens, leaving no room for the input "
                              f"within {task.limit_reason}; lower --max-new-tokens.")  # fmt: skip
    with torch.no_grad():
        if task.is_classification:
            logprobs = teacher_label_logprobs(teacher, task, rows, batch_size, progress)  # (records, labels)
            answers = [task.label_ids[int(i)] for i in logprobs.argmax(-1)]
        else:
            logprobs, answers = None, teacher_continuations(teacher, rows, config.max_new_tokens, batch_size, progress)
    examples, cut = [], 0
    for i, (student, row, answer) in enumerate(zip(students, rows, answers)):
        room = task.max_length - len(answer)
        cut += len(student.input_ids) > room
        examples.append(DistillExample(
            student.input_ids[-room:], answer, student.label, student.target, teacher_ids=row,
            teacher_logprobs=None if logprobs is None else logprobs[i], gold_ids=student.target_ids or None,
        ))  # fmt: skip
    if cut:
        warnings.warn(f"{source}: {cut} example(s) had their input cut from the left to leave room for the teacher's "
                      f"answer within {task.limit_reason}", stacklevel=2)  # fmt: skip
    return examples


@dataclass
class DistillObjective:
    """The loss of a batch of `DistillExample`s, with `loop.loss_on`'s signature (for `loop.train(objective=...)`):
    (1 - alpha) * KL(teacher || student) + alpha * the ordinary cross-entropy on the gold targets."""

    teacher: Teacher
    task: TaskEncoder
    alpha: float = 0.0

    def __call__(self, backbone: Backbone, prompt_input: torch.Tensor, examples: list[DistillExample],
                 normalizer: float | None = None, prefix_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, int]:  # fmt: skip
        """Returns the loss and the examples' token count. The trainer's `normalizer` counts the batch's target tokens
        per process; each term here is a mean over `examples`, so it is weighted by their share of that count, and
        micro-batches and processes add up to the batch's mean. `prefix_mask` is None: one task, one shared prompt
        input (the student's K/V prefix or soft tokens, as `training_input` gives it)."""
        kl = (self.label_kl if self.task.is_classification else self.token_kl)(backbone, prompt_input, examples)
        loss = kl
        if self.alpha:
            loss = (1 - self.alpha) * kl + self.alpha * self.gold_loss(backbone, prompt_input, examples)
        targets = sum(len(e.target_ids) for e in examples)
        share = 1.0 if normalizer is None else targets / normalizer
        return loss * share, sum(len(e.input_ids) for e in examples) + targets

    def label_kl(self, backbone: Backbone, prompt_input: torch.Tensor, examples: list[DistillExample]) -> torch.Tensor:
        """KL over the label words, mean per example (the student's scores keep their gradient)."""
        inputs = [e.input_ids for e in examples]
        scores = label_logprobs(backbone, inputs, self.task.label_ids, prompt_input)  # (N, labels)
        student = scores.log_softmax(-1)
        teacher = torch.stack([e.teacher_logprobs for e in examples]).to(student.device)  # (N, labels)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def token_kl(self, backbone: Backbone, prompt_input: torch.Tensor, examples: list[DistillExample]) -> torch.Tensor:
        """KL of the next-token distributions at each position of the teacher's continuation, mean per position."""
        student = position_logprobs(backbone, collate(examples, backbone.pad_id), prompt_input)  # (K, vocab)
        t = self.teacher
        with torch.no_grad():  # the same K positions, in the same order, behind the teacher's prefix
            rows = collate([Example(e.teacher_ids, e.target_ids) for e in examples], t.backbone.pad_id)
            teacher = position_logprobs(t.backbone, rows, t.prefix).to(student.device)  # (K, vocab)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def gold_loss(self, backbone: Backbone, prompt_input: torch.Tensor, examples: list[DistillExample]) -> torch.Tensor:
        """`loss_on` over the gold targets: mean cross-entropy per gold token."""
        return loss_on(backbone, prompt_input, [Example(e.input_ids, e.gold_ids) for e in examples])[0]


def distill(
    backbone: Backbone,
    task: TaskEncoder,
    config: DistillConfig,
    prompt_config: PromptConfig,
    train_config: TrainConfig,
    records: list[dict],
    out_dir: str | Path,
    valid_examples: list[Example] | None = None,
    teacher: Backbone | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Run:
    """Train a prompt for `task` on `backbone` by context distillation from `teacher` (default: `backbone` itself)
    reading `config.teacher_template` over `records`, which need labels only when `config.alpha` > 0. `out_dir`
    becomes an ordinary artifact: the best prompt on labelled `valid_examples`, or the last one without them."""
    train_config.check_select_by(task.config.task)  # before the teacher's answers are computed
    if prompt_config.slot_dropout:
        raise SoftPromptError("slot_dropout applies to train only: distillation's loss reads every slot of the "
                              "student's prompt; leave it at 0.")
    teacher_model = teacher or backbone
    check_vocabulary(teacher_model, backbone)
    teacher_model.model.to(training_device(backbone.device))  # where train() puts the student: its prefix is cached
    cached = Teacher.of(teacher_model, config.teacher_template)
    examples = distill_examples(task, cached, records, config, progress=progress)
    # holdout 0: its examples carry the teacher's answers, not the labels a validation set is scored by
    settings = _DistillTraining(**{**to_dict(train_config), "holdout": 0.0}, distillation=config)
    return train(backbone, task, prompt_config, settings, examples, out_dir, valid_examples, progress=progress,
                 resume=resume, objective=DistillObjective(cached, task, config.alpha))  # fmt: skip
