"""Batched, cached decoding after a K/V prefix, checked against decoding done here without any cache reuse."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from softprompt.backbones import Backbone, backbone_for, cache_keyword
from softprompt.errors import SoftPromptError
from softprompt.scoring.generate import next_tokens, decode_new, generate

from conftest import random_prompt

VOCAB = 100
PAD, EOS = 0, 1
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine intra-op threads make them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: fixed-width words w00..w96, none a substring of another, so stop strings match whole words."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"w{i:02d}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_backbone(arch: str = "llama", attn: str = "sdpa", seed: int = 0) -> Backbone:
    common = dict(vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD, initializer_range=0.1)
    llama_like = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=128, **common,
    )  # fmt: skip
    config = {
        "llama": lambda: LlamaConfig(**llama_like),
        "qwen2": lambda: Qwen2Config(**llama_like),
        "qwen3": lambda: Qwen3Config(head_dim=16, **llama_like),  # head_dim != hidden / heads
        "mistral": lambda: MistralConfig(sliding_window=None, **llama_like),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
        "gemma3": lambda: Gemma3TextConfig(head_dim=16, sliding_window=512,
                                           layer_types=["sliding_attention", "full_attention"], **llama_like),
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    return backbone_for(model, tiny_tokenizer())


def soft_prompt(backbone, num_tokens=5, seed=1, method="prompt"):
    return random_prompt(backbone, method, num_tokens, seed)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_uncached(step_logits, prompt, steps, eos=(EOS,)):
    """Greedy decoding that recomputes the whole sequence every step: `step_logits(ids) -> next-token logits`."""
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(step_logits(ids).argmax())
        if token in eos:
            break
        out.append(token)
        ids.append(token)
    return out


def embeds_logits(backbone, embeddings):
    """Next-token logits of the full model reading inputs_embeds = [P; E(ids)]: the definition of prompt tuning."""
    model = backbone.model

    def step(ids):
        tokens = model.get_input_embeddings()(torch.tensor(ids))  # (T, hidden)
        inputs = torch.cat([embeddings, tokens])[None]  # (1, n + T, hidden)
        return model(inputs_embeds=inputs).logits[0, -1]

    return step


def fresh_prefix_logits(backbone, kv):
    """Next-token logits of the full sequence after a cache built here from the prefix, new every step."""
    model, n = backbone.model, kv.shape[-2]

    def step(ids):
        cache = DynamicCache([(layer[0][None], layer[1][None]) for layer in kv], config=model.config)
        mask = torch.ones(1, n + len(ids), dtype=torch.long)  # the prefix slots are real
        return model(input_ids=torch.tensor([ids]), attention_mask=mask, **{cache_keyword(model): cache}).logits[0, -1]

    return step


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_tuning_matches_uncached_inputs_embeds(arch):
    backbone = tiny_backbone(arch)
    prompt = soft_prompt(backbone)
    prefix = prompt.kv(backbone).detach()  # (layers, 2, kv_heads, 5, head_dim)
    reference = embeds_logits(backbone, prompt.embeddings.detach())
    for p in random_prompts([1, 4, 9], seed=3):
        assert generate(backbone, [p], prefix, max_new_tokens=12)[0] == greedy_uncached(reference, p, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_tuning_matches_uncached_fresh_cache(arch):
    backbone = tiny_backbone(arch, seed=1)
    prefix = soft_prompt(backbone, num_tokens=4, seed=2, method="prefix").kv(backbone).detach()
    reference = fresh_prefix_logits(backbone, prefix)
    for p in random_prompts([1, 6], seed=4):
        assert generate(backbone, [p], prefix, max_new_tokens=12)[0] == greedy_uncached(reference, p, 12)


def test_no_prefix_matches_uncached_model():
    backbone = tiny_backbone("qwen2", seed=2)
    reference = lambda ids: backbone.model(input_ids=torch.tensor([ids])).logits[0, -1]  # noqa: E731
    for p in random_prompts([2, 7], seed=5):
        assert generate(backbone, [p], max_new_tokens=10)[0] == greedy_uncached(reference, p, 10)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("with_prefix", [True, False])
def test_left_padded_batch_equals_rows_alone(arch, attn, with_prefix):
    backbone = tiny_backbone(arch, attn, seed=3)
    prefix = soft_prompt(backbone, seed=4).kv(backbone).detach() if with_prefix else None
    prompts = random_prompts([3, 1, 8, 5], seed=6)
    alone = [generate(backbone, [p], prefix, max_new_tokens=10) for p in prompts]
    assert generate(backbone, prompts, prefix, max_new_tokens=10) == [a[0] for a in alone]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_per_row_prefixes_of_different_lengths(arch):
    backbone = tiny_backbone(arch, seed=5)
    shared = [  # (layers, 2, kv_heads, n_i, head_dim), n_i = 3, 6, 2, 4
        soft_prompt(backbone, 3, seed=1).kv(backbone),
        soft_prompt(backbone, 6, seed=2, method="prefix").kv(backbone),
        soft_prompt(backbone, 2, seed=3).kv(backbone),
        soft_prompt(backbone, 4, seed=4, method="prefix").kv(backbone),
    ]
    shared = [kv.detach() for kv in shared]
    width = max(kv.shape[-2] for kv in shared)
    # Left-pad every prefix to `width` slots with junk (not zeros) that the mask must hide.
    stacked = torch.randn(len(shared), *shared[0].shape[:-2], width, shared[0].shape[-1])  # (B, L, 2, H, n, D)
    mask = torch.zeros(len(shared), width, dtype=torch.long)  # (B, n)
    for row, kv in enumerate(shared):
        stacked[row, ..., width - kv.shape[-2] :, :] = kv
        mask[row, width - kv.shape[-2] :] = 1
    prompts = random_prompts([2, 5, 1, 7], seed=7)
    alone = [generate(backbone, [p], kv, max_new_tokens=10)[0] for p, kv in zip(prompts, shared)]
    assert generate(backbone, prompts, stacked, prefix_mask=mask, max_new_tokens=10) == alone
    # and unbatched against the independent prefix-tuning reference
    assert alone[1] == greedy_uncached(fresh_prefix_logits(backbone, shared[1]), prompts[1], 10)


def test_per_row_prefix_row_with_no_real_slots_is_the_bare_model():
    """A mixed batch may hold a request without a soft prompt: all its slots are masked."""
    backbone = tiny_backbone("llama", seed=6)
    kv = soft_prompt(backbone, 4, seed=5).kv(backbone).detach()
    stacked = torch.stack([kv, torch.randn_like(kv)])  # (2, L, 2, H, 4, D)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    prompts = random_prompts([6, 2], seed=8)
    out = generate(backbone, prompts, stacked, prefix_mask=mask, max_new_tokens=8)
    assert out[0] == generate(backbone, prompts[:1], kv, max_new_tokens=8)[0]
    assert out[1] == generate(backbone, prompts[1:], max_new_tokens=8)[0]


def test_stop_string_cuts_tokens_and_text():
    backbone = tiny_backbone("llama", seed=7)
    tok = backbone.tokenizer
    prefix = soft_prompt(backbone, seed=6).kv(backbone).detach()
    prompts = random_prompts([3, 6], seed=9)
    full = generate(backbone, prompts, prefix, max_new_tokens=12)
    assert all(len(ids) >= 6 for ids in full), "the random model ended too early for this test"
    word = tok.decode([full[0][3]])
    stop = [word, "w00 w00 w00 w00 w00 w00 w00"]  # the second never occurs
    cut = generate(backbone, prompts, prefix, max_new_tokens=12, stop=stop)
    for ids, short in zip(full, cut):
        text = tok.decode(ids)
        if word in text:
            keep = text.index(word)
            assert short == ids[: len(short)]
            assert tok.decode(short) == text[:keep].rstrip()  # the text ends right before the stop string
            assert word in tok.decode(ids[: len(short) + 1])  # the very next token brought the stop string
            assert decode_new(tok, ids, stop) == text[:keep]
        else:
            assert short == ids and decode_new(tok, ids, stop) == text
    assert len(cut[0]) <= 3


def test_stop_string_across_tokens():
    backbone = tiny_backbone("qwen2", seed=8)
    tok = backbone.tokenizer
    prompt = random_prompts([4], seed=10)
    full = generate(backbone, prompt, max_new_tokens=10)[0]
    stop = tok.decode(full[4:6])  # two words, "wAA wBB"
    text = tok.decode(full)
    short = generate(backbone, prompt, max_new_tokens=10, stop=[stop])[0]
    assert tok.decode(short) == text[: text.index(stop)].rstrip()
    assert stop not in tok.decode(short) and stop in tok.decode(full[: len(short) + 2])


def test_eos_ends_rows_and_others_continue():
    backbone = tiny_backbone("llama", seed=9)
    prompts = random_prompts([3, 5], seed=11)
    full = generate(backbone, prompts, max_new_tokens=10)
    # a token row 0 makes early and row 1 never makes becomes an extra EOS via generation_config
    candidates = [t for t in full[0][1:5] if t not in full[1]]
    assert candidates, "pick another seed: no token separates the rows"
    backbone.model.generation_config.eos_token_id = [EOS, candidates[0]]
    out = generate(backbone, prompts, max_new_tokens=10)
    assert out[0] == full[0][: full[0].index(candidates[0])]  # EOS itself is not returned
    assert out[1] == full[1]  # the finished row riding along does not disturb the live one


def test_tokenizer_eos_ends_row():
    backbone = tiny_backbone("gpt2", seed=10)
    prompt = random_prompts([4], seed=12)
    full = generate(backbone, prompt, max_new_tokens=10)[0]
    backbone.tokenizer.eos_token = backbone.tokenizer.convert_ids_to_tokens(full[2])
    assert generate(backbone, prompt, max_new_tokens=10)[0] == full[: full.index(full[2])]


def test_sampling_is_seeded_and_plausible():
    backbone = tiny_backbone("qwen3", seed=11)
    prefix = soft_prompt(backbone, seed=7).kv(backbone).detach()
    prompts = random_prompts([2, 5, 3], seed=13)
    greedy = generate(backbone, prompts, prefix, max_new_tokens=10)
    sample = lambda seed, **kw: generate(backbone, prompts, prefix, max_new_tokens=10, seed=seed, **kw)  # noqa: E731
    assert sample(5, temperature=1.0) == sample(5, temperature=1.0)
    assert sample(5, temperature=1.0) != sample(6, temperature=1.0)
    assert sample(5, temperature=1.0) != greedy
    assert sample(5, temperature=1.0, top_p=1e-6) == greedy  # the nucleus is the top token alone
    assert sample(5, temperature=1e-4) == greedy  # a cold softmax is the argmax
    assert all(len(row) <= 10 for row in sample(7, temperature=2.0, top_p=0.9))


def test_next_token_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)  # (rows, vocab)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(next_tokens(logits, 1.0, 1.0, g), minlength=4) / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # top_p 0.7: the nucleus is {0, 1} (0.5 falls short, 0.8 reaches it), renormalized to 5/8, 3/8
    counts = torch.bincount(next_tokens(logits, 1.0, 0.7, g), minlength=4) / 4000
    assert counts[2:].sum() == 0 and abs(float(counts[0]) - 0.625) < 0.03
    # temperature 2 flattens: p ∝ sqrt(p)
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    counts = torch.bincount(next_tokens(logits, 2.0, 1.0, g), minlength=4) / 4000
    assert torch.allclose(counts, flat / flat.sum(), atol=0.03)


def test_edges_and_errors():
    backbone = tiny_backbone("llama")
    prefix = soft_prompt(backbone).kv(backbone).detach()
    assert generate(backbone, [[5, 6], [7]], prefix, max_new_tokens=0) == [[], []]
    assert generate(backbone, [], prefix) == []
    out = generate(backbone, [[5, 6]], prefix, max_new_tokens=3, progress=True)
    assert len(out[0]) <= 3
    with pytest.raises(SoftPromptError, match="empty"):
        generate(backbone, [[5], []], prefix)
    with pytest.raises(SoftPromptError, match="does not match the model"):
        generate(backbone, [[5]], prefix[:, :, :1])
    with pytest.raises(SoftPromptError, match="rows"):
        generate(backbone, [[5], [6]], prefix[None])
    with pytest.raises(SoftPromptError, match="top_p"):
        generate(backbone, [[5]], prefix, temperature=1.0, top_p=0.0)


def test_decode_new():
    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids(["w01", "w02", "<eos>", "w03"])
    assert decode_new(tok, ids) == "w01 w02 w03"
    assert decode_new(tok, ids, ["w02"]) == "w01 "
    assert decode_new(tok, ids, ["w09", "2 w0"]) == "w01 w0"
    assert decode_new(tok, ids, [""]) == "w01 w02 w03"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decoding_writes_the_cache_in_place_and_matches_uncached_past_its_room(arch, monkeypatch):
    """A decoding step writes its token into free slots of the cache (no copy of the cache: the storage stays),
    and a new buffer when they run out (3 slots here, so 40 tokens cross it a dozen times) changes
    no token. Gemma 3's sliding-window layers keep their own update beside the growing ones."""
    from softprompt.backbones import cache_rows
    from softprompt.backbones.running import RunningBatch

    monkeypatch.setattr(cache_rows, "ROOM", 3)
    backbone = tiny_backbone(arch)
    prompt = soft_prompt(backbone)
    prefix = prompt.kv(backbone).detach()
    reference = embeds_logits(backbone, prompt.embeddings.detach())
    prompts = random_prompts([2, 6], seed=7)
    out = generate(backbone, prompts, prefix, max_new_tokens=40)
    assert min(map(len, out)) > 20, "pick another seed: a row ended before crossing the room several times"
    assert out == [greedy_uncached(reference, p, 40) for p in prompts]

    batch, fed = RunningBatch(backbone), [list(p) for p in prompts]
    with torch.no_grad():
        batch.join(prompts, prefix)
        for step in range(8):  # logits, not only tokens, as the full sequence's; the room runs out twice
            tokens = [5 + step, 9 + step]
            for row, token in zip(fed, tokens):
                row.append(token)
            logits = batch.step(tokens)
            torch.testing.assert_close(logits, torch.stack([reference(row) for row in fed]), rtol=1e-5, atol=1e-5)
            growing = [layer for layer in batch.cache.layers if type(layer) is cache_rows.GrowingLayer]
            if step == 0:  # the first step after the prefill moved the cache into a buffer with room
                storage = [layer.keys.untyped_storage().data_ptr() for layer in growing]
                length = growing[0].keys.shape[-2]
            if step == 1:
                assert [layer.keys.untyped_storage().data_ptr() for layer in growing] == storage  # written in place
                assert growing and growing[0].keys.shape[-2] == length + 1


def all_partitions(items: list[int]):
    """Every way to split `items` into groups (Bell-number many: small lists only)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in all_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


@pytest.mark.parametrize("lengths", [[3, 40, 2, 38, 5, 1, 39], [7, 7, 8, 9, 12], [1, 60], [4]])
def test_prefill_groups_cost_no_more_than_any_split_of_the_rows(lengths):
    from softprompt.backbones.running import length_groups

    cost = lambda groups: sum(16 + len(g) * max(lengths[r] for r in g) for g in groups)  # noqa: E731
    groups = length_groups(lengths, overhead=16)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert cost(groups) == min(cost(p) for p in all_partitions(list(range(len(lengths)))))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_of_very_different_lengths_prefill_in_groups_and_decode_as_alone(arch):
    """Long and short prompts, each behind its own prefix, join in several prefills (so the short ones compute on
    no pads) and still decode as each does alone and as the uncached reference, in the order given."""
    from softprompt.backbones.running import length_groups

    backbone = tiny_backbone(arch, seed=9)
    lengths = [2, 45, 1, 40, 3]
    assert len(length_groups(lengths)) > 1
    shared = [soft_prompt(backbone, n, seed=n, method=m).kv(backbone).detach()
              for n, m in zip([3, 5, 2, 4, 6], ["prompt", "prefix"] * 3)]  # fmt: skip
    stacked, mask = backbone.stack_prefixes(shared)  # (B, L, 2, H, 6, D), (B, 6)
    prompts = random_prompts(lengths, seed=11)
    alone = [generate(backbone, [p], kv, max_new_tokens=10)[0] for p, kv in zip(prompts, shared)]
    assert generate(backbone, prompts, stacked, prefix_mask=mask, max_new_tokens=10) == alone
    assert alone[1] == greedy_uncached(fresh_prefix_logits(backbone, shared[1]), prompts[1], 10)
    shared_prefix = shared[0]  # one prompt for all rows
    alone = [generate(backbone, [p], shared_prefix, max_new_tokens=10)[0] for p in prompts]
    assert generate(backbone, prompts, shared_prefix, max_new_tokens=10) == alone
    # joining rows already running, then a step of all: each row's logits as the full sequence's, uncached
    from softprompt.backbones.running import RunningBatch

    batch, reference = RunningBatch(backbone), fresh_prefix_logits(backbone, shared_prefix)
    with torch.no_grad():
        batch.join(prompts[:1], shared_prefix)
        joined = batch.join(prompts[1:], shared_prefix)  # four rows in more than one prefill
        assert len(length_groups(lengths[1:])) > 1
        torch.testing.assert_close(joined, torch.stack([reference(p) for p in prompts[1:]]), rtol=1e-5, atol=1e-5)
        tokens = [5, 6, 7, 8, 9]
        stepped = batch.step(tokens)
        expected = torch.stack([reference(p + [t]) for p, t in zip(prompts, tokens)])
        torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
