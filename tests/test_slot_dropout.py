"""Slot dropout (`PromptConfig.slot_dropout`, `--slot-dropout`): in training each row hides each slot of its prompt
with the probability asked, drawn anew per row and step (token dropout, as in context tuning).

- The mask hides slots at about that rate, only inside the row's own prompt, never all of a row's slots, and the same
  seed draws the same mask; a prompt without dropout is left as it was (no mask at all when nothing is hidden).
- The loss under such a mask equals the model run by hand behind the prompt's cache with the hidden slots taken
  out (the keys that stay keep their positions; the row's tokens follow the slots it sees), for both methods.
- Through `train`: the masks the objective gets hide slots, a run repeats itself exactly, a run stopped and resumed
  ends as the straight run; the grid and the command line take the setting.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DynamicCache

from softprompt import methods
from softprompt.backbones import cache_keyword
from softprompt.config import PromptConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.errors import SoftPromptError
from softprompt.training.checkpoint import latest_checkpoint
from softprompt.training.distill import DistillConfig, distill
from softprompt.training.loop import loss_on, train
from softprompt.training.search import parse_grid
from softprompt.training.setup import PromptSet

from conftest import run_main
from test_cli import save_tiny_model, write_data
from test_init_demos import TASK, backbone, examples  # noqa: F401 (backbone: the module's tiny model fixture)


def prompt(backbone, method: str = "prefix", n: int = 10, dropout: float = 0.0, seed: int = 0):
    config = PromptConfig(method=method, num_tokens=n, init="random", slot_dropout=dropout)
    return methods.build(config, backbone, TASK.labels, torch.Generator().manual_seed(seed))


def test_slots_are_hidden_at_the_rate_asked_and_only_in_the_rows_own_prompt(backbone):
    prompts = PromptSet({"a": prompt(backbone, n=10, dropout=0.3), "b": prompt(backbone, n=6)})
    rows = 400
    names = ["a", "b"] * (rows // 2)
    side_by_side = torch.tensor([[1] * 10 + [0] * 6, [0] * 10 + [1] * 6] * (rows // 2))  # each prompt its own span
    data = examples(backbone)
    mask = prompts.training_mask(names, [data[0]] * rows, torch.zeros(0), side_by_side, seed=1)
    a, b = mask[0::2], mask[1::2]
    assert torch.equal(b, side_by_side[1::2])  # no dropout: as it was
    assert not a[:, 10:].any()  # a's rows never see b's slots
    hidden = 1 - a[:, :10].float().mean()
    assert 0.26 < hidden < 0.34  # 2,000 draws at 0.3: four standard deviations either side
    assert (a.sum(dim=1) >= 1).all()
    assert torch.equal(mask, prompts.training_mask(names, [data[0]] * rows, torch.zeros(0), side_by_side, seed=1))
    assert not torch.equal(mask, prompts.training_mask(names, [data[0]] * rows, torch.zeros(0), side_by_side,
                                                       seed=2))  # fmt: skip
    unmasked = PromptSet({"b": prompt(backbone, n=6)})
    assert unmasked.training_mask(["b"] * 3, data[:3], torch.zeros(1, 6, 8), None, seed=1) is None


def test_a_row_keeps_at_least_one_slot(backbone):
    prompts = PromptSet({"a": prompt(backbone, n=2, dropout=0.95)})
    mask = prompts.training_mask(["a"] * 300, [examples(backbone)[0]] * 300, torch.zeros(1, 2, 8), None, seed=3)
    assert (mask.sum(dim=1) >= 1).all()
    assert (mask.sum(dim=1) == 1).any() and (mask == 0).any()


def own_cache(backbone, method, kept: list[int]) -> DynamicCache:
    """The prompt's key/values with only the `kept` slots: prefix tuning's prefix as it is; prompt tuning's, the
    model's own cache over all of P (its slots see each other, as `kv()` runs them), then cut."""
    model, cache = backbone.model, DynamicCache(config=backbone.model.config)
    if hasattr(method, "prefix"):
        for layer, kv in enumerate(method.prefix.detach()):  # (2, kv_heads, n, head_dim) per layer
            cache.update(kv[0][None, :, kept], kv[1][None, :, kept], layer)
        return cache
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=method.embeddings.detach()[None], use_cache=True, **{cache_keyword(model): full})
    for layer in range(len(full.layers)):
        cache.update(full.layers[layer].keys[:, :, kept], full.layers[layer].values[:, :, kept], layer)
    return cache


def by_hand_loss(backbone, method, kept: list[int], example) -> torch.Tensor:
    ids = example.input_ids + example.target_ids
    positions = torch.arange(len(kept), len(kept) + len(ids))[None]
    logits = backbone.model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=True,
                            **{cache_keyword(backbone.model): own_cache(backbone, method, kept)}).logits[0]  # fmt: skip
    start = len(example.input_ids) - 1  # the logits that predict the targets
    return F.cross_entropy(logits[start : start + len(example.target_ids)], torch.tensor(example.target_ids),
                           reduction="sum")  # fmt: skip


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_the_loss_under_dropout_is_the_model_behind_the_slots_each_row_sees(backbone, method):
    p = prompt(backbone, method, n=8, dropout=0.5, seed=4)
    rows = examples(backbone)
    mask = PromptSet({"p": p}).training_mask(["p"] * len(rows), rows, p.training_input(backbone), None, seed=5)
    assert (mask == 0).any() and len({tuple(m) for m in mask.tolist()}) > 1
    with torch.no_grad():
        ours, _ = loss_on(backbone, p.training_input(backbone), rows, normalizer=1, prefix_mask=mask)
        seeing_all, _ = loss_on(backbone, p.training_input(backbone), rows, normalizer=1)
        reference = sum(by_hand_loss(backbone, p, [i for i, seen in enumerate(m) if seen], row)
                        for row, m in zip(rows, mask.tolist()))  # fmt: skip
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert abs(float(ours - seeing_all)) > 1e-3  # the mask matters


def spying(seen: list):
    def objective(backbone, prompt_input, rows, normalizer=None, prefix_mask=None):
        seen.append(prefix_mask)
        return loss_on(backbone, prompt_input, rows, normalizer, prefix_mask)

    return objective


def test_a_run_hides_slots_in_training_and_repeats_itself(backbone, tmp_path):
    data = examples(backbone)
    config = PromptConfig(method="prefix", num_tokens=6, init="random", slot_dropout=0.4)
    cfg = TrainConfig(steps=4, batch_size=3, lr=0.05, warmup_steps=0, seed=3, eval_every=2)
    runs, seen = [], [[], []]
    for i in range(2):
        runs.append(train(backbone, TaskEncoder(TASK, backbone.tokenizer), config, cfg, data[:4], tmp_path / str(i),
                          data[4:], progress=False, objective=spying(seen[i])))  # fmt: skip
    assert len(seen[0]) == 4 and all(m is not None and m.shape == (3, 6) for m in seen[0])
    assert all((m == 0).any() for m in seen[0]) and len({tuple(m.flatten().tolist()) for m in seen[0]}) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))
    assert torch.equal(runs[0].method.prefix, runs[1].method.prefix)


class Stop(Exception):
    """Ends a run mid-step, as a kill would."""


def test_a_run_stopped_and_resumed_draws_what_the_straight_run_drew(backbone, tmp_path):
    data = examples(backbone)
    config = PromptConfig(method="prompt", num_tokens=5, init="random", slot_dropout=0.3)
    cfg = TrainConfig(steps=6, batch_size=2, lr=0.05, warmup_steps=0, seed=1, eval_every=0, checkpoint_every=3)
    task = TaskEncoder(TASK, backbone.tokenizer)
    straight = []
    train(backbone, task, config, cfg, data, tmp_path / "straight", progress=False, objective=spying(straight))
    calls = []

    def stopping(*args, **kwargs):
        if len(calls) == 5:
            raise Stop
        return spying(calls)(*args, **kwargs)

    with pytest.raises(Stop):
        train(backbone, task, config, cfg, data, tmp_path / "stopped", progress=False, objective=stopping)
    assert latest_checkpoint(tmp_path / "stopped").name == "step-0000003.pt"
    resumed = []
    train(backbone, task, config, cfg, data, tmp_path / "stopped", progress=False, objective=spying(resumed),
          resume=True)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], resumed, strict=True))
    a, b = (load_file(tmp_path / out / "prompt.safetensors") for out in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_grid_and_the_command_line_take_slot_dropout(backbone, tmp_path, monkeypatch, capsys):
    candidates, _ = parse_grid("slot_dropout=0,0.2", PromptConfig(init_text="review"), TrainConfig(), "classification")
    assert [c.name for c in candidates] == ["prefix-text-10-lr0p03", "prefix-text-10-drop0p2-lr0p03"]
    assert [c.prompt.slot_dropout for c in candidates] == [0.0, 0.2]
    with pytest.raises(SoftPromptError, match="slot_dropout must be at least 0 and below 1, got 1.0"):
        PromptConfig(slot_dropout=1.0)
    with pytest.raises(SoftPromptError, match="slot_dropout applies to train only"):  # its loss reads every slot
        distill(backbone, TaskEncoder(TASK, backbone.tokenizer), DistillConfig("say {text}"),
                PromptConfig(slot_dropout=0.2), TrainConfig(), [], tmp_path / "distilled")  # fmt: skip
    model = save_tiny_model(tmp_path / "tiny")
    train_file = write_data(tmp_path / "train.jsonl", 12, seed=1)
    code, out, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", train_file, "--template", "review {text} sentiment",
        "--labels", "negative,positive", "--label-field", "label", "--slot-dropout", 0.2, "--steps", 2,
        "--batch-size", 4, "--out", tmp_path / "run", "--no-progress"])  # fmt: skip
    assert code == 0, err
    assert '"slot_dropout": 0.2' in (tmp_path / "run" / "config.json").read_text()
