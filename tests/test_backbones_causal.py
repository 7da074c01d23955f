"""The one idea of the design, proven: both prompt methods reduce to a per-layer K/V prefix, and the prefix path
(method.kv -> Backbone.new_cache -> Backbone.forward -> Backbone.logits) computes what independent references do:

- prompt tuning: the full model reading `inputs_embeds = [P; E]` (Lester et al. 2021, by definition);
- prefix tuning: PEFT's own prefix tuning with the same key/values copied into its prompt encoder;
- gradients w.r.t. the learned vectors match those references; the base model never changes.

All on tiny random models of five architectures (see conftest.py), float32, seconds each.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt import methods
from softprompt.backbones import Backbone, Shapes, cache_keyword
from softprompt.config import PromptConfig

from conftest import ARCHS, PAD, tiny_backbone  # noqa: E402  (tests/ is on sys.path via rootdir conftest)

ATOL = 1e-4
LABELS = ["positive", "negative"]
INIT_TEXT = "the movie was great"


# ---------------------------------------------------------------------------------------------------- helpers
def make_method(backbone: Backbone, method="prompt", init="random", n=4, seed=1, **kw):
    config = PromptConfig(method=method, num_tokens=n, init=init, init_text=INIT_TEXT if init == "text" else None, **kw)
    return methods.build(config, backbone, labels=LABELS, generator=torch.Generator().manual_seed(seed))


def right_padded_batch(lengths=(6, 3, 5), seed=0):
    """(input_ids, attention_mask), real tokens first then PAD."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 128, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def left_pad(ids, mask):
    """The same rows, left-padded instead of right-padded."""
    lengths = mask.sum(-1)
    new_ids, new_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):
        new_ids[row, ids.shape[1] - n :] = ids[row, :n]
        new_mask[row, ids.shape[1] - n :] = 1
    return new_ids, new_mask


def prefix_path_logits(backbone: Backbone, prefix, ids, mask, past_mask=None):
    """Our execution path: K/V prefix -> cache -> forward -> logits at every input position, (B, T, vocab)."""
    cache = backbone.new_cache(prefix, ids.shape[0])
    hidden, full_mask = backbone.forward(ids, mask, cache, past_mask=past_mask)
    assert full_mask.shape == (ids.shape[0], cache.get_seq_length())
    return backbone.logits(hidden)


def explicit_logits(model, prompt_embeddings, ids, mask):
    """The definition of prompt tuning: the full model reads inputs_embeds = [P; E]; logits at the E positions."""
    B, n = ids.shape[0], prompt_embeddings.shape[0]
    embeds = torch.cat([prompt_embeddings[None].expand(B, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(B, n), mask], dim=1)
    return model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, n:].float()


def assert_close_on_real(ours, reference, mask, atol=ATOL):
    real = mask.bool()
    assert ours.shape == reference.shape
    diff = (ours[real] - reference[real]).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.2e} > {atol:.0e}"


def peft_prefix_model(model, prefix: torch.Tensor):
    """PEFT's own prefix tuning over `model`, its prompt encoder holding our prefix (layers, 2, kv_heads, n, head_dim).

    PEFT's layout (peft_model.get_prompt): embedding.weight (n, layers*2*kv_heads*head_dim), viewed per token as
    (layers*2, kv_heads, head_dim) with index 2*l = keys and 2*l+1 = values of layer l, i.e. (layers, 2, kv_heads,
    head_dim): ours permuted (3, 0, 1, 2, 4) and flattened.
    """
    n = prefix.shape[3]
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    peft_model = peft.get_peft_model(model, config)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    ours_as_peft = prefix.detach().permute(3, 0, 1, 2, 4).reshape(n, -1)  # (n, layers * 2 * kv_heads * head_dim)
    assert weight.shape == ours_as_peft.shape, f"PEFT's prefix {tuple(weight.shape)} vs ours {tuple(ours_as_peft.shape)}"
    with torch.no_grad():
        weight.copy_(ours_as_peft)
    return peft_model


# ---------------------------------------------------------------------------------------------------- 1. prompt tuning
@pytest.mark.parametrize("init", ["random", "vocab", "text", "labels"])
def test_prompt_tuning_equals_inputs_embeds(backbone, init):
    method = make_method(backbone, "prompt", init)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        ours = prefix_path_logits(backbone, method.kv(backbone), ids, mask)
        reference = explicit_logits(backbone.model, method.embeddings, ids, mask)
    assert_close_on_real(ours, reference, mask)


def test_prompt_tuning_inits_use_the_right_tokens(backbone):
    """Non-random inits start from embeddings of real tokens: text = its tokens repeated, labels = label words first."""
    table = backbone.model.get_input_embeddings().weight
    tok = backbone.tokenizer
    text = make_method(backbone, "prompt", "text", n=6)
    text_ids = tok(INIT_TEXT, add_special_tokens=False)["input_ids"]
    assert torch.equal(text.embeddings, table[(text_ids * 2)[:6]])
    labels = make_method(backbone, "prompt", "labels", n=4)
    label_ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in LABELS]
    assert torch.equal(labels.embeddings[:2], table[label_ids])
    vocab = make_method(backbone, "prompt", "vocab", n=4)
    rows = [(table == row).all(-1).nonzero().flatten().tolist() for row in vocab.embeddings]
    assert all(r and r[0] not in tok.all_special_ids for r in rows)


def test_prompt_tuning_left_padding_equals_rows_alone(backbone):
    """Left padding sits between P and E: positions must skip the pads. Each row equals that row alone, unpadded."""
    method = make_method(backbone, "prompt", "random")
    ids, mask = left_pad(*right_padded_batch())
    with torch.no_grad():
        ours = prefix_path_logits(backbone, method.kv(backbone), ids, mask)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = explicit_logits(backbone.model, method.embeddings, ids[row, real][None], mask[row, real][None])
            diff = (ours[row, real] - alone[0]).abs().max().item()
            assert diff <= ATOL, f"row {row}: max abs diff {diff:.2e}"


def test_per_row_prompts_of_different_lengths(backbone):
    """Mixed batch: each row its own soft prompt; shorter prefixes left-padded with masked slots (past_mask)."""
    prompts = [make_method(backbone, "prompt", "random", n=n, seed=s) for n, s in ((4, 1), (2, 2), (3, 3))]
    ids, mask = right_padded_batch()
    with torch.no_grad():
        kvs = [p.kv(backbone) for p in prompts]
        width = max(kv.shape[3] for kv in kvs)
        stacked = torch.zeros(len(kvs), *kvs[0].shape[:3], width, kvs[0].shape[4])  # (B, layers, 2, kv, n, hd)
        past_mask = torch.zeros(len(kvs), width, dtype=torch.long)
        for row, kv in enumerate(kvs):
            stacked[row, ..., width - kv.shape[3] :, :] = kv
            past_mask[row, width - kv.shape[3] :] = 1
        ours = prefix_path_logits(backbone, stacked, ids, mask, past_mask=past_mask)
        for row, prompt in enumerate(prompts):
            real = mask[row].bool()
            alone = explicit_logits(backbone.model, prompt.embeddings, ids[row, real][None], mask[row, real][None])
            diff = (ours[row, real] - alone[0]).abs().max().item()
            assert diff <= ATOL, f"row {row}: max abs diff {diff:.2e}"


# ---------------------------------------------------------------------------------------------------- 2. prefix tuning
def test_prefix_tuning_equals_peft(backbone):
    method = make_method(backbone, "prefix", "random", n=3)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        ours = prefix_path_logits(backbone, method.kv(backbone), ids, mask)
        peft_model = peft_prefix_model(backbone.model, method.prefix)
        reference = peft_model(input_ids=ids, attention_mask=mask).logits.float()
    assert_close_on_real(ours, reference, mask)


def test_prefix_mlp_folds_to_the_same_logits(backbone):
    """Trained through the MLP, ejected into plain key/values: same logits, and PEFT agrees with the ejected ones."""
    method = make_method(backbone, "prefix", "random", n=3, prefix_mlp=True, mlp_hidden=16)
    assert not hasattr(method, "prefix") and sum(p.numel() for p in method.mlp.parameters()) > 0
    ids, mask = right_padded_batch()
    tensors = method.artifact_tensors()
    folded = methods.from_tensors(method.config, backbone, tensors)
    assert not folded.config.prefix_mlp and set(tensors) == {methods.Prefix.artifact_key}
    with torch.no_grad():
        unfolded_kv = method.kv(backbone)
        assert torch.equal(folded.kv(backbone), unfolded_kv)
        ours = prefix_path_logits(backbone, unfolded_kv, ids, mask)
        ejected = prefix_path_logits(backbone, folded.kv(backbone), ids, mask)
        reference = peft_prefix_model(backbone.model, folded.prefix)(input_ids=ids, attention_mask=mask).logits
    assert_close_on_real(ejected, ours, mask, atol=1e-6)
    assert_close_on_real(ours, reference.float(), mask)


@pytest.mark.parametrize("init", ["text", "labels"])
def test_prefix_activation_init_equals_prompt_tuning_on_those_tokens(make_backbone, arch, init):
    """Prefix tuning's non-random inits are the frozen model's own K/V over real tokens: at step 0 they compute what
    prompt tuning initialized from the same tokens does."""
    backbone = make_backbone(arch)
    prefix = make_method(backbone, "prefix", init, n=5, seed=7)
    prompt = make_method(backbone, "prompt", init, n=5, seed=7)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        ours = prefix_path_logits(backbone, prefix.kv(backbone), ids, mask)
        reference = explicit_logits(backbone.model, prompt.embeddings, ids, mask)
    assert_close_on_real(ours, reference, mask)


# ---------------------------------------------------------------------------------------------------- 3. gradients
def loss_at(logits, targets, positions):
    """Cross-entropy at a few (row, position) pairs."""
    rows, cols = positions
    return F.cross_entropy(logits[rows, cols], targets[rows, cols])


def test_prompt_tuning_gradients_equal_explicit(backbone):
    method = make_method(backbone, "prompt", "random")
    ids, mask = right_padded_batch()
    targets = torch.roll(ids, -1, dims=1)
    positions = (torch.tensor([0, 0, 1, 2]), torch.tensor([2, 4, 1, 3]))

    loss_at(prefix_path_logits(backbone, method.kv(backbone), ids, mask), targets, positions).backward()
    ours = method.embeddings.grad.clone()

    P = method.embeddings.detach().clone().requires_grad_(True)
    loss_at(explicit_logits(backbone.model, P, ids, mask), targets, positions).backward()
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, P.grad, atol=1e-5, rtol=1e-4)


def test_prefix_tuning_gradients_equal_peft(backbone):
    method = make_method(backbone, "prefix", "random", n=3)
    ids, mask = right_padded_batch()
    targets = torch.roll(ids, -1, dims=1)
    positions = (torch.tensor([0, 1, 2, 2]), torch.tensor([5, 0, 2, 4]))

    loss_at(prefix_path_logits(backbone, method.kv(backbone), ids, mask), targets, positions).backward()
    ours = method.prefix.grad.permute(3, 0, 1, 2, 4).reshape(3, -1)  # PEFT's layout, see peft_prefix_model

    peft_model = peft_prefix_model(backbone.model, method.prefix)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    loss_at(peft_model(input_ids=ids, attention_mask=mask).logits.float(), targets, positions).backward()
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, weight.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- 4. frozen base
@pytest.mark.parametrize(
    "method_name, extra", [("prompt", {}), ("prefix", {}), ("prefix", {"prefix_mlp": True, "mlp_hidden": 16})]
)
def test_base_model_stays_frozen(backbone, method_name, extra):
    method = make_method(backbone, method_name, "random", **extra)
    base = backbone.model
    assert not any(p.requires_grad for p in base.parameters())
    base_ids = {id(p) for p in base.parameters()}
    assert base_ids.isdisjoint(id(p) for p in method.parameters())
    before_base = {k: v.detach().clone() for k, v in base.state_dict().items()}
    before_method = {k: v.detach().clone() for k, v in method.state_dict().items()}

    optimizer = torch.optim.AdamW(method.parameters(), lr=0.05)
    ids, mask = right_padded_batch()
    targets = torch.roll(ids, -1, dims=1)
    for _ in range(3):
        optimizer.zero_grad()
        logits = prefix_path_logits(backbone, method.kv(backbone), ids, mask)
        F.cross_entropy(logits[mask.bool()], targets[mask.bool()]).backward()
        optimizer.step()

    for name, value in base.state_dict().items():
        assert torch.equal(value, before_base[name]), f"base tensor {name} changed"
    assert all(p.grad is None for p in base.parameters())
    changed = [k for k, v in method.state_dict().items() if not torch.equal(v, before_method[k])]
    assert changed, "the prompt did not change"


# ---------------------------------------------------------------------------------------------------- 5. shapes
def test_shapes_match_the_models_own_cache(backbone, arch):
    """Shapes read from the config equal what the model's attention actually caches; Qwen3's explicit head_dim
    (16, not hidden/heads = 8) is honoured."""
    cache = DynamicCache(config=backbone.model.config)
    with torch.no_grad():
        backbone.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{cache_keyword(backbone.model): cache})
    keys = cache.layers[0].keys  # (1, kv_heads, 3, head_dim)
    s = backbone.shapes
    assert (s.num_layers, s.num_kv_heads, s.head_dim) == (len(cache.layers), keys.shape[1], keys.shape[3])
    assert (s.hidden_size, s.vocab_size) == (32, 128)
    if arch == "qwen3":
        assert s.head_dim == 16 != s.hidden_size // 4
    for method_name in ("prompt", "prefix"):
        kv = make_method(backbone, method_name, "random", n=3).kv(backbone)
        assert kv.shape == (s.num_layers, 2, s.num_kv_heads, 3, s.head_dim)


def test_qwen3_head_dim_from_config():
    backbone = tiny_backbone("qwen3")
    assert Shapes.of(backbone.model.config).head_dim == backbone.model.config.head_dim == 16
    assert backbone.shapes.num_kv_heads == 2


@pytest.mark.parametrize("name", ARCHS)
def test_shapes_of_config_alone(name):
    """Shapes.of needs only the config (no weights): the same result as from the model."""
    from conftest import tiny_config

    assert Shapes.of(tiny_config(name)) == tiny_backbone(name).shapes
