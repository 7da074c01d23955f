"""Command-line flags that change what a run computes, each through the real command (`main()` in this process) on a
tiny Llama saved to disk, against a reference computed here without softprompt: plain transformers forwards over
explicit `[P; E]`, torch's and transformers' own optimizers stepped by hand on the gradient computed that way, the
embedding table looked up directly, sampling written out by its definition, and the same command on data cut by
hand. `train`: --weight-decay, --optimizer, --eval-size, --gradient-checkpointing, --seed, --init-text,
--init-range; `eval --limit`; `generate --raw/--stop/--temperature/--top-p/--seed`. One test runs `softprompt demo`
itself on the embedded model (with its data cut to a few records) and re-scores its saved prompt independently."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.optimization import Adafactor

from softprompt import artifact
from softprompt import cli as cli_module
from softprompt.training import setup as train_module
from softprompt.config import TaskConfig

from conftest import EOS, VOCAB, random_prompt, run_main, tiny_backbone, tiny_model, tiny_tokenizer
from test_cli import save_tiny_model, write_data

TEMPLATE = "review {text} sentiment"
LABELS = ["negative", "positive"]
LR = 0.05


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flags")
    return dict(root=root, model=save_tiny_model(root / "tiny"), train=write_data(root / "train.jsonl", 16, seed=1),
                valid=write_data(root / "valid.jsonl", 10, seed=2))  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    """The model the saved folder holds (the same seed), as plain transformers sees it (frozen: gradients go to the
    prompt only)."""
    return tiny_model("llama").requires_grad_(False)


@pytest.fixture(autouse=True)
def _own_cache(request, tmp_path, monkeypatch):
    """Tiny-model runs never touch the embedded model's cache; the demo reads the embedded model from it."""
    if not request.node.get_closest_marker("real_model"):
        monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ok(monkeypatch, capsys, args: list) -> str:
    """`softprompt ARGS` in this process; its stdout, after checking that it succeeded."""
    code, out, err = run_main(monkeypatch, capsys, args)
    assert code == 0, err[-3000:]
    return out


def train_args(files, out: Path, *extra) -> list:
    """Prompt tuning (the references here are explicit `[P; E]`)."""
    return ["train", "--model", files["model"], "--train", files["train"], "--template", TEMPLATE, "--labels",
            ",".join(LABELS), "--label-field", "label", "--method", "prompt", "--num-tokens", 4, "--out", out,
            "--no-progress", *extra]


def final_prompt(out: Path) -> torch.Tensor:
    """The artifact's prompt: without --valid, the prompt after the last step."""
    return load_file(out / "prompt.safetensors")["prompt_embeddings"]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records_of(out / "metrics.jsonl") if "loss" in r]


def embedding_rows(reference, words: list[str]) -> torch.Tensor:
    return reference.get_input_embeddings().weight[[VOCAB[w] for w in words]].detach().clone()


@pytest.fixture
def initial_prompts(monkeypatch) -> list[list[torch.Tensor]]:
    """The parameters each run hands its optimizer, as they are before the first step (one list per run)."""
    captured, make = [], train_module.make_optimizer

    def recording(params, config):
        params = list(params)
        captured.append([p.detach().clone() for p in params])
        return make(params, config)

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    return captured


# ------------------------------------------------------------------------------------- plain transformers references
def reference_embed(model, ids: list[int]) -> torch.Tensor:
    return model.get_input_embeddings()(torch.tensor(ids))


def label_logprobs(model, prompt: torch.Tensor | None, record: dict) -> torch.Tensor:
    """(labels,) full-vocabulary log-probability of each label word right after the model reads `[P; E(input)]`."""
    ids = tiny_tokenizer()(TEMPLATE.format(text=record["text"]))["input_ids"]
    embeds = reference_embed(model, ids)
    if prompt is not None:
        embeds = torch.cat([prompt, embeds])
    logprobs = model(inputs_embeds=embeds[None]).logits[0, -1].log_softmax(-1)
    return logprobs[[VOCAB[word] for word in LABELS]]


@torch.no_grad()
def plain_scores(model, prompt: torch.Tensor | None, records: list[dict]) -> dict:
    """Accuracy (arg-max label word) and mean gold-label log-probability, one record at a time."""
    scores = torch.stack([label_logprobs(model, prompt, r) for r in records])
    gold = torch.tensor([LABELS.index(r["label"]) for r in records])
    return {"accuracy": int((scores.argmax(-1) == gold).sum()) / len(records),
            "gold_logprob": float(scores[torch.arange(len(records)), gold].mean()), "n": len(records)}  # fmt: skip


def plain_gradient(model, prompt: torch.Tensor, records: list[dict]) -> torch.Tensor:
    """d(mean cross-entropy of the gold label word)/dP over `records`, the model reading `[P; E]` row by row."""
    P = prompt.detach().clone().requires_grad_(True)
    gold = [LABELS.index(r["label"]) for r in records]
    loss = -torch.stack([label_logprobs(model, P, r)[g] for r, g in zip(records, gold)]).mean()
    loss.backward()
    return P.grad


# ------------------------------------------------------------------------------------------ optimizer, weight decay
INIT_WORDS = ["hello", "world", "cat", "dog"]
ONE_FULL_STEP = ["--init", "text", "--init-text", " ".join(INIT_WORDS), "--steps", 1, "--batch-size", 16, "--lr", LR,
                 "--warmup-steps", 0, "--max-grad-norm", 0]  # fmt: skip
"""One unclipped step at the full learning rate over all 16 records, from the embeddings of four known words."""


def torch_step(optimizer: str, prompt: torch.Tensor, grad: torch.Tensor, weight_decay: float = 0.0) -> torch.Tensor:
    """The named optimizer's first step, run by torch (AdamW) or transformers (Adafactor at a fixed learning rate,
    no parameter scaling) on a copy of `prompt` holding `grad`."""
    param = torch.nn.Parameter(prompt.detach().clone())
    param.grad = grad.clone()
    if optimizer == "adamw":
        opt = torch.optim.AdamW([param], lr=LR, weight_decay=weight_decay)
    else:
        opt = Adafactor([param], lr=LR, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                        warmup_init=False)  # fmt: skip
    opt.step()
    return param.detach()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_flag_takes_that_optimizers_step(files, reference, tmp_path, monkeypatch, capsys, optimizer):
    """`--optimizer X`: the prompt after one step is X's own step (torch.optim.AdamW, transformers' Adafactor) on the
    gradient of `[P; E]` computed here, and not the other optimizer's."""
    ok(monkeypatch, capsys, train_args(files, tmp_path / "run", *ONE_FULL_STEP, "--optimizer", optimizer))
    start = embedding_rows(reference, INIT_WORDS)
    grad = plain_gradient(reference, start, records_of(files["train"]))
    expected = {name: torch_step(name, start, grad) for name in ("adamw", "adafactor")}
    stepped = final_prompt(tmp_path / "run")
    torch.testing.assert_close(stepped, expected[optimizer], rtol=1e-4, atol=1e-6)
    other = expected["adafactor" if optimizer == "adamw" else "adamw"]
    assert (stepped - other).abs().max() > 1e-3


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_weight_decay_is_decoupled_lr_times_wd_times_p(files, reference, tmp_path, monkeypatch, capsys, optimizer):
    """`--weight-decay 0.8`: the first step lands at the undecayed step less lr x wd x P0 (decoupled decay, by
    hand), P0 being the embedding rows of the init words; and it is the optimizer's own step with that decay."""
    for wd in (0, 0.8):
        ok(monkeypatch, capsys, train_args(files, tmp_path / str(wd), *ONE_FULL_STEP, "--optimizer", optimizer,
                                           "--weight-decay", wd))  # fmt: skip
    start = embedding_rows(reference, INIT_WORDS)
    decay = LR * 0.8 * start
    assert decay.abs().max() > 1e-3  # large enough to be seen
    torch.testing.assert_close(final_prompt(tmp_path / "0.8"), final_prompt(tmp_path / "0") - decay, rtol=0,
                               atol=1e-6)  # fmt: skip
    grad = plain_gradient(reference, start, records_of(files["train"]))
    torch.testing.assert_close(final_prompt(tmp_path / "0.8"), torch_step(optimizer, start, grad, 0.8), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ --eval-size
def test_eval_size_validates_on_the_first_n_records_only(files, reference, tmp_path, monkeypatch, capsys):
    """`--eval-size 4` with 10 validation records: every logged validation has n = 4, and the first one (the
    starting prompt, the embeddings of the init words) is the accuracy and gold log-probability of `[P; E]` on
    exactly the file's first 4 records, which differ from those on all 10."""
    out = tmp_path / "run"
    ok(monkeypatch, capsys, train_args(files, out, "--valid", files["valid"], "--eval-size", 4, "--eval-every", 1,
                                       "--steps", 2, "--batch-size", 4, "--init", "text", "--init-text",
                                       " ".join(INIT_WORDS)))  # fmt: skip
    validations = [r for r in records_of(out / "metrics.jsonl") if "valid" in r]
    assert [r["step"] for r in validations] == [0, 1, 2]
    assert all(r["valid"]["n"] == 4 for r in validations)
    valid, start = records_of(files["valid"]), embedding_rows(reference, INIT_WORDS)
    expected, everything = plain_scores(reference, start, valid[:4]), plain_scores(reference, start, valid)
    logged = validations[0]["valid"]
    assert logged["accuracy"] == expected["accuracy"]
    assert logged["gold_logprob"] == pytest.approx(expected["gold_logprob"], rel=1e-5)
    assert abs(everything["gold_logprob"] - expected["gold_logprob"]) > 1e-3  # all 10 would show


# -------------------------------------------------------------------------------------------- --gradient-checkpointing
def count_layer_runs(monkeypatch) -> list[list[int]]:
    """Wrap the command's model loading so that every start of a decoder layer's MLP under autograd is counted, one
    list per model loaded (the forward pass, and the backward's recomputation when activations are checkpointed; a
    pre-hook, since torch stops a recomputation once it has the tensors the backward needs, before the MLP
    returns)."""
    loads, load = [], cli_module._backbone

    def counted(name, *args, **kwargs):
        backbone, runs = load(name, *args, **kwargs), []
        for layer in backbone.model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda *_: runs.append(1) if torch.is_grad_enabled() else None)
        loads.append(runs)
        return backbone

    monkeypatch.setattr(cli_module, "_backbone", counted)
    return loads


def test_gradient_checkpointing_recomputes_the_layers_and_changes_nothing(files, tmp_path, monkeypatch, capsys):
    """`--gradient-checkpointing`: each decoder layer runs twice per step under autograd (its forward, then its
    replay in the backward pass) where it ran once without the flag, and the run logs the same losses and ends with
    the same prompt, to float tolerance."""
    loads = count_layer_runs(monkeypatch)
    for name, flag in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        ok(monkeypatch, capsys, train_args(files, tmp_path / name, "--init", "random", "--steps", 3, "--batch-size", 8,
                                           "--lr", 0.1, "--warmup-steps", 0, *flag))  # fmt: skip
    plain_runs, checkpointed_runs = map(len, loads)
    assert plain_runs == 3 * 2 and checkpointed_runs == 2 * plain_runs  # 3 steps x 2 layers, then each replayed
    plain_losses = losses(tmp_path / "plain")
    assert losses(tmp_path / "checkpointed") == pytest.approx(plain_losses, rel=1e-5)
    torch.testing.assert_close(final_prompt(tmp_path / "checkpointed"), final_prompt(tmp_path / "plain"), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    assert len(set(plain_losses)) == 3  # the prompt moved each step


def test_compile_trains_as_eager(files, tmp_path, monkeypatch, capsys):
    """`--compile` (the decoder's training pass compiled by inductor), here with `--gradient-checkpointing`: the
    same losses and the same final prompt as the plain run, to float tolerance; the summary counts the graphs
    compiled during the run. (The step itself against the plain model: tests/test_compile.py.)"""
    loaded, load = [], cli_module._backbone
    monkeypatch.setattr(cli_module, "_backbone", lambda *args, **kwargs: loaded.append(load(*args, **kwargs))
                        or loaded[-1])  # fmt: skip
    for name, flags in (("plain", []), ("compiled", ["--compile", "--gradient-checkpointing"])):
        ok(monkeypatch, capsys, train_args(files, tmp_path / name, "--init", "random", "--steps", 3, "--batch-size", 8,
                                           "--lr", 0.1, "--warmup-steps", 0, *flags))  # fmt: skip
    assert [b._compiled_decoder is not None for b in loaded] == [False, True]
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)
    torch.testing.assert_close(final_prompt(tmp_path / "compiled"), final_prompt(tmp_path / "plain"), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    summary = artifact.load(tmp_path / "compiled").extra["training"]
    assert summary["compile"] is True and "compiled_graphs" in summary, summary
    assert "compiled_graphs" not in artifact.load(tmp_path / "plain").extra["training"]


def test_compile_without_a_working_compiler_trains_eager_and_says_why(files, tmp_path):
    """A C++ compiler that does not exist (`CXX`, which inductor reads; a fresh process and inductor cache, so no
    compiled code can be reused): `train --compile` warns that the decoder stays eager, with the reason, and trains
    (the summary counts no compiled graph)."""
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "SOFTPROMPT_CACHE": str(tmp_path / "cache")}  # fmt: skip
    args = train_args(files, tmp_path / "run", "--steps", 2, "--batch-size", 4, "--compile")
    done = subprocess.run([sys.executable, "-m", "softprompt", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--compile: the decoder stays eager" in done.stderr and "/nonexistent/c++" in done.stderr, done.stderr
    assert artifact.load(tmp_path / "run").extra["training"]["compiled_graphs"] == 0


# ------------------------------------------------------------------------------------ --seed, --init-text, --init-range
def uniform_init(seed: int, n: int, half_width: float) -> torch.Tensor:
    """What `--init random` documents: uniform in +-half_width, drawn from a generator seeded with --seed."""
    return (torch.rand(n, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * half_width


def test_seed_reproduces_a_run_and_another_seed_changes_init_and_batches(files, tmp_path, monkeypatch, capsys,
                                                                         initial_prompts):  # fmt: skip
    """`--seed`: the same seed gives a bit-identical prompt and loss log; another seed draws another random init
    (the uniform draw of that seed) and, with a seed-independent text init, other batches (another first loss)."""
    common = ["--steps", 3, "--batch-size", 4, "--lr", 0.1, "--warmup-steps", 0]
    for name, seed, init in (("a", 3, "random"), ("b", 3, "random"), ("c", 4, "random"), ("text3", 3, "text"),
                             ("text4", 4, "text")):  # fmt: skip
        ok(monkeypatch, capsys, train_args(files, tmp_path / name, *common, "--seed", seed, "--init", init))
    assert torch.equal(final_prompt(tmp_path / "a"), final_prompt(tmp_path / "b"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert not torch.equal(final_prompt(tmp_path / "a"), final_prompt(tmp_path / "c"))
    starts = [p[0] for p in initial_prompts]
    torch.testing.assert_close(starts[0], uniform_init(3, 4, 0.5), rtol=0, atol=1e-7)
    torch.testing.assert_close(starts[2], uniform_init(4, 4, 0.5), rtol=0, atol=1e-7)
    assert torch.equal(starts[3], starts[4])  # the text init ignores the seed: only the shuffle differs
    assert losses(tmp_path / "text3")[0] != pytest.approx(losses(tmp_path / "text4")[0], rel=1e-4)


@pytest.mark.parametrize("text, n, words", [
    ("hello world cat", 7, ["hello", "world", "cat", "hello", "world", "cat", "hello"]),  # repeated
    ("one two three four five six", 4, ["one", "two", "three", "four"]),  # cut
])  # fmt: skip
def test_init_text_starts_from_the_embeddings_of_its_tokens(files, reference, tmp_path, monkeypatch, capsys,
                                                            initial_prompts, text, n, words):  # fmt: skip
    """`--init text --init-text T`: P starts as the embedding-table rows of T's tokens, repeated or cut to
    --num-tokens; the artifact's config records T."""
    ok(monkeypatch, capsys, train_args(files, tmp_path / "run", "--init", "text", "--init-text", text,
                                       "--num-tokens", n, "--steps", 1, "--batch-size", 8))  # fmt: skip
    [[start]] = initial_prompts
    assert torch.equal(start, embedding_rows(reference, words))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["init"] == "text" and saved["init_text"] == text


def test_init_range_bounds_and_scales_the_random_init(files, tmp_path, monkeypatch, capsys, initial_prompts):
    """`--init random --init-range r`: every value within +-r and spread over that whole range (the largest near r,
    the standard deviation r/sqrt(3) of a uniform), and r=0.5 draws ten times r=0.05's values (same seed)."""
    for r in (0.05, 0.5):
        ok(monkeypatch, capsys, train_args(files, tmp_path / str(r), "--init", "random", "--init-range", r,
                                           "--num-tokens", 6, "--steps", 1, "--batch-size", 8))  # fmt: skip
    (small,), (large,) = initial_prompts
    assert small.shape == (6, 32)
    assert small.abs().max() <= 0.05 and small.abs().max() > 0.045
    assert float(small.std()) == pytest.approx(0.05 / 3**0.5, rel=0.15) and abs(float(small.mean())) < 0.01
    torch.testing.assert_close(large, 10 * small, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------- eval --limit
def test_eval_limit_scores_only_the_first_n_records(files, reference, tmp_path, monkeypatch, capsys):
    """`eval --limit 5` on 10 records prints what eval prints for a file cut to its first 5 lines by hand, which is
    plain transformers' accuracy and gold log-probability on those 5 (and not on all 10)."""
    base = ["eval", "--model", files["model"], "--template", TEMPLATE, "--labels", ",".join(LABELS),
            "--label-field", "label", "--json", "--no-progress"]  # fmt: skip
    first = tmp_path / "first5.jsonl"
    first.write_text("".join(files["valid"].read_text().splitlines(keepends=True)[:5]), encoding="utf-8")
    limited = json.loads(ok(monkeypatch, capsys, [*base, "--data", files["valid"], "--limit", 5]))
    cut = json.loads(ok(monkeypatch, capsys, [*base, "--data", first]))
    assert limited == cut and limited["n"] == 5
    valid = records_of(files["valid"])
    expected = plain_scores(reference, None, valid[:5])
    assert limited["accuracy"] == expected["accuracy"]
    assert limited["gold_logprob"] == pytest.approx(expected["gold_logprob"], rel=1e-5)
    assert abs(plain_scores(reference, None, valid)["gold_logprob"] - expected["gold_logprob"]) > 1e-3


# --------------------------------------------------------------------------------------------------------- generate
@torch.no_grad()
def plain_decode(model, prompt: torch.Tensor | None, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[int]:  # fmt: skip
    """Decoding by the definitions, no cache: the whole `[P; E(ids + new)]` read at every step; greedy at
    temperature 0, else a draw (seeded generator, one draw per step) from softmax(logits / T) restricted to the
    smallest set of most probable tokens whose mass reaches top_p. Ends before an EOS."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new: list[int] = []
    while len(new) < max_new_tokens:
        embeds = reference_embed(model, ids + new)
        if prompt is not None:
            embeds = torch.cat([prompt, embeds])
        logits = model(inputs_embeds=embeds[None]).logits[0, -1]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = (logits / temperature).softmax(-1)
            ranked, order = probs.sort(descending=True)
            kept = ranked.cumsum(0) - ranked < top_p  # the mass before a token is still short of top_p
            nucleus = torch.zeros_like(probs)
            nucleus[order[kept]] = ranked[kept]
            token = int(torch.multinomial(nucleus[None], 1, generator=generator))
        if token == EOS:
            break
        new.append(token)
    return new


def printed(text: str, new_ids: list[int]) -> str:
    return f"{text!r} -> {tiny_tokenizer().decode(new_ids, skip_special_tokens=True)!r}"


def test_generate_raw_skips_the_template(files, reference, tmp_path, monkeypatch, capsys):
    """`generate --prompt P --raw TEXT` continues `[P; E(TEXT)]`, without the prompt's template; without --raw it
    continues `[P; E(template filled with TEXT)]` (plain greedy decoding of each, no cache)."""
    library = tiny_backbone("llama")
    method = random_prompt(library, "prompt", n=4, seed=3)
    folder = artifact.save(tmp_path / "prompt", method, TaskConfig.infer(TEMPLATE, LABELS, "label", None), library)
    texts = ["the movie was great", "a terrible film"]
    base = ["generate", "--prompt", folder, "--model", files["model"], "--max-new-tokens", 4]
    raw = ok(monkeypatch, capsys, [*base, "--raw", *texts]).strip().splitlines()
    templated = ok(monkeypatch, capsys, [*base, *texts]).strip().splitlines()
    P, tok = method.embeddings.detach(), tiny_tokenizer()
    expected_raw = [plain_decode(reference, P, tok(t)["input_ids"], 4) for t in texts]
    expected_templated = [plain_decode(reference, P, tok(TEMPLATE.format(text=t))["input_ids"], 4) for t in texts]
    assert raw == [printed(t, new) for t, new in zip(texts, expected_raw)]
    assert templated == [printed(t, new) for t, new in zip(texts, expected_templated)]
    assert raw != templated and all(expected_raw)


def test_generate_stop_ends_before_the_first_stop_string(files, reference, monkeypatch, capsys):
    """`--stop S` (repeatable): the printed continuation is the text of the greedy tokens that come before the first
    one whose text reaches either stop string (here the words of the 3rd and 5th greedy tokens); without --stop the
    whole greedy continuation is printed."""
    text = "hello world"
    tok = tiny_tokenizer()
    full = plain_decode(reference, None, tok(text)["input_ids"], 6)
    assert len(full) == 6, "the greedy continuation ends early: choose another text"
    words = tok.convert_ids_to_tokens(full)
    stops = [words[4], words[2]]
    kept = next(i for i in range(len(full)) if any(s in tok.decode(full[: i + 1]) for s in stops))
    assert 0 < kept <= 2
    out = ok(monkeypatch, capsys, ["generate", "--model", files["model"], "--max-new-tokens", 6, "--stop", stops[0],
                                   "--stop", stops[1], text])  # fmt: skip
    assert out.strip() == printed(text, full[:kept])
    plain = ok(monkeypatch, capsys, ["generate", "--model", files["model"], "--max-new-tokens", 6, text])
    assert plain.strip() == printed(text, full)


def test_generate_samples_with_temperature_top_p_and_seed(files, reference, monkeypatch, capsys):
    """`--temperature 0.7 --top-p 0.5 --seed S`: the tokens are the draws, with a generator seeded with S, from the
    nucleus of softmax(logits / 0.7) computed here; the same seed repeats its sample, other seeds give others, and
    neither another temperature nor top-p 1 would give these samples."""
    text, tok = "the film was", tiny_tokenizer()
    ids = tok(text)["input_ids"]
    args = ["generate", "--model", files["model"], "--max-new-tokens", 6, "--temperature", 0.7, "--top-p", 0.5]
    samples = {seed: ok(monkeypatch, capsys, [*args, "--seed", seed, text]).strip() for seed in (1, 2, 3)}
    expected = {seed: plain_decode(reference, None, ids, 6, 0.7, 0.5, seed) for seed in samples}
    assert samples == {seed: printed(text, new) for seed, new in expected.items()}
    assert ok(monkeypatch, capsys, [*args, "--seed", 2, text]).strip() == samples[2]
    assert len(set(samples.values())) > 1
    other_temperature = {seed: plain_decode(reference, None, ids, 6, 1.0, 0.5, seed) for seed in samples}
    whole_distribution = {seed: plain_decode(reference, None, ids, 6, 0.7, 1.0, seed) for seed in samples}
    assert other_temperature != expected and whole_distribution != expected


# ------------------------------------------------------------------------------------------- options from the configs
def test_every_setting_is_an_option_and_every_option_says_what_it_does():
    """The settings' options are made from the config dataclasses: every field of PromptConfig and TrainConfig is an
    option of `train` (but the one the CLI leaves out), of DistillConfig one of `distill`, of ServeConfig one of
    `serve` (but its log level, and `load`, whose fields are options themselves); every field of LoadConfig one of
    every command that loads a model; and every option of every command has a help text."""
    import dataclasses

    import typer

    from softprompt.config import PromptConfig, TrainConfig
    from softprompt.models import LoadConfig
    from softprompt.serve import ServeConfig
    from softprompt.training.distill import DistillConfig

    commands = typer.main.get_command(cli_module.app).commands
    loading = [(name, LoadConfig, ()) for name in ("train", "distill", "eval", "generate", "inspect", "import",
                                                   "serve", "demo")]  # fmt: skip
    for name, config, left_out in (("train", PromptConfig, cli_module.TRAIN_LEAVES_OUT), ("train", TrainConfig, ()),
                                   ("distill", DistillConfig, ()), ("serve", ServeConfig, ("log_level", "load")),
                                   *loading):  # fmt: skip
        options = {p.name for p in commands[name].params}
        assert {f.name for f in dataclasses.fields(config)} - set(left_out) <= options, name
    assert [f"{name} {p.opts[0]}" for name, c in commands.items() for p in c.params if not p.help] == []



def test_a_new_setting_is_one_field(capsys, monkeypatch):
    """A field added to a config is an option of the commands built from it, with its default, its type and its
    docstring as the help, and reaches the config as given."""
    from dataclasses import dataclass

    import typer

    @dataclass
    class Limits:
        max_rows: int = 3
        """Most rows at once."""
        dtype: str | None = None
        """Weights' dtype (none: the checkpoint's)."""

    app, given = typer.Typer(), []

    @app.command()
    @cli_module.with_options(Limits)
    def run(name: str = "x", *, settings: cli_module.Settings):
        given.append((name, Limits(**settings.of(Limits))))

    monkeypatch.setattr("sys.argv", ["run", "--max-rows", "5"])
    with pytest.raises(SystemExit):
        app()
    assert given == [("x", Limits(max_rows=5))]
    monkeypatch.setattr("sys.argv", ["run", "--help"])
    with pytest.raises(SystemExit):
        app()
    shown = " ".join(capsys.readouterr().out.split())
    assert "--max-rows" in shown and "Most rows at once." in shown and "Weights' dtype" in shown


# ------------------------------------------------------------------------------------------------------------- demo
TEST = 8
"""Test snippets the demo test scores."""


@pytest.mark.real_model
def test_demo_command_runs_and_its_saved_prompt_scores_as_it_prints(real_backbone, tmp_path, monkeypatch, capsys):
    """`softprompt demo --steps 2` on the embedded model, its data cut to 8 test and 4 validation snippets and its
    batch to 2 (the command has no option for them; its 600 + 200 snippets and batches of 8 take many minutes on a
    CPU): it prints the table of the four settings (what results.json holds), writes an artifact that loads onto the
    model, and the trained prompt's accuracy line is the accuracy of plain transformers reading `[P; E]` of the
    saved prompt on the written test split."""
    from softprompt.demo import sentiment as demo

    cut = demo.sentiment_splits
    monkeypatch.setattr(demo, "sentiment_splits", lambda test_size, valid_size: cut(test_size=TEST, valid_size=4))
    monkeypatch.setitem(demo.DEMO_TRAINING, "batch_size", 2)
    out_dir = tmp_path / "demo"
    code, out, err = run_main(monkeypatch, capsys, ["demo", "--out", out_dir, "--steps", 2, "--no-progress"])
    assert code == 0, err[-3000:]
    assert "Converting" not in out  # the embedded model as converted once (the real_backbone fixture), not again
    table = out[out.index(f"Held-out accuracy on {TEST} Rotten Tomatoes snippets:") :].splitlines()[2:6]
    rows = {m[1]: (float(m[2]), float(m[3])) for m in (re.match(r"  (.+?)\s+([\d.]+)\s+([\d.]+)$", line)
                                                         for line in table)}  # fmt: skip
    results = json.loads((out_dir / "results.json").read_text())
    assert list(rows) == list(results) and len(rows) == 4
    for name, (accuracy, macro_f1) in rows.items():
        assert (accuracy, macro_f1) == (round(results[name]["accuracy"], 3), round(results[name]["macro_f1"], 3))
    saved = artifact.load(out_dir / "prompt")
    assert saved.prompt.num_tokens == 20 and saved.extra["training"]["last_step"] == 2
    assert artifact.prefix_of(saved, real_backbone).shape[-2] == 20  # loads onto the model it names
    [trained] = [name for name in rows if name.startswith("trained soft prompt")]

    model, tok = real_backbone.model, real_backbone.tokenizer
    prompt = load_file(out_dir / "prompt" / "prompt.safetensors")["prompt_embeddings"]
    labels = [tok(" " + word, add_special_tokens=False)["input_ids"] for word in saved.task.labels]
    assert all(len(ids) == 1 for ids in labels)
    test = records_of(out_dir / "data" / "test.jsonl")
    correct, close = 0, 0
    with torch.no_grad():
        for record in test:
            ids = tok(saved.task.template.format(**record))["input_ids"]
            embeds = torch.cat([prompt.to(model.dtype), model.get_input_embeddings()(torch.tensor(ids))])
            scores = model(inputs_embeds=embeds[None]).logits[0, -1].log_softmax(-1)[[i for [i] in labels]]
            correct += int(scores.argmax()) == saved.task.labels.index(record["label"])
            close += abs(float(scores[0] - scores[1])) < 1e-3  # a near tie may go either way in float
    assert len(test) == TEST
    assert abs(rows[trained][0] - correct / TEST) <= 5e-4 + close / TEST  # printed to 3 decimals
    assert "Done in" in out and str(out_dir / "prompt") in out
