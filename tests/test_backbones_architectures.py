"""Any Hugging Face causal LM: tiny random models of 14 more architectures (conftest.MORE_ARCHS) run both prompt
methods through the prefix path and compute what independent references compute:

(a) prompt tuning, through `forward` and through `packed_forward` (handed K/V, or P itself as training hands it,
    `training_input`): the HF model's own logits for inputs_embeds = [P; E]; and the training step itself (`loss_on`
    over `training_input`): the loss and dL/dP of each example alone over [P; E] through the plain model;
(b) prefix tuning: the HF model's own logits with the key/values handed to it as its cache;
(c) greedy generation: greedy decoding here over [P; E], the whole sequence recomputed at every step;
(d) a mixed batch (each row its own prompt, or none): each row generated alone;
(e) prefix tuning: PEFT's own PrefixTuningConfig holding the same key/values.

The tiny configs set the knobs that change how logits are taken (Cohere's logit_scale, Granite's logits_scaling,
Gemma's final_logit_softcapping) away from their neutral values, so a missing head transform fails (a), (b) and (e);
`Backbone` refuses a model whose forward transforms its logits in a way it does not know. Sliding windows shorter
than the sequence: (a) and (c) one row at a time, and batches whose pads would take window slots equal rows alone;
Falcon-7B's multi-query layout (one cached K/V head) runs prefix tuning. Gemma 3 270M, the translation demo's
embedded model, runs (a)-(e) at its real shapes as well (random weights).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, FalconConfig, Gemma3TextConfig, LlamaForCausalLM

from softprompt.backbones import Backbone, backbone_for, cache_keyword
from softprompt.data import Example
from softprompt.errors import SoftPromptError
from softprompt.scoring.generate import generate
from softprompt.scoring.mixed import generate_mixed
from softprompt.training.loop import loss_on

from conftest import EOS, MORE_ARCHS, PAD, VOCAB_SIZE, random_prompt, tiny_config, tiny_model, tiny_tokenizer
from test_backbones_causal import explicit_logits, peft_prefix_model, prefix_path_logits, right_padded_batch
from test_backbones_fast_paths import explicit_loss

ATOL = 1e-4
ATTENTION = {"gemma2": "eager"}  # Gemma 2 has no SDPA kernel (its attention logits are softcapped)
KNOBS = {"cohere": ("scale", "logit_scale"), "granite": ("divisor", "logits_scaling"),
         "gemma2": ("softcap", "final_logit_softcapping"), "gemma3_text": ("softcap", "final_logit_softcapping")}
"""Tiny models whose logits are not the LM head's output alone: the HeadTransform field and the config knob it reads."""


GEMMA3_270M = "gemma3-270m-shapes"
"""Gemma 3 270M at its real widths, heads and 262 k-word vocabulary (its converted config.json), random weights; two
of its 18 layers: a sliding-window one and a global one, each with its own rotary base."""


def gemma3_270m_shapes() -> Gemma3TextConfig:
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}  # fmt: skip
    return Gemma3TextConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                            rope_parameters=rope, max_position_embeddings=32_768, rms_norm_eps=1e-6,
                            tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)  # fmt: skip


@functools.cache
def gemma3_270m_model(seed: int):
    """Built once per seed (4 s for its 168 M-entry embedding table); tests get copies."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(gemma3_270m_shapes(), attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture(scope="module", autouse=True)
def _free_gemma3_270m_models():
    yield
    gemma3_270m_model.cache_clear()  # 0.7 GB each, not kept for the rest of the session


def model_of(arch: str, seed: int = 0):
    if arch == GEMMA3_270M:
        return copy.deepcopy(gemma3_270m_model(seed))
    return tiny_model(arch, seed, ATTENTION.get(arch, "sdpa"))


def backbone_of(arch: str, seed: int = 0) -> Backbone:
    return backbone_for(model_of(arch, seed), tiny_tokenizer())


def token_lists(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in lengths]


def cache_logits(model, prefix, ids, mask):
    """The HF model's own logits with a K/V prefix (layers, 2, kv_heads, n, head_dim) handed to it as its cache."""
    B, n = ids.shape[0], prefix.shape[3]
    layers = [(layer[0].expand(B, -1, -1, -1), layer[1].expand(B, -1, -1, -1)) for layer in prefix]
    cache = DynamicCache(layers, config=model.config)
    full_mask = torch.cat([mask.new_ones(B, n), mask], dim=1)
    return model(input_ids=ids, attention_mask=full_mask, **{cache_keyword(model): cache}).logits.float()


def max_diff(ours, reference, mask) -> float:
    """Largest absolute difference at the real positions."""
    assert ours.shape == reference.shape
    return (ours[mask.bool()] - reference[mask.bool()]).abs().max().item()


def assert_close(ours, reference, mask):
    diff = max_diff(ours, reference, mask)
    assert diff <= ATOL, f"max abs diff {diff:.2e} > {ATOL:.0e}"


def greedy_over_embeddings(model, prompt_embeddings, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens after [P; E(ids)], the whole sequence recomputed each step (no cache), cut at the first EOS."""
    ids, out = list(ids), []
    for _ in range(steps):
        embeds = torch.cat([prompt_embeddings, model.get_input_embeddings()(torch.tensor(ids))])[None]
        token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == EOS:
            break
        out.append(token)
        ids.append(token)
    return out


# ---------------------------------------------------------------------------------------------------- (a) - (e)
@pytest.mark.parametrize("arch", [*MORE_ARCHS, GEMMA3_270M])
def test_prompt_tuning_equals_inputs_embeds(arch):
    """(a), through both the cached forward and the packed training forward."""
    backbone = backbone_of(arch)
    prompt = random_prompt(backbone, "prompt", n=4)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        prefix = prompt.kv(backbone)
        reference = explicit_logits(backbone.model, prompt.embeddings, ids, mask)
        assert_close(prefix_path_logits(backbone, prefix, ids, mask), reference, mask)
        for given in (prefix, prompt.training_input(backbone)):  # K/V, or P (as K/V: 2 packed rows)
            packed = backbone.logits(backbone.packed_forward(given, ids, mask, width=8))  # 14 tokens in 2 packed rows
            assert_close(packed, reference, mask)


@pytest.mark.parametrize("arch", [*MORE_ARCHS, GEMMA3_270M])
def test_prompt_tuning_training_step_equals_inputs_embeds(arch):
    """(a), the step training runs: `loss_on` over `training_input` (P in front of the packed rows, head at the loss
    positions, the model's head transform) gives the loss and dL/dP of the plain model over [P; E], one example
    at a time."""
    backbone = backbone_of(arch)
    prompt = random_prompt(backbone, "prompt", n=4)
    inputs, targets = token_lists([5, 2, 7], seed=9), token_lists([1, 3, 2], seed=10)
    rows = [Example(i, t + [EOS]) for i, t in zip(inputs, targets)]
    loss, _ = loss_on(backbone, prompt.training_input(backbone), rows)
    (ours,) = torch.autograd.grad(loss, prompt.embeddings)
    reference = explicit_loss(backbone.model, prompt.embeddings, rows)
    (expected,) = torch.autograd.grad(reference, prompt.embeddings)
    diff = (loss - reference).abs().item()
    assert diff <= ATOL, f"loss differs by {diff:.2e}"
    scale = expected.abs().max().item()  # Granite's multipliers make its dL/dP ~100x smaller than the others'
    assert scale > 0
    torch.testing.assert_close(ours, expected, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("arch", [*MORE_ARCHS, GEMMA3_270M])
def test_prefix_tuning_equals_the_model_given_the_prefix_as_its_cache(arch):
    """(b)"""
    backbone = backbone_of(arch)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        prefix = random_prompt(backbone, "prefix", n=3, seed=2).kv(backbone)
        ours = prefix_path_logits(backbone, prefix, ids, mask)
        assert_close(ours, cache_logits(backbone.model, prefix, ids, mask), mask)


@pytest.mark.parametrize("arch", [*MORE_ARCHS, GEMMA3_270M])
def test_greedy_generation_equals_uncached_decoding_over_the_prompt(arch):
    """(c)"""
    backbone = backbone_of(arch, seed=1)
    prompt = random_prompt(backbone, "prompt", n=5, seed=3)
    embeddings = prompt.embeddings.detach()
    prefix = prompt.kv(backbone).detach()
    total = 0
    for ids in token_lists([1, 7], seed=4):
        ours = generate(backbone, [ids], prefix, max_new_tokens=10)[0]
        with torch.no_grad():
            assert ours == greedy_over_embeddings(backbone.model, embeddings, ids, 10)
        total += len(ours)
    assert total >= 5, "the random model ended too early to compare anything"


@pytest.mark.parametrize("arch", [*MORE_ARCHS, GEMMA3_270M])
def test_mixed_batch_equals_each_row_alone(arch):
    """(d): rows interleave a prompt-tuning prompt, a prefix-tuning prefix and no prompt at all."""
    backbone = backbone_of(arch, seed=2)
    with torch.no_grad():
        prefixes = [random_prompt(backbone, "prompt", 2, 1).kv(backbone),
                    random_prompt(backbone, "prefix", 4, 2).kv(backbone), None]  # fmt: skip
    owner = [0, 1, 2, 1, 0, 2]
    prompts = token_lists([3, 1, 6, 4, 5, 2], seed=5)
    mixed = generate_mixed(backbone, prompts, [prefixes[k] for k in owner], max_new_tokens=8)
    for row, (ids, k) in enumerate(zip(prompts, owner)):
        assert mixed[row] == generate(backbone, [ids], prefixes[k], max_new_tokens=8)[0], f"row {row}"
    assert sum(map(len, mixed)) >= 12, "the random model ended too early to compare anything"


@pytest.mark.parametrize("arch", [*MORE_ARCHS, GEMMA3_270M])
def test_prefix_tuning_equals_peft(arch):
    """(e): PEFT supports prefix tuning on all 14 (it builds its cache from the config as we do)."""
    backbone = backbone_of(arch)
    prefix = random_prompt(backbone, "prefix", n=3, seed=6).kv(backbone).detach()  # (layers, 2, kv_heads, n, hd)
    ids, mask = right_padded_batch()
    peft_model = peft_prefix_model(model_of(arch), prefix)  # a model of its own: PEFT wraps the one it gets
    with torch.no_grad():
        reference = peft_model(input_ids=ids, attention_mask=mask).logits.float()
        assert_close(prefix_path_logits(backbone, prefix, ids, mask), reference, mask)


# ---------------------------------------------------------------------------------------------------- head transform
@pytest.mark.parametrize("arch", sorted(KNOBS))
def test_head_transform_is_applied_and_matters(arch):
    """The knob is read, and bends these logits by far more than ATOL: dropping it fails the tests above."""
    backbone = backbone_of(arch)
    field, knob = KNOBS[arch]
    transform, config = backbone.head_transform, backbone.model.config
    assert getattr(transform, field) == getattr(config, knob) is not None
    assert [name for name in ("scale", "divisor", "softcap") if getattr(transform, name) is not None] == [field]
    ids, mask = right_padded_batch()
    with torch.no_grad():
        hidden, _ = backbone.forward(ids, mask, backbone.new_cache(None, ids.shape[0]))
        ours, raw = backbone.logits(hidden), backbone.head(hidden).float()
        assert max_diff(ours, raw, mask) > 0.1
        assert_close(ours, backbone.model(input_ids=ids, attention_mask=mask).logits, mask)


def test_model_with_an_unknown_head_transform_is_refused():
    class DoubledLogits(LlamaForCausalLM):  # a transform of the head's output that softprompt does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = DoubledLogits(tiny_config("llama")).eval()
    decoder = model.model
    with pytest.raises(SoftPromptError, match="DoubledLogits takes its logits in a way softprompt does not know: its "
                                              "logits differ from ours by up to .* Known transforms"):  # fmt: skip
        backbone_for(model, tiny_tokenizer())
    assert model.model is decoder  # the check put the decoder back
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(input_ids=ids).logits, 2 * LlamaForCausalLM.forward(model, input_ids=ids).logits)


def test_check_leaves_accepted_models_as_they_were():
    model = model_of("cohere")
    decoder, before = model.model, model(input_ids=torch.tensor([[5, 6, 7]])).logits
    backbone_for(model, tiny_tokenizer())
    assert model.model is decoder
    assert torch.equal(model(input_ids=torch.tensor([[5, 6, 7]])).logits, before)


# ---------------------------------------------------------------------------------------------------- sliding windows
def windowed_backbone(arch: str, window: int) -> Backbone:
    config = tiny_config(arch)
    config.sliding_window = window
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION.get(arch, "sdpa"))
    return backbone_for(model.eval(), tiny_tokenizer())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "starcoder2"])
def test_single_row_across_a_sliding_window(arch):
    """A window shorter than prompt + input + generated tokens: one row at a time computes what [P; E] does."""
    backbone = windowed_backbone(arch, 4)
    prompt = random_prompt(backbone, "prompt", n=3, seed=3)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        prefix = prompt.kv(backbone)
        reference = explicit_logits(backbone.model, prompt.embeddings, ids, mask)
        assert_close(prefix_path_logits(backbone, prefix, ids, mask), reference, mask)
        for row in token_lists([2, 6], seed=7):
            expected = greedy_over_embeddings(backbone.model, prompt.embeddings, row, 8)
            assert generate(backbone, [row], prefix, max_new_tokens=8)[0] == expected


# ---------------------------------------------------------------------------------------------------- sliding windows
@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "starcoder2"])
def test_batched_generation_across_a_sliding_window_equals_rows_alone(arch):
    """In a left-padded batch the pads would sit between the prefix and the input and take sliding-window slots;
    `generate` decodes such rows one at a time instead."""
    backbone = windowed_backbone(arch, 4)
    prefix = random_prompt(backbone, "prompt", n=3, seed=3).kv(backbone).detach()
    prompts = token_lists([1, 6, 3], seed=8)
    alone = [generate(backbone, [ids], prefix, max_new_tokens=8)[0] for ids in prompts]
    assert generate(backbone, prompts, prefix, max_new_tokens=8) == alone
    # a mixed batch: prefixes of 3 and 1 slots (left-padded in the stack) and no prefix
    prefixes = [prefix, random_prompt(backbone, "prefix", n=1, seed=4).kv(backbone).detach(), None]
    alone = [generate(backbone, [ids], p, max_new_tokens=8)[0] for ids, p in zip(prompts, prefixes)]
    assert generate_mixed(backbone, prompts, prefixes, max_new_tokens=8) == alone


def test_prefix_tuning_on_multi_query_falcon():
    """Falcon-7B's layout (multi_query, old decoder) caches one K/V head whatever num_kv_heads says."""
    config = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                          max_position_embeddings=128, vocab_size=VOCAB_SIZE, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    backbone = backbone_for(AutoModelForCausalLM.from_config(config).eval(), tiny_tokenizer())
    ids, mask = right_padded_batch()
    with torch.no_grad():
        prefix = random_prompt(backbone, "prefix", n=3, seed=2).kv(backbone)
        ours = prefix_path_logits(backbone, prefix, ids, mask)
        assert_close(ours, cache_logits(backbone.model, prefix, ids, mask), mask)
