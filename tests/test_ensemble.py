"""Prompt ensembles: the members' scores from one mixed batch equal each member scored on its own (and, for prompt
tuning, the explicit `inputs_embeds = [P; E]` model), and vote/mean combine them as written out here by hand."""

from __future__ import annotations

import json
import random

import pytest
import torch

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import TaskConfig
from softprompt.data import TaskEncoder
from softprompt.scoring.ensemble import combine, evaluate_ensemble, member_scores
from softprompt.errors import SoftPromptError
from softprompt.scoring.evaluate import label_scores
from softprompt.models import load_model

from conftest import random_prompt, run_main, tiny_backbone, tiny_model, tiny_tokenizer

WORDS = "the a movie film was is it this very quite great good fun bad terrible awful".split()
ATOL = 1e-4


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 7))), "label": rng.randint(0, 1)} for _ in range(n)]


def task_for(backbone, labels) -> TaskEncoder:
    return TaskEncoder(TaskConfig(template="review {text} sentiment", labels=labels, label_field="label"), backbone.tokenizer)


def member(backbone, method: str, n: int, seed: int):
    return random_prompt(backbone, method, n, seed, init_range=1.0)


def members_of(backbone):
    """Prompts of different lengths and both methods, plus the bare template (None)."""
    made = [member(backbone, "prompt", 3, 1), member(backbone, "prefix", 5, 2), member(backbone, "prompt", 2, 3)]
    with torch.no_grad():
        return made, [m.kv(backbone) for m in made] + [None]


def by_hand(scores: list[torch.Tensor], how: str) -> list[int]:
    """The combination rules written out with loops: scores[m][i, c] is member m's log-prob of label c on example i."""
    predictions = []
    for i in range(scores[0].shape[0]):
        probs = [[float(p) for p in s[i].softmax(-1)] for s in scores]  # per member, normalized over the labels
        labels = range(len(probs[0]))
        mean = [sum(p[c] for p in probs) / len(probs) for c in labels]
        if how == "mean":
            predictions.append(max(labels, key=lambda c: mean[c]))
            continue
        votes = [sum(1 for s in scores if int(s[i].argmax()) == c) for c in labels]
        tied = [c for c in labels if votes[c] == max(votes)]
        predictions.append(max(tied, key=lambda c: mean[c]))
    return predictions


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("labels", [["negative", "positive"], ["very good", "not good", "quite bad"]])
def test_mixed_batch_scores_equal_each_member_alone(arch, labels):
    backbone = tiny_backbone(arch)
    task = task_for(backbone, labels)
    examples = task.encode(records(11))
    _, prefixes = members_of(backbone)
    mixed = member_scores(backbone, task, examples, prefixes, batch_size=7)
    assert mixed.shape == (len(prefixes), len(examples), len(labels))
    for m, prefix in enumerate(prefixes):
        alone = label_scores(backbone, task, examples, prefix, batch_size=4)  # shared 5-D prefix, no masked slots
        diff = (mixed[m] - alone).abs().max().item()
        assert diff <= ATOL, f"member {m}: max abs diff {diff:.2e}"


def test_prompt_members_equal_the_explicit_input_embeds_model():
    """Independent of our scoring code: the full model reads [P; E] for each prompt-tuning member."""
    backbone = tiny_backbone("llama")
    task = task_for(backbone, ["negative", "positive"])
    examples = task.encode(records(5, seed=3))
    made, prefixes = members_of(backbone)
    mixed = member_scores(backbone, task, examples, prefixes)
    words = [ids[0] for ids in task.label_ids]
    table = backbone.model.get_input_embeddings()
    for m, method in enumerate(made):
        if method.name != "prompt":
            continue
        for i, example in enumerate(examples):
            embeds = torch.cat([method.embeddings.detach(), table(torch.tensor(example.input_ids))])[None]
            with torch.no_grad():
                logprobs = backbone.model(inputs_embeds=embeds).logits[0, -1].float().log_softmax(-1)
            diff = (mixed[m, i] - logprobs[words]).abs().max().item()
            assert diff <= ATOL, f"member {m}, example {i}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("how", ["vote", "mean"])
def test_ensemble_metrics_equal_the_members_combined_by_hand(how):
    backbone = tiny_backbone("qwen2")
    task = task_for(backbone, ["very good", "not good", "quite bad"])
    data = records(20, seed=5)
    for r in data:
        r["label"] = random.Random(r["text"]).randint(0, 2)
    examples = task.encode(data)
    _, prefixes = members_of(backbone)
    result = evaluate_ensemble(backbone, task, examples, prefixes, how=how, batch_size=12)
    alone = [label_scores(backbone, task, examples, p) for p in prefixes]
    golds = [e.label for e in examples]
    assert len(result.members) == len(prefixes)
    for m, scores in enumerate(alone):
        accuracy = sum(int(scores[i].argmax()) == g for i, g in enumerate(golds)) / len(golds)
        assert result.members[m]["accuracy"] == pytest.approx(accuracy)
        assert result.members[m]["gold_logprob"] == pytest.approx(
            sum(float(scores[i, g]) for i, g in enumerate(golds)) / len(golds), abs=ATOL
        )
    predictions = by_hand(alone, how)
    assert result.ensemble["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predictions, golds)) / len(golds))
    assert result.ensemble["n"] == len(golds) and result.combine == how


def test_vote_is_a_majority_and_ties_go_to_the_higher_mean_probability():
    log = lambda *p: torch.tensor(p).log()  # noqa: E731  one example's label probabilities, as log-probs
    # example 0: members pick 0, 1, 1 -> majority 1 although member 0 is very sure of 0 (mean would pick 0)
    # example 1: members pick 0, 1 (a tie; member 2 picks 2) -> the tied label with the higher mean probability, 1
    scores = torch.stack([
        torch.stack([log(0.98, 0.01, 0.01), log(0.5, 0.3, 0.2)]),
        torch.stack([log(0.3, 0.4, 0.3), log(0.1, 0.8, 0.1)]),
        torch.stack([log(0.3, 0.4, 0.3), log(0.1, 0.2, 0.7)]),
    ])  # fmt: skip  (members, examples, labels)
    assert combine(scores, "vote").tolist() == [1, 1]
    assert combine(scores, "mean").tolist() == [0, 1]
    assert combine(scores, "vote").tolist() == by_hand(list(scores), "vote")
    assert combine(scores, "mean").tolist() == by_hand(list(scores), "mean")


def test_ensemble_refuses_generation_tasks_and_unknown_rules():
    backbone = tiny_backbone("llama")
    task = TaskEncoder(TaskConfig(template="review {text}", task="generation", target_field="t"), backbone.tokenizer)
    examples = task.encode([{"text": "good", "t": "yes"}])
    with pytest.raises(SoftPromptError, match="classification task"):
        member_scores(backbone, task, examples, [None])
    with pytest.raises(SoftPromptError, match="combine 'median'"):
        combine(torch.zeros(2, 1, 2), "median")


# ------------------------------------------------------------------------------------------------------ CLI
def test_eval_with_several_prompts(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    backbone = backbone_for(*load_model(str(folder)))
    task = task_for(backbone, ["negative", "positive"])
    made = [member(backbone, "prompt", 3, 1), member(backbone, "prefix", 2, 2), member(backbone, "prompt", 4, 3)]
    dirs = [artifact.save(tmp_path / f"m{i}", m, task.config, backbone) for i, m in enumerate(made)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(15, seed=9)), encoding="utf-8")
    prompts = [x for d in dirs for x in ("--prompt", d)]
    code, out, err = run_main(monkeypatch, capsys, ["eval", *prompts, "--data", data, "--combine", "mean", "--json"])
    assert code == 0, err
    result = json.loads(out)
    examples = task.encode(records(15, seed=9))
    with torch.no_grad():
        alone = [label_scores(backbone, task, examples, m.kv(backbone)) for m in made]
    golds = [e.label for e in examples]
    for m, scores in enumerate(alone):
        accuracy = sum(int(scores[i].argmax()) == g for i, g in enumerate(golds)) / len(golds)
        assert result["members"][m]["prompt"] == str(dirs[m])
        assert result["members"][m]["accuracy"] == pytest.approx(accuracy)
    ensemble = sum(p == g for p, g in zip(by_hand(alone, "mean"), golds)) / len(golds)
    assert result["ensemble"]["combine"] == "mean" and result["ensemble"]["accuracy"] == pytest.approx(ensemble)
    code, out, err = run_main(monkeypatch, capsys, ["eval", *prompts[:4], "--data", data])
    assert code == 0 and "ensemble (vote, 2 prompts)" in out and str(dirs[1]) in out, err

    other = task_for(backbone, ["positive", "negative"])  # the same words in another order: another task
    artifact.save(tmp_path / "other", made[0], other.config, backbone)
    for args, needle in [(["--prompt", tmp_path / "other"], "an ensemble needs prompts of one task"),
                         (["--combine", "median"], "--combine 'median' is not one of vote, mean")]:  # fmt: skip
        code, _, err = run_main(monkeypatch, capsys, ["eval", *prompts[:2], *args, "--data", data])
        assert code == 2 and needle in err and "Traceback" not in err, err
