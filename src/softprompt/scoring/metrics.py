"""Task metrics: accuracy and macro-F1 for classification; exact match, chrF and BLEU (sacrebleu) for generation."""

from __future__ import annotations

import re
import unicodedata

import sacrebleu


def classification(golds: list[int], preds: list[int], num_labels: int) -> dict:
    n = len(golds)
    f1s = []
    for label in range(num_labels):
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        predicted, actual = sum(p == label for p in preds), sum(g == label for g in golds)
        if predicted + actual:  # a label absent from both golds and predictions does not count
            f1s.append(2 * tp / (predicted + actual))
    return {
        "accuracy": sum(g == p for g, p in zip(golds, preds)) / n,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "n": n,
    }


def confusion(golds: list[int], preds: list[int], num_labels: int) -> list[list[int]]:
    """Counts: row = gold label, column = predicted label."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for g, p in zip(golds, preds):
        matrix[g][p] += 1
    return matrix


CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def generation(references: list[str], hypotheses: list[str]) -> dict:
    refs = [r.strip() for r in references]
    hyps = [h.strip() for h in hypotheses]
    # Chinese/Japanese/Korean have no spaces between words: BLEU needs its character-level tokenizer there.
    tokenize = "zh" if any(CJK.search(r) for r in refs) else "13a"
    same = lambda r, h: unicodedata.normalize("NFKC", r) == unicodedata.normalize("NFKC", h)  # noqa: E731  ！ is !
    return {
        "exact_match": sum(same(r, h) for r, h in zip(refs, hyps)) / len(refs),
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score,
        "n": len(refs),
    }
