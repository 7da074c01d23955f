"""Mixed batches (each row its own prompt, or none): greedy tokens equal generating each prompt's rows in a batch of
their own, and label scores equal log-probabilities summed here from plain model calls (inputs_embeds = [P; E] for
prompt tuning, a cache built here from the key/values for prefix tuning, the bare model for rows without a prompt)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from softprompt.backbones import cache_keyword
from softprompt.errors import SoftPromptError
from softprompt.scoring.generate import generate
from softprompt.scoring.mixed import generate_mixed, label_scores_mixed

from conftest import ARCHS, VOCAB_SIZE, tiny_backbone
from conftest import random_prompt as build


def random_prompts(lengths, seed=0, vocab=VOCAB_SIZE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_generation_equals_each_prompt_alone(arch):
    backbone = tiny_backbone(arch, seed=2)
    with torch.no_grad():
        prefixes = [build(backbone, "prompt", 2, 1).kv(backbone), build(backbone, "prefix", 5, 2).kv(backbone),
                    build(backbone, "prompt", 3, 3).kv(backbone), None]  # fmt: skip
    owner = [0, 1, 3, 2, 0, 1, 3, 2, 1]  # rows interleave prompts; 3: no prompt
    prompts = random_prompts([3, 1, 6, 4, 2, 5, 1, 7, 3], seed=4)
    mixed = generate_mixed(backbone, prompts, [prefixes[k] for k in owner], max_new_tokens=10)
    for k, prefix in enumerate(prefixes):
        rows = [i for i, o in enumerate(owner) if o == k]
        alone = generate(backbone, [prompts[i] for i in rows], prefix, max_new_tokens=10)  # one batch per prompt
        assert [mixed[i] for i in rows] == alone, f"prompt {k}"
    assert sum(map(len, mixed)) > 30, "the random model ended too early to test anything"


def test_mixed_generation_without_any_prompt_is_the_bare_model():
    backbone = tiny_backbone("qwen2", seed=3)
    prompts = random_prompts([2, 5], seed=5)
    assert generate_mixed(backbone, prompts, [None, None], max_new_tokens=8) == generate(backbone, prompts,
                                                                                         max_new_tokens=8)


def reference_label_logprob(backbone, kind: str, payload, input_ids: list[int], label: list[int]) -> float:
    """sum log p(label tokens | [prompt;] input) from one plain model call, built here."""
    model = backbone.model
    ids = torch.tensor([input_ids + label])
    with torch.no_grad():
        if kind == "prompt":  # prompt tuning is, by definition, the model reading [P; E]
            embeds = torch.cat([payload, model.get_input_embeddings()(ids[0])])[None]
            logits = model(inputs_embeds=embeds).logits[0, payload.shape[0] :]
        elif kind == "prefix":  # per-layer keys/values in front of every layer
            n = payload.shape[-2]
            cache = DynamicCache([(layer[0][None], layer[1][None]) for layer in payload], config=model.config)
            logits = model(input_ids=ids, attention_mask=torch.ones(1, n + ids.shape[1], dtype=torch.long),
                           **{cache_keyword(model): cache}).logits[0]  # fmt: skip
        else:
            logits = model(input_ids=ids).logits[0]
    logprobs = logits.float().log_softmax(-1)
    start = len(input_ids)
    return sum(float(logprobs[start + j - 1, token]) for j, token in enumerate(label))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_mixed_label_scores_equal_plain_model_calls(arch):
    backbone = tiny_backbone(arch, seed=4)
    soft = build(backbone, "prompt", 4, 5)
    prefix_method = build(backbone, "prefix", 2, 6)
    with torch.no_grad():
        kinds = [("prompt", soft.embeddings.detach(), soft.kv(backbone)),
                 ("prefix", prefix_method.prefix.detach(), prefix_method.kv(backbone)),
                 ("none", None, None)]  # fmt: skip
    labels = [[[10], [11]], [[12, 13], [14], [15, 16, 17]], [[18], [19, 20]]]  # each task its own label words
    owner = [1, 0, 2, 0, 1]
    inputs = random_prompts([3, 5, 1, 2, 4], seed=6)
    scores = label_scores_mixed(backbone, inputs, [labels[k] for k in owner], [kinds[k][2] for k in owner],
                                batch_size=4)  # chunks cut across inputs  # fmt: skip
    for row, k in enumerate(owner):
        kind, payload, _ = kinds[k]
        expected = [reference_label_logprob(backbone, kind, payload, inputs[row], word) for word in labels[k]]
        assert scores[row].shape == (len(labels[k]),)
        assert torch.allclose(scores[row], torch.tensor(expected), atol=1e-4), (row, kind)


def test_mixed_refuses_bad_input():
    backbone = tiny_backbone("llama")
    with torch.no_grad():
        kv = build(backbone, "prompt", 2, 1).kv(backbone)
    with pytest.raises(SoftPromptError, match="2 prefixes for 1 rows"):
        generate_mixed(backbone, [[5]], [kv, None])
    with pytest.raises(SoftPromptError, match=r"row 1: prefix shape .* does not match"):
        generate_mixed(backbone, [[5], [6]], [kv, kv[:, :, :1]])
    with pytest.raises(SoftPromptError, match="empty"):
        label_scores_mixed(backbone, [[]], [[[5]]], [kv])
    with pytest.raises(SoftPromptError, match="label sets"):
        label_scores_mixed(backbone, [[5]], [], [kv])


@pytest.fixture
def one_thread():
    """On 2 shared cores a second intra-op thread mostly waits for the first (20x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.real_model
def test_mixed_generation_on_the_embedded_model(real_backbone, one_thread):
    backbone = real_backbone
    with torch.no_grad():  # vocab-initialized prompts of both methods and different lengths, and no prompt
        prefixes = [build(backbone, "prompt", 10, 1, init="vocab").kv(backbone),
                    build(backbone, "prefix", 25, 2, init="vocab").kv(backbone),
                    build(backbone, "prompt", 17, 3, init="vocab").kv(backbone), None]  # fmt: skip
    texts = ["The capital of France is", "Once upon a time", "def add(a, b):", "My favourite colour is",
             "Water boils at", "The best way to learn"]  # fmt: skip
    prompts = [backbone.tokenizer(t)["input_ids"] for t in texts]
    owner = [0, 1, 2, 3, 1, 0]
    mixed = generate_mixed(backbone, prompts, [prefixes[k] for k in owner], max_new_tokens=12)
    for k, prefix in enumerate(prefixes):
        rows = [i for i, o in enumerate(owner) if o == k]
        alone = generate(backbone, [prompts[i] for i in rows], prefix, max_new_tokens=12)
        assert [mixed[i] for i in rows] == alone, f"prompt {k}"
