"""Setting up a run: the steps between configs and training or scoring that the CLI, the tuner, the demo and the
examples share (read the data, load the model, fit the task to it, encode), so each is written (and checked) once."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from . import artifact
from .config import PLACEHOLDER, PromptConfig, TaskConfig, TrainConfig
from .data import Example, Records, TaskEncoder, read_records
from .errors import SoftPromptError
from .models import LoadConfig, context_size, requested_dtype
from .training.setup import FLOAT16_REFUSED

if TYPE_CHECKING:
    from .backbones import Backbone
    from .methods import PromptMethod

Data = Union[str, os.PathLike, Iterable[Mapping]]
"""Records: a list of dicts, a `datasets.Dataset` (or anything iterable of dicts with `column_names`), or a data
file or folder as `--train` takes it (.jsonl, .csv, .tsv, .parquet, a save_to_disk folder)."""


def load_backbone(model: str | os.PathLike, load: LoadConfig | None = None, training: bool = False) -> Backbone:
    """The frozen model behind every command (the embedded short name, a local folder or a hub name), loaded as
    `load` says. `training`: what a training run cannot use is refused before any weight is read."""
    from .backbones import backbone_for
    from .models import load_model

    load = load or LoadConfig()
    if training:
        check_trainable(load)
    return backbone_for(*load_model(str(model), load))


def check_trainable(load: LoadConfig) -> None:
    """Refuse the loading settings a training run cannot use, each with what to use instead."""
    if load.device_map == "auto":
        raise SoftPromptError("--device-map auto is for eval, generate and serve; to train a model larger than one "
                              "GPU, shard it over several with `accelerate launch ... train --shard-model`.")
    if requested_dtype(load.dtype) == "float16":  # also where $SOFTPROMPT_DTYPE makes auto float16
        raise SoftPromptError(FLOAT16_REFUSED)


def check_memory(model: str | os.PathLike, load: LoadConfig, prompt_config: PromptConfig,
                 train_config: TrainConfig, candidates: int = 1,
                 data: Sequence[tuple[TaskConfig, list[dict]]] = ()) -> None:  # fmt: skip
    """Print a training run's estimated peak memory (training/memory.py: from the model's config alone) and refuse
    the run, before any weight is read, where the device cannot hold it. A sharded run splits the weights over its
    processes, and is only printed. `data`, each task's training records: its rows bound the estimate where they
    are shorter than max_length (with a 262 k-word vocabulary, logits over 512 positions would refuse a run of
    sentences that fits)."""
    from transformers import AutoConfig

    from .models import locate, resolve_device, resolve_dtype
    from .training.memory import check_fits, estimate_run

    check_trainable(load)
    path, local_only = locate(str(model))
    device = resolve_device(load.device)
    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    lengths = _longest_rows(path, local_only, data, train_config.max_length) if data else {}
    try:
        estimate = estimate_run(config, prompt_config, train_config, dtype=resolve_dtype(load.dtype, device),
                                bits=load.bits, processes=int(os.environ.get("WORLD_SIZE", 1)),
                                candidates=candidates, **lengths)  # fmt: skip
    except Exception as error:  # a config shape the estimate does not know: train without it rather than refuse
        warnings.warn(f"no memory estimate for {config.model_type} models ({type(error).__name__}: {error}); "
                      "training starts without one.")  # fmt: skip
        return
    print(f"softprompt: estimated peak memory {estimate.text} on {device}", file=sys.stderr, flush=True)
    if not train_config.shard_model:
        check_fits(estimate, device)


def _longest_rows(path: str, local_only: bool, data: Sequence[tuple[TaskConfig, list[dict]]],
                  max_length: int) -> dict[str, int]:  # fmt: skip
    """The longest row (input and target) and the longest target of `data` as training will encode it (the
    tokenizer alone: no weight is read). Problems in the data are left to the encoding after loading to report."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    try:
        with warnings.catch_warnings():  # inputs cut to max_length: said once, when the data is encoded for training
            warnings.simplefilter("ignore")
            examples = [e for config, records in data
                        for e in TaskEncoder(config, tokenizer, max_length).encode(records)]  # fmt: skip
    except SoftPromptError:
        return {}
    return {"max_length": max(len(e.input_ids) + len(e.target_ids) for e in examples),
            "target_length": max(len(e.target_ids) for e in examples)}


def template_init_text(template: str) -> str:
    """The literal words of a template (placeholders dropped), the default text for `init=text`: the prompt starts
    as the task's own wording. "Answer:" where the template is placeholders only."""
    return " ".join(PLACEHOLDER.sub(" ", template).split()) or "Answer:"


def start_text(init: str | None, init_text: str | None, template: str) -> str | None:
    """The init_text a prompt gets: the one given, else where its start may be text (init text, or unset: text may
    be the default start) the template's literal words (`template_init_text`), as `train` and `PromptTuner` do."""
    return init_text or (template_init_text(template) if init in (None, "text") else None)


def fitted_task(config: TaskConfig, backbone: Backbone, virtual_tokens: int = 0,
                max_length: int = TrainConfig.max_length,
                too_long: str = TrainConfig.too_long) -> TaskEncoder:  # fmt: skip
    """`config` bound to `backbone`'s tokenizer, its max_length capped to the model's context less the
    `virtual_tokens` a prompt takes: a longer example would run past the positions the model has."""
    return TaskEncoder(config, backbone.tokenizer, max_length, too_long=too_long, context=context_size(backbone.model),
                virtual_tokens=virtual_tokens)  # fmt: skip


def task_data(config: TaskConfig, backbone: Backbone, splits: Mapping[str, Data | None], virtual_tokens: int = 0,
              train: TrainConfig | None = None) -> tuple[TaskEncoder, list[list[Example] | None]]:  # fmt: skip
    """Fit `config` to `backbone` (fitted_task, with `train`'s max_length and too_long) and encode each of `splits`
    with it, read as `read_data` reads them: the encoder and the examples in the order of `splits`, None for a
    split that is None. A split's key is the name its problems go by where it names none itself (a file)."""
    train = train or TrainConfig()
    task = fitted_task(config, backbone, virtual_tokens, train.max_length, train.too_long)
    return task, [None if data is None else task.encode(*read_data(data, name)) for name, data in splits.items()]


def read_data(data: Data, what: str) -> tuple[list[dict], str]:
    """Records from any of the kinds `Data` names, and the name problems in them go by (`what`, or the file's)."""
    if isinstance(data, (str, os.PathLike)):
        return read_records(data), str(data)
    if isinstance(data, Records):  # read from a file already, which it names
        return data, data.path
    columns = getattr(data, "column_names", None)
    if isinstance(columns, Mapping):  # a datasets.DatasetDict
        raise SoftPromptError(f"{what} is a DatasetDict (splits: {', '.join(columns)}); pass one split, e.g. "
                              f"data[{next(iter(columns), 'train')!r}].")  # fmt: skip
    if isinstance(data, Mapping):  # e.g. columns as lists, or splits
        raise SoftPromptError(f"{what} is one dict (keys: {', '.join(map(str, data))}); pass a list of dicts, one "
                              "per record, a datasets.Dataset, or a data file path.")  # fmt: skip
    try:
        rows = list(data)  # a list of dicts; a datasets.Dataset yields one dict per row
    except TypeError:
        raise SoftPromptError(f"{what} is of type {type(data).__name__}: pass a list of dicts, a datasets.Dataset, "
                              "or a data file path.") from None  # fmt: skip
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SoftPromptError(
                f"{what}: item {i + 1} is a {type(row).__name__}, not a record (a dict of fields); pass a list of "
                "dicts, a datasets.Dataset or a data file path (a pandas DataFrame: df.to_dict('records'))."
            )
    rows = [dict(row) for row in rows]
    features = getattr(data, "features", None)  # a datasets.Dataset's: its ClassLabel columns are checked as a file's
    class_labels = {name: list(f.names) for name, f in features.items() if type(f).__name__ == "ClassLabel"} \
        if isinstance(features, Mapping) else {}  # fmt: skip
    if class_labels:
        return Records(rows, what, list(range(1, len(rows) + 1)), unit="row", class_labels=class_labels), what
    return rows, what


def check_generation_fits(backbone: Backbone, texts: list[str], ids: list[list[int]], virtual_tokens: int,
                          max_new_tokens: int) -> None:  # fmt: skip
    """Refuse inputs (`texts`, tokenized as `ids`) that, after `virtual_tokens` and with `max_new_tokens` generated,
    would run past the model's context: positions beyond it have no trained embedding."""
    context = context_size(backbone.model)
    over = [f"{t!r} ({len(i)} tokens)" for t, i in zip(texts, ids)
            if context and virtual_tokens + len(i) + max_new_tokens > context]  # fmt: skip
    if over:
        raise SoftPromptError(f"Longer than the model's context of {context} positions with {virtual_tokens} virtual "
                              f"tokens and --max-new-tokens {max_new_tokens}: {', '.join(over)}; shorten them or "
                              "generate less.")  # fmt: skip


def transfer_source(prompt_dir: str | Path, backbone: Backbone, where: str | None = None) -> PromptMethod:
    """The trained prompt in `prompt_dir` as the start of a new training (transfer, SPoT): pass it to `train` as
    `init_method`, with its `.config`, since its method and length replace the configured ones. A prompt trained on
    another base model is refused (`where` names it in that message): it would load but start from nonsense."""
    return artifact.attach(artifact.load(prompt_dir), backbone, where or f"the source prompt {prompt_dir}")
