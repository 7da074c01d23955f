"""`train --search`: candidates side by side in one mixed batch learn exactly as each would alone (against explicit
[P; E] gradients and against runs of one candidate), the halving keeps the better half by the validation log and
stops computing for the rest, and the run leaves the best candidate's artifact, the table and the plot; the command
with its default candidates, on a classification and on a generation task, keeps what `train` gives each alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from softprompt import methods
from softprompt.training import search
from softprompt.config import PromptConfig, TrainConfig
from softprompt.errors import SoftPromptError
from softprompt.training.search import Candidate, Halving, parse_grid, rungs, train_candidates
from softprompt.training.loop import TrainingTask, loss_on, prompt_input_for, selection_key, train

from conftest import run_main
from test_cli import save_tiny_model, write_data
from test_train import llama  # noqa: F401  (the fixture)
from test_train import explicit_gradient, read_log, sentiment_records, sentiment_task, train_config


def cand(method="prompt", n=4, lr=0.05, init="random", **kw) -> Candidate:
    return Candidate(PromptConfig(method=method, num_tokens=n, init=init, **kw), lr)


@pytest.fixture
def data(llama):
    task = sentiment_task(llama)
    return task, task.encode(sentiment_records(48, seed=1), "train"), task.encode(sentiment_records(24, seed=2))


def side_by_side(backbone, task, train_examples, candidates, cfg, out, valid=(), rung_steps=(), resume=False):
    """The search's training run itself, with chosen rungs."""
    tasks = {}
    for c in candidates:
        init = methods.build(c.prompt, backbone, task.config.labels, torch.Generator().manual_seed(cfg.seed))
        tasks[c.name] = TrainingTask(task, train_examples, list(valid), init)
    halving = Halving({c.name: c.lr for c in candidates}, tuple(rung_steps))
    return train_candidates(backbone, tasks, candidates[0].prompt, cfg, out, halving, False, resume)


# ------------------------------------------------------------------------------------- as each would learn alone
def test_mixed_batch_gradient_of_each_candidate_is_its_own_explicit_gradient(llama, data):
    """One forward over every candidate's copy of the rows (prompts of 4 and 6 tokens, so one is left-padded with
    masked slots): d(sum of the candidates' mean losses)/dP_c equals P_c's gradient with the model reading [P_c; E]
    alone, row by row."""
    task, examples, _ = data
    rows = examples[:5]
    prompts = {n: methods.build(PromptConfig(method="prompt", num_tokens=n, init="random"), llama,
                                generator=torch.Generator().manual_seed(n)) for n in (4, 6)}  # fmt: skip
    names = [name for name in prompts for _ in rows]
    kv, mask = prompt_input_for(llama, {name: p.kv(llama) for name, p in prompts.items()}, names)
    normalizer = sum(len(e.target_ids) for e in rows)
    loss, _ = loss_on(llama, kv, rows * len(prompts), normalizer, mask)
    loss.backward()
    for prompt in prompts.values():
        expected = explicit_gradient(llama, prompt.embeddings, rows)
        torch.testing.assert_close(prompt.embeddings.grad, expected, atol=1e-5, rtol=1e-4)


def test_each_candidate_ends_where_it_would_alone(llama, data, tmp_path):
    """Three candidates (prompt tuning of two lengths and learning rates, prefix tuning) trained side by side for 6
    steps: each final prompt equals the one `train` gives that candidate alone (same batches, its own clipping)."""
    task, examples, _ = data
    candidates = [cand(n=4, lr=0.05), cand(n=6, lr=0.01), cand("prefix", n=3, lr=0.02)]
    cfg = train_config(steps=6, warmup_steps=2, max_grad_norm=0.05)  # clipping active: each candidate's own norm
    together = side_by_side(llama, task, examples, candidates, cfg, tmp_path / "together")
    for c in candidates:
        alone = train(llama, task, c.prompt, train_config(steps=6, warmup_steps=2, max_grad_norm=0.05, lr=c.lr),
                      examples, tmp_path / c.name, progress=False)  # fmt: skip
        for key, tensor in alone.method.artifact_tensors().items():
            torch.testing.assert_close(together[c.name].method.artifact_tensors()[key], tensor, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ halving
def test_rungs_halve_until_one_is_left():
    assert rungs(300, 6) == (38, 75, 150)
    assert rungs(300, 4) == (75, 150)
    assert rungs(300, 2) == (150,)
    assert rungs(300, 1) == ()
    assert rungs(3, 8) == (1, 2)  # too few steps for three halvings: no rung twice


def test_dropped_candidates_stop_costing_compute(llama, data, tmp_path, monkeypatch):
    """4 candidates, rungs at 2 and 4: training forwards carry 4, then 2, then 1 copy of the batch's rows, and
    only the prompts still training compute their K/V in them."""
    task, examples, valid = data
    candidates = [cand(lr=lr) for lr in (0.2, 0.05, 0.01, 0.002)]
    forward_rows, kv_calls = [], []
    target_hidden = type(llama).target_hidden

    def spy(self, batch, prefix, prefix_mask=None):
        if torch.is_grad_enabled():
            forward_rows.append(batch.input_ids.shape[0])
        return target_hidden(self, batch, prefix, prefix_mask)

    monkeypatch.setattr(type(llama), "target_hidden", spy)
    training_input = methods.REGISTRY["prompt"].training_input  # what a training step asks each prompt for
    monkeypatch.setattr(methods.REGISTRY["prompt"], "training_input",
                        lambda self, b: kv_calls.append(torch.is_grad_enabled()) or training_input(self, b))  # fmt: skip
    cfg = train_config(steps=6, batch_size=8)
    runs = side_by_side(llama, task, examples, candidates, cfg, tmp_path, valid, rung_steps=(2, 4))
    assert forward_rows == [32, 32, 16, 16, 8, 8]
    assert sum(kv_calls) == 4 + 4 + 2 + 2 + 1 + 1  # under gradient: one per candidate still training, per step
    assert sorted(r.summary["last_step"] for r in runs.values()) == [2, 2, 4, 6]


def test_halving_keeps_the_better_half_by_the_validation_log(llama, data, tmp_path):
    """At each rung the candidates kept are those whose best logged validation result so far ranks in the upper
    half (accuracy, then gold log-probability), recomputed here from metrics.jsonl."""
    task, examples, valid = data
    candidates = [cand(lr=lr, n=n) for lr, n in ((0.3, 2), (0.1, 4), (0.01, 4), (0.003, 2), (0.03, 3))]
    cfg = train_config(steps=8, batch_size=8, eval_every=1)
    runs = side_by_side(llama, task, examples, candidates, cfg, tmp_path, valid, rung_steps=rungs(8, 5))
    _, valid_log = read_log(tmp_path)
    live = [c.name for c in candidates]
    for rung in rungs(8, 5):
        best = {name: max(selection_key(r["valid"]) for r in valid_log if r["candidate"] == name and r["step"] <= rung)
                for name in live}  # fmt: skip
        ranked = sorted(live, key=lambda name: best[name], reverse=True)
        live = ranked[: math.ceil(len(ranked) / 2)]
        for name in ranked[len(live) :]:
            assert runs[name].summary["last_step"] == rung
            assert not [r for r in valid_log if r["candidate"] == name and r["step"] > rung]
    assert [name for name, run in runs.items() if run.summary["last_step"] == 8] == live


def test_a_resumed_search_continues_with_the_candidates_it_had_kept(llama, data, tmp_path):
    """A search stopped after step 3 (one rung passed) and resumed to step 6 ends with the very prompts, bests and
    steps of the uninterrupted run (constant learning rate, so stopping early does not bend the schedule)."""
    task, examples, valid = data
    candidates = [cand(lr=lr) for lr in (0.2, 0.05, 0.01)]
    cfg = dict(batch_size=8, eval_every=1, schedule="constant", warmup_steps=0, checkpoint_every=1)
    whole = side_by_side(llama, task, examples, candidates, train_config(steps=6, **cfg), tmp_path / "whole", valid,
                         rung_steps=(2, 4))  # fmt: skip
    side_by_side(llama, task, examples, candidates, train_config(steps=3, **cfg), tmp_path / "parts", valid,
                 rung_steps=(2, 4))  # fmt: skip
    resumed = side_by_side(llama, task, examples, candidates, train_config(steps=6, **cfg), tmp_path / "parts", valid,
                           rung_steps=(2, 4), resume=True)  # fmt: skip
    for name, run in whole.items():
        assert resumed[name].summary["last_step"] == run.summary["last_step"]
        assert resumed[name].summary["best_step"] == run.summary["best_step"]
        for key, tensor in run.method.artifact_tensors().items():
            assert torch.equal(resumed[name].method.artifact_tensors()[key], tensor), name
    assert sorted(r.summary["last_step"] for r in whole.values()) == [2, 4, 6]


def test_a_candidate_holding_non_finite_values_leaves_before_it_runs(llama, data, tmp_path):
    task, examples, _ = data
    candidates = [cand(lr=0.05), cand(lr=0.01)]
    poisoned = methods.build(candidates[0].prompt, llama, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        poisoned.embeddings[0, 0] = float("nan")
    tasks = {c.name: TrainingTask(task, examples, [], poisoned if i == 0 else None) for i, c in enumerate(candidates)}
    halving = Halving({c.name: c.lr for c in candidates}, ())
    runs = train_candidates(llama, tasks, candidates[1].prompt, train_config(steps=3), tmp_path, halving, False)
    assert runs[candidates[0].name].summary["last_step"] == 1
    assert runs[candidates[1].name].summary["last_step"] == 3
    assert torch.isfinite(runs[candidates[1].name].method.embeddings).all()


def test_a_candidate_whose_gradient_is_not_finite_leaves(llama, data, tmp_path, monkeypatch):
    """The 5-token candidate's prompt gets a NaN gradient from step 2 on: it stops there, with its last finite prompt,
    and the other trains on unharmed (its prompt equals a run of it alone)."""
    task, examples, _ = data
    training_input, steps_seen = methods.REGISTRY["prompt"].training_input, []

    def poisoned(self, backbone):
        out = training_input(self, backbone)
        if self.config.num_tokens == 5 and torch.is_grad_enabled():
            steps_seen.append(1)
            if len(steps_seen) >= 2:
                out.register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(methods.REGISTRY["prompt"], "training_input", poisoned)
    candidates = [cand(n=5, lr=0.05), cand(n=4, lr=0.05)]
    runs = side_by_side(llama, task, examples, candidates, train_config(steps=4), tmp_path / "together")
    assert [runs[c.name].summary["last_step"] for c in candidates] == [2, 4]
    assert torch.isfinite(runs[candidates[0].name].method.embeddings).all()
    alone = train(llama, task, candidates[1].prompt, train_config(steps=4), examples, tmp_path / "alone",
                  progress=False)  # fmt: skip
    torch.testing.assert_close(runs[candidates[1].name].method.embeddings, alone.method.embeddings, atol=2e-5,
                               rtol=1e-4)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the grid
def test_grid_is_every_combination_less_the_invalid_ones():
    base = PromptConfig(init="text", init_text="review sentiment")
    grid = "lr=0.3,0.03 method=prompt,prefix residual=true,false"
    candidates, skipped = parse_grid(grid, base, TrainConfig(lr=0.01), "classification")
    names = [c.name for c in candidates]
    assert names == ["prompt-text-20-residual-lr0p3", "prompt-text-20-lr0p3", "prefix-text-10-lr0p3",
                     "prompt-text-20-residual-lr0p03", "prompt-text-20-lr0p03", "prefix-text-10-lr0p03"]
    assert len(skipped) == 2 and all("residual applies to method=prompt only" in s for s in skipped)
    only_tokens, _ = parse_grid("num_tokens=5,10", base, TrainConfig(lr=0.02), "classification")
    assert [(c.prompt.num_tokens, c.lr) for c in only_tokens] == [(5, 0.02), (10, 0.02)]
    by_method, _ = parse_grid("method=prompt,prefix", base, TrainConfig(), "classification")  # each method's own lr
    assert [(c.prompt.method, c.lr) for c in by_method] == [("prompt", 0.01), ("prefix", 0.03)]
    unset = PromptConfig(init_text="pinyin")  # no length or init: each candidate's method's start for the task
    starts, _ = parse_grid("method=prompt,prefix", unset, TrainConfig(), "generation")
    assert [(c.prompt.num_tokens, c.prompt.init) for c in starts] == [(20, "text"), (96, "demos")]


@pytest.mark.parametrize("spec, message", [
    ("rate=0.1", "'rate=0.1': expected key=value,value,... with a key among lr, method"),
    ("lr=fast", "lr: could not convert string to float: 'fast'"),
    ("lr=-1", "lr: '-1' must be positive"),
    ("residual=maybe", "residual: 'maybe' is not true or false"),
    ("method=lora", "has no valid combination"),
    ("", "it is empty"),
])  # fmt: skip
def test_bad_grids_are_refused_with_the_reason(spec, message):
    with pytest.raises(SoftPromptError, match="grid") as error:
        parse_grid(spec, PromptConfig(init="random"), TrainConfig(), "generation")
    assert message in str(error.value)


def test_default_candidates_cover_both_methods_and_label_init_for_classification():
    base = PromptConfig(num_tokens=12, init_text="review sentiment")
    for kind in ("classification", "generation"):
        found = search.default_candidates(base, kind)
        assert {c.prompt.method for c in found} == {"prompt", "prefix"}
        assert ("labels" in {c.prompt.init for c in found}) == (kind == "classification")
        assert all(c.prompt.num_tokens == 12 for c in found) and len({c.name for c in found}) == len(found)
    unset = search.default_candidates(PromptConfig(init_text="pinyin"), "generation")  # no length: 20, text's own
    assert {(c.prompt.num_tokens, c.prompt.init) for c in unset} == {(20, "text")}


# ----------------------------------------------------------------------------------------------- the command line
def test_search_command_keeps_the_best_candidate_and_writes_table_and_plot(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl", 32, seed=1)
    valid = write_data(tmp_path / "valid.jsonl", 16, seed=2)
    out = tmp_path / "run"
    code, stdout, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", data, "--valid", valid, "--template", "review {text} sentiment",
        "--labels", "negative,positive", "--label-field", "label", "--steps", 4, "--num-tokens", 3,
        "--eval-every", 2, "--grid", "lr=0.1,0.01 method=prompt,prefix", "--out", out, "--no-progress"])  # fmt: skip
    assert code == 0, stderr
    table = json.loads((out / "search.json").read_text())
    assert [r["candidate"] for r in table] == ["prompt-text-3-lr0p1", "prefix-text-3-lr0p1", "prompt-text-3-lr0p01",
                                               "prefix-text-3-lr0p01"]  # fmt: skip
    chosen = [r for r in table if r["best"]]
    assert len(chosen) == 1 and selection_key(chosen[0]["valid"]) == max(selection_key(r["valid"]) for r in table)
    assert sorted(r["trained_steps"] for r in table) == [1, 1, 2, 4]  # rungs at 1 and 2
    name = chosen[0]["candidate"]
    for key, tensor in load_file(out / "prompt.safetensors").items():  # the artifact is the chosen one's best
        assert torch.equal(tensor, load_file(out / "candidates" / name / "prompt.safetensors")[key])
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["search"] == table and config["method"] == chosen[0]["method"]
    assert (out / "search.md").read_text().count("\n| ") == 5 and "(chosen)" in stdout and name in stdout
    assert (out / "loss.png").is_file() and "of the steps of training each one fully" in stdout


@pytest.mark.parametrize("given", [False, True])
def test_a_grid_of_default_demonstration_starts_takes_what_little_data_fills(tmp_path, monkeypatch, capsys, given):
    """A grid that leaves length and init to a generation task's default (a prefix of demonstrations, 96 tokens),
    on eight examples that fill 56 tokens: every candidate takes 56, as a plain `train` does, and stderr says so
    once; a length put on the grid (96) is refused with the length the data fill."""
    model = save_tiny_model(tmp_path / "model")
    train_file = write_data(tmp_path / "train.jsonl", 8, seed=1)  # 56 tokens written out (test_init_demos)
    code, _, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", train_file, "--valid", write_data(tmp_path / "valid.jsonl", 8, seed=2),
        "--template", "review {text} sentiment", "--target-field", "label", "--steps", 2, "--batch-size", 4,
        "--grid", "lr=0.03,0.01" + " num_tokens=96" * given, "--out", tmp_path / "run", "--no-progress"])  # fmt: skip
    if given:
        assert code != 0 and "take 56 tokens, fewer than num_tokens 96; use --num-tokens 56" in stderr
        assert not (tmp_path / "run" / "prompt.safetensors").exists()
        return
    assert code == 0, stderr
    assert stderr.count("fill 56 tokens, fewer than the 96 of the demonstrations start: the prompt takes 56") == 1
    assert "Searching 2 candidates: prefix-demos-56-lr0p03, prefix-demos-56-lr0p01" in stderr
    assert "tuning's default (--lr sets another)" not in stderr  # each candidate has its own
    table = json.loads((tmp_path / "run" / "search.json").read_text())
    assert [(r["num_tokens"], r["init"]) for r in table] == [(56, "demos")] * 2
    (prefix,) = load_file(tmp_path / "run" / "prompt.safetensors").values()  # (layers, 2, kv_heads, n, head_dim)
    assert prefix.shape[-2] == 56


def test_a_search_counts_its_training_examples_once_not_once_per_candidate(tmp_path, monkeypatch, capsys):
    """Four examples cannot make a batch of 8, however many candidates read them."""
    code, _, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", save_tiny_model(tmp_path / "model"), "--train", write_data(tmp_path / "train.jsonl", 4, seed=1),
        "--valid", write_data(tmp_path / "valid.jsonl", 8, seed=2), "--template", "review {text} sentiment",
        "--labels", "negative,positive", "--label-field", "label", "--num-tokens", 2, "--grid", "lr=0.1,0.01",
        "--out", tmp_path / "run", "--no-progress"])  # fmt: skip
    assert code != 0 and "the training data has 4 examples, fewer than one batch of 8" in stderr


def test_search_without_validation_data_or_enough_to_hold_out_is_refused(llama, tmp_path, monkeypatch, capsys):
    """Refused before the model loads (a folder that holds none), and by the library's search itself."""
    data = write_data(tmp_path / "train.jsonl", 8, seed=1)
    code, _, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", tmp_path / "no-model", "--train", data, "--template", "review {text}", "--labels",
        "negative,positive", "--label-field", "label", "--search", "--out", tmp_path / "run"])  # fmt: skip
    assert code != 0 and "a search compares its candidates on validation data: give --valid, or training data from " \
        "which --holdout 0.1 sets at least 16 examples aside (it has 8; --eval-every 25)" in " ".join(stderr.split())
    assert not (tmp_path / "run").exists()
    task = sentiment_task(llama)
    candidates, _ = parse_grid("lr=0.1,0.01", PromptConfig(num_tokens=2, init="random"), TrainConfig(lr=0.1),
                               "classification")
    with pytest.raises(SoftPromptError, match=r"sets at least 16 examples aside \(it has 159; --eval-every 5\)"):
        search.search(llama, task, candidates, train_config(eval_every=5), task.encode(sentiment_records(159, 1)), [],
                      tmp_path / "lib", progress=False)  # fmt: skip
    assert not (tmp_path / "lib").exists()


# ------------------------------------------------------------------------- default candidates, generation, run alone
SEARCHES = {
    "classification": dict(
        task=["--template", "review {text} sentiment", "--labels", "negative,positive", "--label-field", "label"],
        steps=8, candidates=["prompt-labels-3-lr0p3", "prompt-labels-3-lr0p03", "prompt-text-3-lr0p3",
                             "prompt-text-3-lr0p03", "prefix-text-3-lr0p03", "prefix-text-3-lr0p01"],
        trained=[1, 1, 1, 2, 4, 8]),  # rungs at 1, 2 and 4: 6 -> 3 -> 2 -> 1
    "generation": dict(
        task=["--template", "write a {label} review:", "--target-field", "text"],
        steps=4, candidates=["prompt-text-3-lr0p3", "prompt-text-3-lr0p03", "prefix-text-3-lr0p03",
                             "prefix-text-3-lr0p01"],
        trained=[1, 1, 2, 4]),  # rungs at 1 and 2: 4 -> 2 -> 1
}  # fmt: skip


@pytest.mark.parametrize("kind", list(SEARCHES))
def test_default_search_keeps_what_its_candidates_would_train_alone(tmp_path, monkeypatch, capsys, kind):
    """`train --search` with its default candidates (what --help names: prompt tuning from the label words, for
    classification, and from the template's text, prefix tuning from the text, two learning rates each), on a
    classification and on a generation task: the survivor's prompt, and the chosen candidate's, are the prompts a
    plain `train` of that candidate's settings alone gives (for as many steps as it trained), with the same best
    step and validation result, and so is the prompt of the runner-up, which left at the last rung; the artifact
    in --out is the chosen one's."""
    spec = SEARCHES[kind]
    model = save_tiny_model(tmp_path / "model")
    common = ["train", "--model", model, "--train", write_data(tmp_path / "train.jsonl", 32, seed=1), "--valid",
              write_data(tmp_path / "valid.jsonl", 8, seed=2), *spec["task"], "--num-tokens", 3, "--batch-size", 8,
              "--eval-every", 1, "--schedule", "constant", "--warmup-steps", 0, "--no-progress"]  # fmt: skip
    code, stdout, stderr = run_main(monkeypatch, capsys, [*common, "--steps", spec["steps"], "--search", "--out",
                                                          tmp_path / "search"])  # fmt: skip
    assert code == 0, stderr
    table = json.loads((tmp_path / "search" / "search.json").read_text())
    assert [r["candidate"] for r in table] == spec["candidates"]
    assert sorted(r["trained_steps"] for r in table) == spec["trained"]
    [survivor] = [r for r in table if r["trained_steps"] == spec["steps"]]
    [chosen] = [r for r in table if r["best"]]
    runner_up = max((r for r in table if r is not survivor), key=lambda r: r["trained_steps"])
    for row in {r["candidate"]: r for r in (survivor, chosen, runner_up)}.values():
        alone = tmp_path / f"alone-{row['candidate']}"
        code, _, stderr = run_main(monkeypatch, capsys, [
            *common, "--method", row["method"], "--init", row["init"], "--lr", row["lr"], "--steps",
            row["trained_steps"], "--out", alone])  # fmt: skip
        assert code == 0, stderr
        summary = json.loads((alone / "config.json").read_text())["training"]
        assert row["best_step"] == summary["best_step"], row["candidate"]
        assert row["valid"] == pytest.approx(summary["valid"], rel=1e-4, abs=1e-6), row["candidate"]
        searched = load_file(tmp_path / "search" / "candidates" / row["candidate"] / "prompt.safetensors")
        for key, tensor in load_file(alone / "prompt.safetensors").items():
            torch.testing.assert_close(searched[key], tensor, atol=2e-5, rtol=1e-4)
    chosen_prompt = load_file(tmp_path / "search" / "candidates" / chosen["candidate"] / "prompt.safetensors")
    for key, tensor in load_file(tmp_path / "search" / "prompt.safetensors").items():
        assert torch.equal(tensor, chosen_prompt[key])
    assert f"Saved the best candidate, {chosen['candidate']}" in stdout
