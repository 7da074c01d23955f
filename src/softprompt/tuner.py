"""The high-level API, three lines from data to predictions:

    tuner = PromptTuner("smollm2-135m", template="Review: {text}\\nSentiment:", labels=["negative", "positive"],
                        label_field="label")
    tuner.fit(train_records, valid=valid_records)
    tuner.predict(["A joyless, plodding mess."])

A thin layer over the library (`training.loop.train`, `scoring.evaluate.label_scores`, `scoring.generate.generate`,
`artifact`), set up by the same steps as the CLI (prepare.py): the same settings give the same prompt as
`softprompt train`, and the same predictions as `softprompt eval`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch

from . import artifact
from .config import PromptConfig, TaskConfig, TrainConfig, build_all
from .data import fill
from .errors import SoftPromptError
from .methods import PromptMethod
from .models import DEFAULT_MODEL, LoadConfig
from .prepare import Data, check_generation_fits, check_trainable, load_backbone, start_text, task_data
from .scoring.evaluate import label_scores
from .scoring.generate import decode_new
from .scoring.generate import generate as generate_ids
from .training.loop import train

Inputs = Union[str, Mapping, Sequence[Union[str, Mapping]]]
"""One input or several: a text fills every `{field}` of the template (TaskConfig.fill_text); a dict fills each
field by name (a template with several fields)."""

PROMPT_SETTINGS = [f.name for f in dataclasses.fields(PromptConfig) if f.name not in ("method", "num_tokens")]
TRAIN_SETTINGS = [f.name for f in dataclasses.fields(TrainConfig)]
LOAD_SETTINGS = [f.name for f in dataclasses.fields(LoadConfig)]


class PromptTuner:
    """A soft prompt for one task on a frozen model: `fit` trains it, `predict`/`score`/`generate` use it, `save`
    and `PromptTuner.load` keep it (an ordinary artifact folder, which every `softprompt` command reads)."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, template: str,
                 labels: Sequence[str] | str | None = None, label_field: str | None = None,
                 target_field: str | None = None, method: str = PromptConfig.method,
                 num_tokens: int | None = PromptConfig.num_tokens, out: str | os.PathLike | None = None,
                 progress: bool = True, **settings) -> None:  # fmt: skip
        """model: the embedded short name, a local Hugging Face folder or a hub name. Label words make the task
        classification (with `label_field`); a `target_field` without them, generation. `settings`: any other
        field of PromptConfig (init, init_text, prefix_mlp, ...), TrainConfig (steps, lr, batch_size, seed,
        report_to, ...) or LoadConfig (dtype, device, ...: how the model loads; it stays there through `fit`), with
        the same defaults as `softprompt train`. out: where `fit` writes the artifact, log and
        checkpoints (default: a new temporary folder per fit, kept; `self.out` says where)."""
        unknown = sorted(set(settings) - set(PROMPT_SETTINGS) - set(TRAIN_SETTINGS) - set(LOAD_SETTINGS))
        if unknown:
            raise SoftPromptError(f"PromptTuner: unknown setting(s) {', '.join(unknown)}. Prompt settings: "
                                  f"{', '.join(PROMPT_SETTINGS)}; training settings: {', '.join(TRAIN_SETTINGS)}; "
                                  f"model loading settings: {', '.join(LOAD_SETTINGS)}.")  # fmt: skip
        prompt = {k: v for k, v in settings.items() if k in PROMPT_SETTINGS}
        prompt["init_text"] = start_text(prompt.get("init"), prompt.get("init_text"), template)
        self.task_config, self._prompt_given, self.train_config, self.load_config = build_all(
            lambda: TaskConfig.infer(template, labels, label_field, target_field),
            lambda: PromptConfig(method=method, num_tokens=num_tokens, **prompt),
            lambda: TrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_SETTINGS}),
            lambda: LoadConfig(**{k: v for k, v in settings.items() if k in LOAD_SETTINGS}))
        # its length and init, as training takes them (a default start of demonstrations may be cut to the data)
        self.prompt_config = self._prompt_given.for_tasks([self.task_config.task])
        self.progress, self._out = progress, Path(out) if out is not None else None
        self.backbone = load_backbone(model, self.load_config)
        self.method: PromptMethod | None = None
        """The trained prompt (None before `fit` or `load`)."""
        self.summary: dict = {}
        """The training summary (best step, validation result, settings), as the artifact's config.json holds it."""
        self.out: Path | None = None
        """The folder of the last `fit` (artifact, metrics.jsonl, loss.png, checkpoints), or the loaded artifact."""
        self._prefix: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ training
    def fit(self, data: Data, valid: Data | None = None, *, resume: bool = False) -> PromptTuner:
        """Train the prompt on `data`, keeping the one that scores best on `valid`. Without `valid`, a seeded
        tenth of `data` (`TrainConfig.holdout`, at most `eval_size` examples) is held out of training to score on, as
        stderr says; with too little data to spare 16 examples, or holdout=0, the last prompt is kept.
        Returns the tuner itself. resume: continue the run in `out` from its newest checkpoint."""
        check_trainable(self.load_config)
        task, (train_examples, valid_examples) = task_data(
            self.task_config, self.backbone, {"the training data": data, "the validation data": valid},
            self._prompt_given.for_tasks([self.task_config.task]).num_tokens, self.train_config)
        out = self._out or Path(tempfile.mkdtemp(prefix="softprompt-"))
        if self.progress:
            print(f"softprompt: training into {out}", file=sys.stderr)
        run = train(self.backbone, task, self._prompt_given, self.train_config, train_examples, out, valid_examples,
                    progress=self.progress, resume=resume)  # fmt: skip
        self.method, self.summary, self.out, self._prefix = run.method, run.summary, out, None
        self.prompt_config = dataclasses.replace(self.prompt_config, num_tokens=run.method.config.num_tokens)
        return self

    # -------------------------------------------------------------------------------------------------- using it
    def predict(self, texts: Inputs, *, batch_size: int = 32, max_new_tokens: int = 32) -> list[str]:
        """The best label word for each input (classification, as `softprompt eval` ranks them), or its greedy
        continuation (generation, up to `max_new_tokens`)."""
        if self.task_config.task != "classification":
            return self.generate(texts, max_new_tokens=max_new_tokens)
        labels = self.task_config.labels
        return [labels[int(i)] for i in self._label_scores(texts, batch_size).argmax(-1)]

    def score(self, texts: Inputs, *, batch_size: int = 32, log: bool = False) -> list[dict[str, float]]:
        """Each input's probability of each label word, normalized over the label words (a softmax of the summed
        token log-probabilities that `predict` ranks). log=True: those summed log-probabilities themselves (over
        the whole vocabulary, so they need not sum to one). Classification only."""
        if self.task_config.task != "classification":
            raise SoftPromptError("score() ranks label words, and this is a generation task; use predict() or "
                                  "generate().")  # fmt: skip
        scores = self._label_scores(texts, batch_size)
        values = scores if log else scores.softmax(-1)
        return [dict(zip(self.task_config.labels, map(float, row))) for row in values]

    def generate(self, texts: Inputs, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None) -> list[str]:  # fmt: skip
        """The continuation of each input behind the prompt (greedy at temperature 0), as `softprompt generate`
        gives it: cut before the first `stop` string, special tokens dropped."""
        filled = self._filled(texts)
        ids = [self.backbone.tokenizer(text)["input_ids"] for text in filled]
        check_generation_fits(self.backbone, filled, ids, self.prompt_config.num_tokens, max_new_tokens)
        outputs = generate_ids(self.backbone, ids, self.prefix, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, stop=stop, seed=seed, progress=self.progress)
        return [decode_new(self.backbone.tokenizer, out, stop) for out in outputs]

    @property
    def prefix(self) -> torch.Tensor:
        """The trained prompt's per-layer key/value prefix (what every scoring and decoding path takes)."""
        if self.method is None:
            raise SoftPromptError("This PromptTuner has no prompt yet: call fit(), or PromptTuner.load(folder).")
        if self._prefix is None:
            with torch.no_grad():
                self._prefix = self.method.kv(self.backbone).detach()
        return self._prefix

    # ---------------------------------------------------------------------------------------------- save, load
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the prompt as an artifact folder (prompt.safetensors + config.json)."""
        if self.method is None:
            raise SoftPromptError("Nothing to save: call fit() first.")
        return artifact.save(folder, self.method, self.task_config, self.backbone, training=self.summary)

    @classmethod
    def load(cls, folder: str | os.PathLike, model: str | os.PathLike | None = None, *, progress: bool = True,
             **load_settings) -> PromptTuner:  # fmt: skip
        """A tuner holding the prompt saved in `folder` (by `save`, `softprompt train` or `import`), on its base
        model (or `model`, which must be the same one), loaded as `load_settings` (LoadConfig's fields: dtype,
        device, ...) say. A later `fit` trains anew with the saved settings."""
        saved = artifact.load(folder)
        training = saved.extra.get("training") or {}
        prompt = {k: v for k, v in dataclasses.asdict(saved.prompt).items() if k in PROMPT_SETTINGS}
        settings = {**prompt, **{k: v for k, v in training.items() if k in TRAIN_SETTINGS}}
        task = saved.task
        tuner = cls(model or saved.base_model, template=task.template, labels=task.labels,
                    label_field=task.label_field, target_field=task.target_field, method=saved.prompt.method,
                    num_tokens=saved.prompt.num_tokens, progress=progress, **settings, **load_settings)  # fmt: skip
        tuner.task_config = task
        tuner.method = artifact.attach(saved, tuner.backbone, str(folder))
        tuner.summary, tuner.out = training, Path(folder)
        return tuner

    # ------------------------------------------------------------------------------------------------- helpers
    def _inputs(self, texts: Inputs) -> list[dict]:
        """Each input as a record of the template's fields: a text in every field (as TaskConfig.fill_text puts
        it), a dict as it is."""
        c, records = self.task_config, []
        for i, item in enumerate(_as_list(texts)):
            missing = [] if isinstance(item, str) else [f for f in c.fields if f not in item]
            if missing:
                raise SoftPromptError(f"input {i + 1} lacks the field(s) {', '.join(missing)} that the template "
                                      f"{c.template!r} names.")  # fmt: skip
            records.append(dict.fromkeys(c.fields, item) if isinstance(item, str) else dict(item))
        return records

    def _filled(self, texts: Inputs) -> list[str]:
        """The template filled from each input."""
        c = self.task_config
        return [c.fill_text(x) if isinstance(x, str) else fill(c.template, record)
                for x, record in zip(_as_list(texts), self._inputs(texts))]  # fmt: skip

    def _label_scores(self, texts: Inputs, batch_size: int) -> torch.Tensor:
        """(inputs, labels) summed label-word log-probabilities, through the same encoding as `softprompt eval`
        (the same truncation of an over-long input), each input a record with a placeholder label that is never
        read."""
        c = self.task_config
        records = [{**record, c.label_field: c.labels[0]} for record in self._inputs(texts)]
        task, [examples] = task_data(c, self.backbone, {"the inputs": records}, self.prompt_config.num_tokens)
        return label_scores(self.backbone, task, examples, self.prefix, batch_size, self.progress)


def _as_list(texts: Inputs) -> list[str | Mapping]:
    return [texts] if isinstance(texts, (str, Mapping)) else list(texts)

