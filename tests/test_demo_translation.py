"""`softprompt demo translation` end to end on a tiny random Gemma 3 (the real model's architecture; its own run
takes minutes and is measured in the README): every row decodes by one rule, the trained rows' templates hold no
instruction and their prompts start as row (b)'s text, and `--json` prints the table as one line. The scores
themselves are checked against metrics recomputed from the saved outputs."""

from __future__ import annotations

import json

import sacrebleu

from conftest import run_main, tiny_backbone
from softprompt import artifact
from softprompt.demo import translation
from softprompt.scoring import metrics


def test_demo_translation_json_on_a_tiny_gemma3(tmp_path, monkeypatch, capsys):
    backbone = tiny_backbone("gemma3_text")
    monkeypatch.setattr(translation, "load_backbone", lambda name, load, training: backbone)
    monkeypatch.setattr(translation, "TEST_SIZE", 6)
    monkeypatch.setattr(translation, "VALID_SIZE", 4)
    monkeypatch.setitem(translation.TRAINING, "batch_size", 2)
    monkeypatch.setitem(translation.TRAINING, "eval_every", 1)
    seen = []
    evaluate = translation.evaluate

    def recorded(*args, **kwargs):  # every row's decoding settings, and its outputs
        result = evaluate(*args, **kwargs)
        seen.append((kwargs["max_new_tokens"], kwargs["stop"], list(kwargs["outputs"]), result))
        return result

    monkeypatch.setattr(translation, "evaluate", recorded)
    out = tmp_path / "demo"
    code, printed, err = run_main(monkeypatch, capsys, ["demo", "translation", "--out", out, "--steps", 2,
                                                         "--json", "--no-progress"])  # fmt: skip
    assert code == 0, err[-3000:]
    lines = [line for line in printed.splitlines() if line.strip()]
    assert len(lines) == 1, printed[-2000:]  # --json: the table alone, as one line
    summary = json.loads(lines[0])
    assert summary["model"] == "gemma3-270m" and summary["test"] == 6 and summary["steps"] == 2
    names = list(summary["rows"])
    assert [n[:3] for n in names] == ["(a)", "(b)", "(c)", "(d)"]
    assert summary == json.loads((out / "results.json").read_text(encoding="utf-8"))
    # one decoding rule for every row: greedy, the same length limit, ending at the end of the line
    assert {(limit, tuple(stop)) for limit, stop, _, _ in seen} == {(translation.MAX_NEW_TOKENS, ("\n",))}
    test_rows = [(outputs, result) for _, _, outputs, result in seen if result["n"] == 6]
    assert len(test_rows) == 4
    references = [json.loads(line)["zh"] for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    for name, (outputs, result) in zip(names, test_rows):
        assert not any("\n" in o for o in outputs)
        assert summary["rows"][name]["chrf"] == result["chrf"] == metrics.generation(references, outputs)["chrf"]
        assert result["bleu"] == sacrebleu.corpus_bleu([o.strip() for o in outputs], [references],
                                                       tokenize="zh").score  # fmt: skip
        shown = [e[name] for e in summary["examples"]]
        assert shown[:-1] == [o.strip() for o in outputs[: translation.SHOWN]]  # the held-out ones, then the seed
    assert summary["examples"][-1]["en"] == "Look out!"
    # (c) and (d): templates without the instruction; prompts that start as (b)'s text
    start = backbone.tokenizer.bos_token or ""
    for method in ("prompt", "prefix"):
        saved = artifact.load(out / method)
        assert saved.task.template == translation.TEMPLATE and "Translate" not in saved.task.template
        assert saved.prompt.method == method and saved.prompt.init == "text"
        assert saved.prompt.init_text.startswith(start + translation.INSTRUCTION)
        ids = backbone.tokenizer(saved.prompt.init_text, add_special_tokens=False)["input_ids"]
        assert saved.prompt.num_tokens == len(ids)
    first = json.loads((out / "prompt" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and "template" in first  # scored before training, beside the template alone
