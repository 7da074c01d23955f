"""Encoder-decoder models (T5) on tiny random models built here. The oracles are computed without our code:
- prompt tuning: transformers' own T5 fed `inputs_embeds = [P; E]` with an all-ones attention mask, its decoder run
  normally (PEFT's prompt tuning for T5 does the same);
- prefix tuning: a T5 written out below from the model's weights, with the prefix keys/values prepended by hand in
  the encoder's and the decoder's self-attention (PEFT's seq2seq prefix tuning cannot serve: it prefixes the decoder's
  self- and cross-attention and never the encoder); the written-out T5 is first checked against transformers' T5.
Also: per-row prompts in one batch, the gradient reaches only the prompt (both stacks, for prefix tuning), training
through `train.train` lowers the loss, cached greedy generation equals uncached step-by-step argmax, label scoring,
loading a T5 folder, the CLI, and user mistakes."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from softprompt import methods
from softprompt.backbones import Backbone, backbone_for
from softprompt.cli import main
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import Example, TaskEncoder, collate
from softprompt.errors import SoftPromptError
from softprompt.scoring.evaluate import label_scores
from softprompt.scoring.scorer import position_logprobs
from softprompt.scoring.generate import generate
from softprompt.models import load_model
from softprompt.backbones import Seq2SeqBackbone
from softprompt.training.loop import loss_on, train

from conftest import EOS, PAD, VOCAB, VOCAB_SIZE, tiny_tokenizer

VARIANTS = ("t5", "t5-v1.1")
"""Original T5 (ReLU, decoder output rescaled before the tied head) and v1.1 (gated GELU, no rescaling)."""
L_ENC, L_DEC, HEADS, D_KV, D_MODEL = 2, 3, 4, 16, 32  # heads x d_kv = 64 != d_model: catches layout mix-ups


def tiny_t5(variant: str = "t5", seed: int = 0) -> T5ForConditionalGeneration:
    # v1.1 skips the output rescaling (x d_model**-0.5): a smaller init keeps its logits in the same range
    extra = {"t5": dict(initializer_factor=2.0),
             "t5-v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=1.0),
             }[variant]  # fmt: skip
    config = T5Config(
        vocab_size=VOCAB_SIZE, d_model=D_MODEL, d_kv=D_KV, d_ff=64, num_layers=L_ENC, num_decoder_layers=L_DEC,
        num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def tiny_seq2seq(variant: str = "t5", seed: int = 0) -> Seq2SeqBackbone:
    return backbone_for(tiny_t5(variant, seed), tiny_tokenizer())


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


EXAMPLES = [  # inputs of different lengths, targets of different lengths
    Example(ids("the movie was great"), ids("positive yes")),
    Example(ids("a terrible film"), ids("negative")),
    Example(ids("this book is not very good and fun"), ids("negative no two")),
]


# ------------------------------------------------------------------------------------------ independent oracles
def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding, which grows with the magnitude of the values compared."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * (1 + float(expected.abs().max())))


def hf_logits(model, input_ids: list[int], decoder_ids: list[int], soft: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' T5 over one row, (len(decoder_ids), vocab): the encoder reads `inputs_embeds = [P; E]` with an
    all-ones mask, the decoder `decoder_ids`."""
    embeds = model.get_input_embeddings()(torch.tensor([input_ids]))  # (1, T, d)
    if soft is not None:
        embeds = torch.cat([soft[None].to(embeds.dtype), embeds], dim=1)  # (1, n + T, d)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    out = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=torch.tensor([decoder_ids]))
    return out.logits[0]


def relative_bias(attention, queries: int, keys: int, offset: int, bidirectional: bool) -> torch.Tensor:
    """(heads, queries, keys): query i sits at position offset + i, key j at position j."""
    distance = torch.arange(keys)[None, :] - (offset + torch.arange(queries))[:, None]
    buckets = T5Attention._relative_position_bucket(
        distance, bidirectional, attention.relative_attention_num_buckets, attention.relative_attention_max_distance
    )
    return attention.relative_attention_bias(buckets).permute(2, 0, 1)


def attend(attention, x, source, prefix, bias, causal: bool) -> torch.Tensor:
    """One T5 attention written out for a single row: unscaled scores plus the position bias, prefix keys/values
    (2, heads, n, d_kv) in front of the source's."""
    split = lambda t: t.view(t.shape[0], HEADS, D_KV).transpose(0, 1)  # noqa: E731  (heads, length, d_kv)
    q, k, v = split(attention.q(x)), split(attention.k(source)), split(attention.v(source))
    n = 0
    if prefix is not None:
        n = prefix.shape[-2]
        k, v = torch.cat([prefix[0], k], 1), torch.cat([prefix[1], v], 1)
    scores = q @ k.transpose(-1, -2)  # (heads, queries, n + keys)
    if bias is not None:
        scores = scores + bias
    if causal:  # query i (at position n + i) sees keys up to its own position
        allowed = torch.arange(k.shape[1])[None, :] <= n + torch.arange(q.shape[1])[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v  # (heads, queries, d_kv)
    return attention.o(out.transpose(0, 1).reshape(q.shape[1], -1))


def reference_logits(model, input_ids: list[int], decoder_ids: list[int], prefix=None) -> torch.Tensor:
    """T5 written out for one row, (len(decoder_ids), vocab), with an optional prefix (L_enc + L_dec, 2, heads, n,
    d_kv) prepended to the keys/values of every encoder and decoder self-attention (not cross-attention)."""
    n = 0 if prefix is None else prefix.shape[-2]
    layer_prefix = lambda i: None if prefix is None else prefix[i]  # noqa: E731
    x = model.shared(torch.tensor(input_ids))  # (T, d)
    first = model.encoder.block[0].layer[0].SelfAttention
    bias = relative_bias(first, len(input_ids), n + len(input_ids), n, bidirectional=True)
    for i, block in enumerate(model.encoder.block):
        attention = block.layer[0]
        normed = attention.layer_norm(x)
        x = x + attend(attention.SelfAttention, normed, normed, layer_prefix(i), bias, causal=False)
        x = block.layer[1](x)  # feed-forward: its own norm and residual
    encoded = model.encoder.final_layer_norm(x)
    y = model.shared(torch.tensor(decoder_ids))
    first = model.decoder.block[0].layer[0].SelfAttention
    bias = relative_bias(first, len(decoder_ids), n + len(decoder_ids), n, bidirectional=False)
    for i, block in enumerate(model.decoder.block):
        self_attention, cross, feed_forward = block.layer
        normed = self_attention.layer_norm(y)
        y = y + attend(self_attention.SelfAttention, normed, normed, layer_prefix(L_ENC + i), bias, causal=True)
        y = y + attend(cross.EncDecAttention, cross.layer_norm(y), encoded, None, None, causal=False)
        y = feed_forward(y)
    y = model.decoder.final_layer_norm(y)
    if model.config.scale_decoder_outputs:
        y = y * D_MODEL**-0.5
    return model.lm_head(y)


def teacher_forced(example: Example) -> list[int]:
    return [PAD] + example.target_ids[:-1]  # T5's decoder starts from decoder_start_token_id (= pad)


def random_prefix(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(L_ENC + L_DEC, 2, HEADS, n, D_KV, generator=generator) * 0.5


def random_soft(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(seed))


def our_logprobs(backbone, examples, prefix, prefix_mask=None) -> list[torch.Tensor]:
    """Our log-probabilities at every target token of each example, one (len(target), vocab) per row."""
    batch = collate(examples, PAD)
    with torch.no_grad():
        logprobs = position_logprobs(backbone, batch, prefix, prefix_mask)
    return list(logprobs.split([len(e.target_ids) for e in examples]))


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", VARIANTS)
def test_written_out_t5_is_transformers_t5(variant):
    """The prefix-tuning oracle, without a prefix, is transformers' T5: so it is T5 and can judge us."""
    model = tiny_t5(variant)
    with torch.no_grad():
        for e in EXAMPLES:
            expected = model(input_ids=torch.tensor([e.input_ids]),
                             decoder_input_ids=torch.tensor([teacher_forced(e)])).logits[0]  # fmt: skip
            assert_close(reference_logits(model, e.input_ids, teacher_forced(e)), expected)


def test_backbone_builds_a_seq2seq_backbone_for_t5():
    backbone = backbone_for(tiny_t5(), tiny_tokenizer())
    assert type(backbone) is Seq2SeqBackbone and isinstance(backbone, Backbone)
    assert (backbone.shapes.num_layers, backbone.shapes.num_kv_heads, backbone.shapes.head_dim) == (5, HEADS, D_KV)
    assert backbone.shapes.hidden_size == D_MODEL
    assert not any(p.requires_grad for p in backbone.model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_tuning_equals_explicit_encoder_input(variant):
    backbone = tiny_seq2seq(variant)
    soft = random_soft(3, seed=1)
    ours = our_logprobs(backbone, EXAMPLES, backbone.prefix_from_embeddings(soft))
    with torch.no_grad():
        for e, got in zip(EXAMPLES, ours):
            expected = hf_logits(backbone.model, e.input_ids, teacher_forced(e), soft).log_softmax(-1)
            assert_close(got, expected)


def test_prompt_tuning_equals_peft_prompt_tuning_for_seq2seq():
    """PEFT's SEQ_2_SEQ_LM prompt tuning with one transformer submodule (the encoder) and our embeddings as its
    weight: the same logits. (With decoder_input_ids given, PEFT prepends the prompt to the encoder only.)"""
    from peft import PromptTuningConfig, get_peft_model

    backbone = tiny_seq2seq()
    soft = random_soft(3, seed=12)
    config = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, num_transformer_submodules=1)
    peft_model = get_peft_model(tiny_t5(), config).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(soft)
        ours = our_logprobs(backbone, EXAMPLES, backbone.prefix_from_embeddings(soft))
        for e, got in zip(EXAMPLES, ours):
            out = peft_model(input_ids=torch.tensor([e.input_ids]), attention_mask=torch.ones(1, len(e.input_ids)),
                             decoder_input_ids=torch.tensor([teacher_forced(e)]))  # fmt: skip
            assert_close(got, out.logits[0].log_softmax(-1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_tuning_equals_hand_built_keys_and_values(variant):
    backbone = tiny_seq2seq(variant)
    prefix = random_prefix(3, seed=2)
    ours = our_logprobs(backbone, EXAMPLES, prefix)
    with torch.no_grad():
        for e, got in zip(EXAMPLES, ours):
            expected = reference_logits(backbone.model, e.input_ids, teacher_forced(e), prefix).log_softmax(-1)
            assert_close(got, expected)
            # the prefix matters in both stacks: without either half the numbers move
            for half in (slice(0, L_ENC), slice(L_ENC, None)):
                partial = prefix.clone()
                partial[half] = 0
                other = reference_logits(backbone.model, e.input_ids, teacher_forced(e), partial).log_softmax(-1)
                assert (other - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_per_row_prompts_in_one_batch_equal_each_row_alone(kind):
    """Rows with prompts of 2 and 4 slots and one without, stacked (shorter ones left-padded with masked slots)."""
    backbone = tiny_seq2seq()
    make = random_soft if kind == "prompt" else random_prefix
    prompts = [make(2, seed=3), None, make(4, seed=4)]
    stacked, mask = backbone.stack_prefixes(prompts)
    ours = our_logprobs(backbone, EXAMPLES, stacked, mask)
    with torch.no_grad():
        for e, prompt, got in zip(EXAMPLES, prompts, ours):
            if kind == "prompt":
                expected = hf_logits(backbone.model, e.input_ids, teacher_forced(e), prompt)
            else:
                expected = reference_logits(backbone.model, e.input_ids, teacher_forced(e), prompt)
            assert_close(got, expected.log_softmax(-1))


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_first_forward_on_left_padded_prompts_equals_each_row_alone(kind):
    """Generation's prefill: prompts left-padded, per-row prompts left-padded with masked slots; the first
    `forward` returns the decoder state after its start token."""
    backbone = tiny_seq2seq()
    make = random_soft if kind == "prompt" else random_prefix
    prompts = [make(2, seed=10), make(4, seed=11), None]
    stacked, mask = backbone.stack_prefixes(prompts)
    width = max(len(e.input_ids) for e in EXAMPLES)
    input_ids = torch.tensor([[PAD] * (width - len(e.input_ids)) + e.input_ids for e in EXAMPLES])  # (B, T)
    with torch.no_grad():
        hidden, decoder_mask = backbone.forward(input_ids, (input_ids != PAD).long(), backbone.new_cache(stacked, 3),
                                                mask)  # fmt: skip
        assert hidden.shape == (3, 1, D_MODEL)
        for row, (e, prompt) in enumerate(zip(EXAMPLES, prompts)):
            oracle = hf_logits if kind == "prompt" else reference_logits
            assert_close(backbone.logits(hidden[row, -1]), oracle(backbone.model, e.input_ids, [PAD], prompt)[-1])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_gradient_reaches_only_the_prompt(method):
    backbone = tiny_seq2seq()
    config = PromptConfig(method=method, num_tokens=3, init="random")
    prompt = methods.build(config, backbone, generator=torch.Generator().manual_seed(0))
    loss, _ = loss_on(backbone, prompt.kv(backbone), EXAMPLES)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    grads = [p.grad for p in prompt.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if method == "prefix":  # both the encoder's and the decoder's layers learn
        grad = prompt.prefix.grad  # (L_enc + L_dec, 2, heads, n, d_kv)
        assert grad[:L_ENC].abs().sum() > 0 and grad[L_ENC:].abs().sum() > 0


LABELS = ["negative", "positive"]
CUES = {"positive": ["great", "good", "fun"], "negative": ["bad", "terrible", "awful"]}
FILLER = "the a movie film was is it this very quite".split()


def sentiment_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(FILLER, 3) + [rng.choice(CUES[label])]
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_training_lowers_the_loss(method, tmp_path):
    backbone = tiny_seq2seq()
    task = TaskEncoder(TaskConfig(template="review {text} sentiment", labels=LABELS, label_field="label"), backbone.tokenizer)
    examples = task.encode(sentiment_records(32, seed=5))
    config = PromptConfig(method=method, num_tokens=4, init="random")
    start = methods.build(config, backbone, LABELS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = float(loss_on(backbone, start.kv(backbone), examples)[0])
    run = train(backbone, task, config, TrainConfig(steps=32, batch_size=8, lr=0.1, warmup_steps=0, eval_every=0,
                                                    patience=0, seed=0), examples, tmp_path / method,
                init_method=start, progress=False)  # fmt: skip
    with torch.no_grad():
        after = float(loss_on(backbone, run.method.kv(backbone), examples)[0])
    assert after < 0.9 * before, (before, after)
    assert (tmp_path / method / "prompt.safetensors").is_file()


def greedy_reference(step_logits, max_new_tokens: int) -> list[int]:
    """Uncached greedy decoding: each step reruns the whole decoder input and takes the argmax."""
    decoded = [PAD]
    for _ in range(max_new_tokens):
        token = int(step_logits(decoded)[-1].argmax())
        if token == EOS:
            break
        decoded.append(token)
    return decoded[1:]


@pytest.mark.parametrize("kind", ["none", "prompt", "prefix"])
def test_cached_greedy_generation_equals_uncached_argmax(kind):
    backbone = tiny_seq2seq()
    prompts = [e.input_ids for e in EXAMPLES]  # different lengths: generate left-pads them
    prefix = {"none": None, "prompt": random_soft(3, seed=6), "prefix": random_prefix(3, seed=7)}[kind]
    outputs = generate(backbone, prompts, prefix, max_new_tokens=6)
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            if kind == "prefix":
                expected = greedy_reference(lambda d: reference_logits(backbone.model, prompt, d, prefix), 6)
            else:
                expected = greedy_reference(lambda d: hf_logits(backbone.model, prompt, d, prefix), 6)
            assert output == expected
    assert max(map(len, outputs)) >= 2  # decoding went past the first step somewhere


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_row_that_ends_leaves_the_batch_and_the_others_go_on(kind):
    backbone = tiny_seq2seq()
    prompts = [e.input_ids for e in EXAMPLES]
    prefix = {"prompt": random_soft(3, seed=6), "prefix": random_prefix(3, seed=7)}[kind]
    full = generate(backbone, prompts, prefix, max_new_tokens=8)
    # a token that one row makes early and no other row makes becomes an extra EOS: that row leaves the batch
    ends = [(row, i) for row, out in enumerate(full) for i, t in enumerate(out[:4])
            if all(t not in other for other in full[:row] + full[row + 1 :])]  # fmt: skip
    assert ends, "pick other seeds: no token separates the rows"
    row, i = ends[0]
    assert any(len(out) > i + 1 for out in full[:row] + full[row + 1 :]), "no other row decodes past that step"
    backbone.model.generation_config.eos_token_id = [EOS, full[row][i]]
    out = generate(backbone, prompts, prefix, max_new_tokens=8)
    assert out[row] == full[row][:i]  # EOS itself is not returned
    assert out[:row] + out[row + 1 :] == full[:row] + full[row + 1 :]


@pytest.mark.parametrize("labels", [LABELS, ["very good", "not good"]], ids=["one-token", "two-token"])
def test_label_scores_sum_the_label_tokens(labels):
    backbone = tiny_seq2seq()
    task = TaskEncoder(TaskConfig(template="{text}", labels=labels, label_field="label"), backbone.tokenizer)
    examples = [Example(e.input_ids, task.label_ids[0], label=0) for e in EXAMPLES]
    soft = random_soft(3, seed=8)
    scores = label_scores(backbone, task, examples, soft, batch_size=4)
    assert scores.shape == (len(examples), len(labels))
    with torch.no_grad():
        for row, e in enumerate(examples):
            for column, word in enumerate(task.label_ids):
                logprobs = hf_logits(backbone.model, e.input_ids, [PAD] + word[:-1], soft).log_softmax(-1)
                expected = logprobs[torch.arange(len(word)), word].sum()
                assert_close(scores[row, column], expected)


def test_prefix_tuning_word_init_gives_a_prefix_of_both_stacks():
    backbone = tiny_seq2seq()
    config = PromptConfig(method="prefix", num_tokens=5, init="text", init_text="review label sentiment")
    prompt = methods.build(config, backbone)
    assert prompt.prefix.shape == (L_ENC + L_DEC, 2, HEADS, 5, D_KV)
    # the encoder half is the encoder's own keys over the words: check layer 0's against its projection
    words = ids("review label sentiment review label")
    with torch.no_grad():
        first = backbone.model.encoder.block[0].layer[0]
        keys = first.SelfAttention.k(first.layer_norm(backbone.model.shared(torch.tensor(words))))  # (n, heads*d_kv)
    assert_close(prompt.prefix[0, 0], keys.view(5, HEADS, D_KV).transpose(0, 1))


def test_load_model_and_cli_on_a_t5_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny-t5"
    tiny_t5().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, tokenizer = load_model(str(folder))
    assert isinstance(model, T5ForConditionalGeneration) and isinstance(backbone_for(model, tokenizer), Seq2SeqBackbone)

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "{r["text"]}", "label": "{r["label"]}"}}\n' for r in sentiment_records(16, 9)))
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))

    def run(*args) -> str:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["softprompt", *map(str, args)])
        try:
            main()
        except SystemExit as exit:
            assert not exit.code, capsys.readouterr().err
        return capsys.readouterr().out

    out = tmp_path / "prompt"
    run("train", "--model", folder, "--train", data, "--template", "review {text} sentiment", "--labels",
        ",".join(LABELS), "--label-field", "label", "--steps", 3, "--num-tokens", 4, "--method", "prompt",
        "--out", out, "--no-progress")  # fmt: skip
    assert (out / "prompt.safetensors").is_file()
    assert '"accuracy"' in run("eval", "--prompt", out, "--data", data, "--json")
    assert run("generate", "--prompt", out, "--max-new-tokens", 2, "the movie was great").startswith(
        "'the movie was great' -> '"
    )


def test_user_mistakes_raise_clear_errors():
    backbone = tiny_seq2seq()
    with pytest.raises(SoftPromptError, match="does not match the model"):
        generate(backbone, [[5, 6]], torch.zeros(3, D_MODEL + 1))
    with pytest.raises(SoftPromptError, match="does not match the model"):
        generate(backbone, [[5, 6]], torch.zeros(L_ENC, 2, HEADS, 3, D_KV))  # the decoder's layers missing
    with pytest.raises(SoftPromptError, match="cannot mix"):
        backbone.stack_prefixes([random_soft(2, 0), random_prefix(2, 0)])
    with pytest.raises(SoftPromptError, match="gradient checkpointing"):
        backbone.gradient_checkpointing(True)
    # what a causal LM can do and T5 cannot is refused with the reason, not run with a causal LM's assumptions
    for operation, call in [("shard its layers", lambda: backbone.shard_layers(torch.device("cpu"))),
                            ("pack rows for training", lambda: backbone.packed_forward(None, None, None)),
                            ("batch continuously", backbone.check_joinable)]:  # fmt: skip
        refusal = rf"T5ForConditionalGeneration \(encoder-decoder\) cannot {operation}: "
        with pytest.raises(SoftPromptError, match=refusal):
            call()
    bart = BartConfig(vocab_size=VOCAB_SIZE, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32)
    with pytest.raises(SoftPromptError, match="not supported"):
        backbone_for(BartForConditionalGeneration(bart), tiny_tokenizer())
