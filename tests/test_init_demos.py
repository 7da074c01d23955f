"""`--init demos` (issue 28, item 1): the prompt starts as the frozen model reading training examples with their
answers, and in training no row sees its own demonstration (leave-one-out).

- The start is checked against plain transformers: the demonstrations written out by hand (the seeded order, each
  example's input and answer, cut at --num-tokens), prefix tuning's K/V equal to the model's own cache over them,
  prompt tuning's vectors equal to its embedding rows.
- The leave-one-out loss equals the model run by hand behind that cache with the row's own slots removed (the
  remaining keys keep their positions; the row follows the slots it sees), for both methods; it differs from the
  loss without the mask, and a row that is no demonstration sees every slot.
- The loop hands the objective that mask for exactly the rows whose example is demonstrated; too little data for
  --num-tokens is refused with what to do; `softprompt train --init demos` runs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DynamicCache

from softprompt import methods
from softprompt.backbones import cache_keyword
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.errors import SoftPromptError
from softprompt.training.loop import loss_on, train
from softprompt.training.setup import PromptSet

from conftest import EOS, VOCAB, run_main, tiny_backbone
from test_cli import save_tiny_model, write_data

TASK = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")
TEXTS = ["great fun movie", "terrible boring film", "good book", "awful song was bad", "fine film really", "not fun"]
LABELS = ["positive", "negative", "positive", "negative", "positive", "negative"]


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone("llama")


def examples(backbone, generation: bool = False):
    config = TaskConfig(template="review {text} sentiment", task="generation", target_field="label") if generation \
        else TASK  # fmt: skip
    records = [{"text": t, "label": label} for t, label in zip(TEXTS, LABELS)]
    return TaskEncoder(config, backbone.tokenizer).encode(records)


def written_out(n: int, seed: int) -> tuple[list[int], dict[int, range]]:
    """The documented demonstrations, by hand: examples in the order of torch.randperm under the seed, each
    `review TEXT sentiment LABEL` (the newline gives no token in the tiny tokenizer; EOS, a special token, is left
    out), cut at n. Returns the ids and the slots of each example written (by its index in TEXTS)."""
    ids, slots = [], {}
    for i in torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(ids) < n:
            words = [VOCAB[w] for w in f"review {TEXTS[i]} sentiment {LABELS[i]}".split()]
            slots[i] = range(len(ids), min(n, len(ids) + len(words)))
            ids += words
    return ids[:n], slots


def demo_method(backbone, method: str, n: int, seed: int = 3, generation: bool = False):
    config = PromptConfig(method=method, num_tokens=n, init="demos")
    return methods.build(config, backbone, TASK.labels, torch.Generator().manual_seed(seed),
                         examples(backbone, generation))  # fmt: skip


def own_cache(model, ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_keyword(model): cache})
    return cache


@pytest.mark.parametrize("generation", [False, True])
def test_the_start_is_the_models_own_reading_of_the_examples_written_out(backbone, generation):
    n = 13  # two whole demonstrations and part of a third
    ids, slots = written_out(n, seed=3)
    assert len(slots) == 3 and len(slots[list(slots)[-1]]) < 6
    prefix = demo_method(backbone, "prefix", n, generation=generation)
    cache = own_cache(backbone.model, ids)
    for layer in range(backbone.shapes.num_layers):
        torch.testing.assert_close(prefix.prefix[layer, 0], cache.layers[layer].keys[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prefix.prefix[layer, 1], cache.layers[layer].values[0], rtol=1e-5, atol=1e-6)
    prompt = demo_method(backbone, "prompt", n, generation=generation)
    assert torch.equal(prompt.embeddings, backbone.model.get_input_embeddings().weight[ids])
    data = examples(backbone, generation)
    assert {i: range(s.start, s.stop) for i, e in enumerate(data)
            if (s := prompt.demo_slots.get(methods.demo_key(e)))} == slots  # fmt: skip


def test_too_little_data_for_the_length_is_refused_with_what_to_do(backbone):
    written = sum(len(t.split()) + 3 for t in TEXTS)  # review TEXT sentiment LABEL
    assert written == 35
    with pytest.raises(SoftPromptError, match=r"take 35 tokens, fewer than num_tokens 40; use --num-tokens 35"):
        demo_method(backbone, "prompt", 40)
    with pytest.raises(SoftPromptError, match="init=demos .* needs training data"):
        methods.build(PromptConfig(num_tokens=4, init="demos"), backbone)


def by_hand_loss(backbone, demo_ids: list[int], hidden: range, example) -> torch.Tensor:
    """Cross-entropy of one row behind the model's own cache over `demo_ids` with the `hidden` slots taken out: the
    keys that stay keep the positions they were computed at; the row's tokens follow the slots it sees."""
    model, full = backbone.model, own_cache(backbone.model, demo_ids)
    keep = [i for i in range(len(demo_ids)) if i not in hidden]
    cache = DynamicCache(config=model.config)
    for layer in range(len(full.layers)):
        cache.update(full.layers[layer].keys[:, :, keep], full.layers[layer].values[:, :, keep], layer)
    ids = example.input_ids + example.target_ids
    positions = torch.arange(len(keep), len(keep) + len(ids))[None]
    logits = model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=True,
                   **{cache_keyword(model): cache}).logits[0]  # fmt: skip
    start = len(example.input_ids) - 1  # the logits that predict the targets
    return F.cross_entropy(logits[start : start + len(example.target_ids)], torch.tensor(example.target_ids),
                           reduction="sum")  # fmt: skip


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_each_row_trains_without_its_own_demonstration(backbone, method):
    n = 13
    demo_ids, slots = written_out(n, seed=3)
    prompt = demo_method(backbone, method, n)
    data = examples(backbone)
    second, cut = list(slots)[1:]
    outside = next(i for i in range(len(data)) if i not in slots)
    rows = [data[second], data[outside], data[cut]]
    hidden = [slots[second], range(0), slots[cut]]
    prompts = PromptSet({"p": prompt})
    mask = prompts.training_mask(["p"] * 3, rows, prompt.training_input(backbone), None, seed=0)
    assert mask.tolist() == [[int(i not in h) for i in range(n)] for h in hidden]
    with torch.no_grad():
        ours, _ = loss_on(backbone, prompt.training_input(backbone), rows, normalizer=1, prefix_mask=mask)
        seeing_all, _ = loss_on(backbone, prompt.training_input(backbone), rows, normalizer=1)
        reference = sum(by_hand_loss(backbone, demo_ids, h, row) for row, h in zip(rows, hidden))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert abs(float(ours - seeing_all)) > 1e-3  # the mask matters


def test_with_several_prompts_side_by_side_a_row_hides_its_demonstration_in_its_own_prompts_span(backbone):
    prompts = PromptSet({"a": demo_method(backbone, "prefix", 4), "b": demo_method(backbone, "prefix", 13)})
    _, slots = written_out(13, seed=3)
    second = list(slots)[1]
    side_by_side = torch.tensor([[1] * 4 + [0] * 13, [0] * 4 + [1] * 13])
    data = examples(backbone)
    mask = prompts.training_mask(["a", "b"], [data[second], data[second]], torch.zeros(0), side_by_side, seed=0)
    assert mask[0].tolist() == side_by_side[0].tolist()  # in a's 4 slots only the first example is written
    assert mask[1].tolist() == [0] * 4 + [int(i not in slots[second]) for i in range(13)]


def test_the_loop_gives_the_objective_each_rows_mask(backbone, tmp_path):
    """Through `train`: every batch's mask hides exactly the slots of the demonstrated rows (checked against the
    spans), and the run trains (its prompt moves)."""
    data = examples(backbone)
    seen = []

    def spy(backbone, prompt_input, rows, normalizer=None, prefix_mask=None):
        seen.append((rows, prefix_mask))
        return loss_on(backbone, prompt_input, rows, normalizer, prefix_mask)

    config = PromptConfig(method="prefix", num_tokens=13, init="demos")
    run = train(backbone, TaskEncoder(TASK, backbone.tokenizer), config,
                TrainConfig(steps=4, batch_size=3, lr=0.05, warmup_steps=0, seed=3), data, tmp_path / "run",
                progress=False, objective=spy)  # fmt: skip
    start = demo_method(backbone, "prefix", 13)
    _, slots = written_out(13, seed=3)
    hidden_rows = 0
    for rows, mask in seen:
        expected = torch.ones(len(rows), 13, dtype=torch.long)
        for r, row in enumerate(rows):
            index = next(i for i, e in enumerate(data) if e is row)
            if index in slots:
                expected[r, list(slots[index])] = 0
                hidden_rows += 1
        assert torch.equal(mask if mask is not None else torch.ones_like(expected), expected)
    assert hidden_rows == 6  # two epochs of the 6 examples, 3 of them demonstrated
    assert not torch.equal(run.method.prefix, start.prefix)
    assert run.summary["demonstrations"] == 3


def test_the_command_line_trains_from_demos(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    train_file = write_data(tmp_path / "train.jsonl", 12, seed=1)
    code, out, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", train_file, "--template", "review {text} sentiment",
        "--labels", "negative,positive", "--label-field", "label", "--init", "demos", "--num-tokens", 12, "--steps", 2, "--batch-size", 4,
        "--out", tmp_path / "run", "--no-progress"])  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "run" / "prompt.safetensors").exists()
    assert '"init": "demos"' in (tmp_path / "run" / "config.json").read_text()


def start(config: PromptConfig, kinds: list[str]) -> tuple[int, str]:
    resolved = config.for_tasks(kinds)
    return resolved.num_tokens, resolved.init


def test_unset_length_and_init_take_the_start_measured_for_the_method_and_task():
    unset = PromptConfig(init_text="review")
    assert start(unset, ["generation"]) == (96, "demos")
    assert start(unset, ["classification"]) == start(PromptConfig(init="text", init_text="r"), ["classification"])
    assert start(unset, ["classification"]) == (10, "text")
    assert start(unset, ["generation", "classification"]) == start(unset, []) == (20, "text")
    prompt = PromptConfig(method="prompt", init_text="r")
    assert start(prompt, ["generation"]) == start(prompt, ["classification"]) == (20, "text")
    assert start(PromptConfig(init="vocab"), ["generation"]) == (20, "vocab")  # a given init keeps 20 tokens
    assert start(PromptConfig(init="labels"), ["classification"]) == (20, "labels")
    assert start(PromptConfig(num_tokens=7), ["generation"]) == (7, "demos")


@pytest.mark.parametrize("generation", [True, False])
def test_the_command_without_num_tokens_or_init_starts_as_measured(tmp_path, monkeypatch, capsys, generation):
    """No --num-tokens, --init or --method: a generation task gets 96 tokens of demonstrations (their slots hidden
    from their own rows), a classification task 10 tokens of the template's words."""
    model = save_tiny_model(tmp_path / "tiny")
    train_file = write_data(tmp_path / "train.jsonl", 40, seed=1)
    task = ["--target-field", "label"] if generation else ["--labels", "negative,positive", "--label-field", "label"]
    code, out, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", train_file, "--template", "review {text} sentiment", *task,
        "--steps", 1, "--batch-size", 4, "--holdout", 0, "--out", tmp_path / "run", "--no-progress"])  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = (96, "demos") if generation else (10, "text")
    assert (saved["method"], saved["num_tokens"], saved["init"]) == ("prefix", *expected)
    (prefix,) = load_file(tmp_path / "run" / "prompt.safetensors").values()  # (layers, 2, kv_heads, n, head_dim)
    assert prefix.shape[-2] == expected[0]


@pytest.mark.parametrize("given", [False, True])
def test_a_default_start_of_demonstrations_takes_what_little_data_fills(tmp_path, monkeypatch, capsys, given):
    """Eight examples of `review W W W W sentiment LABEL` fill 56 tokens: with no --num-tokens the prompt takes all
    56 and says so; a length asked for (96) is refused with the length the data fill."""
    model = save_tiny_model(tmp_path / "tiny")
    train_file = write_data(tmp_path / "train.jsonl", 8, seed=1)
    written = sum(len(json.loads(line)["text"].split()) + 3 for line in train_file.read_text().splitlines())
    assert written == 56
    code, out, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", train_file, "--template", "review {text} sentiment", "--target-field",
        "label", "--steps", 1, "--batch-size", 4, "--holdout", 0, "--out", tmp_path / "run", "--no-progress",
        *(["--num-tokens", 96] if given else [])])  # fmt: skip
    if given:
        assert code != 0 and "take 56 tokens, fewer than num_tokens 96; use --num-tokens 56" in err
        assert not (tmp_path / "run" / "prompt.safetensors").exists()
        return
    assert code == 0, err
    assert "fill 56 tokens, fewer than the 96 of the demonstrations start: the prompt takes 56" in err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["num_tokens"], saved["init"]) == (56, "demos")
    (prefix,) = load_file(tmp_path / "run" / "prompt.safetensors").values()  # (layers, 2, kv_heads, n, head_dim)
    assert prefix.shape[-2] == 56
