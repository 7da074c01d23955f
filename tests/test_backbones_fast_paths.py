"""The speed work changes no numbers (issue 3, items 1-2), on tiny random models of several architectures:

(a) the training loss computed with the LM head run only at the loss positions (`train.loss_on`) equals the full
    computation: full-vocabulary logits at every position of `[P; E]` with labels = -100 everywhere else and
    transformers' own loss, and equals PEFT's loss for the same prompt values (prompt and prefix tuning);
(b) with `Backbone.gradient_checkpointing()` the loss and the gradients equal those of the unchecked run, for both
    methods, and the layers really are recomputed in the backward pass (and fewer tensors are kept for it); under
    no_grad no layer runs checkpointed;
(c) `Backbone.packed_forward` (the real tokens of all rows packed together, no compute on pads; what `loss_on` runs)
    gives the hidden states of the padded `forward`, and the training loss and gradients equal transformers' own
    computation, with and without checkpointing, also where prompt tuning hands it its embeddings to run in the
    same pass; it takes the padded `forward` itself (a spy says which path ran) for
    per-row prefixes, attention kernels without dense masks and sliding windows shorter than prefix + row;
(d) a batch whose real tokens overflow one packed row (R > 1, prompt tuning's P in front of each row): the loss and
    dL/dP equal each example run alone over [P; E] through the plain transformers model.
"""

from __future__ import annotations

import peft
import pytest
import torch

from transformers import AutoModelForCausalLM, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import softprompt.backbones.replay as replay_module
from softprompt.backbones import backbone_for, cache_keyword
from softprompt.backbones.causal import PACK_WIDTH
from softprompt.backbones.replay import replaying
from softprompt.data import Example, collate
from softprompt.errors import SoftPromptError
from softprompt.training.loop import loss_on

from conftest import ARCHS, EOS, PAD, tiny_backbone, tiny_config, tiny_tokenizer  # noqa: E402  (tests/ on sys.path)
from conftest import random_prompt as make_method

N = 4  # virtual tokens
TOL = dict(atol=1e-5, rtol=1e-4)


def examples(kind: str, seed: int = 0) -> list[Example]:
    """Rows of different lengths (so right padding is exercised): one label token (cls) or several target tokens
    ending with EOS (gen)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    if kind == "cls":
        return [Example(ids(n), ids(1), label=0) for n in (6, 3, 5)]
    return [Example(ids(n), ids(t) + [EOS]) for n, t in ((4, 3), (2, 5), (5, 1))]


def labels_for(batch) -> torch.Tensor:
    """transformers' convention: labels (B, T) with the target token at its own position, -100 elsewhere."""
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.loss_rows, batch.loss_positions + 1] = batch.loss_tokens
    return labels


def full_loss(backbone, method, batch) -> torch.Tensor:
    """Full-vocabulary logits at every position, transformers' own masked loss."""
    model, labels = backbone.model, labels_for(batch)
    B = labels.shape[0]
    if method.name == "prompt":  # the definition: the model reads inputs_embeds = [P; E]
        P = method.embeddings[None].expand(B, -1, -1)
        embeds = torch.cat([P, backbone.embed(batch.input_ids)], dim=1)
        mask = torch.cat([batch.attention_mask.new_ones(B, N), batch.attention_mask], dim=1)
        labels = torch.cat([labels.new_full((B, N), -100), labels], dim=1)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    else:  # the key/values handed to the model as its past, positions after them
        mask = torch.cat([batch.attention_mask.new_ones(B, N), batch.attention_mask], dim=1)
        positions = N + torch.arange(batch.input_ids.shape[1]).expand(B, -1)
        cache = backbone.new_cache(method.kv(backbone), B)
        out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, labels=labels,
                    **{cache_keyword(model): cache})  # fmt: skip
    assert out.logits.shape[-1] == backbone.shapes.vocab_size and out.logits.shape[1] == mask.shape[1] - (
        0 if method.name == "prompt" else N
    )
    return out.loss


def peft_model_with(backbone, method):
    """PEFT's own prompt or prefix tuning over the same model, its prompt encoder holding our values."""
    if method.name == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
        values = method.embeddings  # (n, hidden)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
        values = method.prefix.permute(3, 0, 1, 2, 4).reshape(N, -1)  # (n, layers * 2 * kv_heads * head_dim)
    peft_model = peft.get_peft_model(backbone.model, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(values)
    return peft_model


# ---------------------------------------------------------------------------------------------------- (a) the loss
@pytest.mark.parametrize("kind", ["cls", "gen"])
@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_loss_at_loss_positions_equals_full_computation_and_peft(backbone, method_name, kind):
    method = make_method(backbone, method_name)
    rows = examples(kind)
    batch = collate(rows, PAD)
    with torch.no_grad():
        ours, tokens = loss_on(backbone, method.kv(backbone), rows)
        full = full_loss(backbone, method, batch)
        peft_loss = peft_model_with(backbone, method)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels_for(batch)
        ).loss
    assert tokens == int(batch.attention_mask.sum())
    assert len(batch.loss_tokens) == (3 if kind == "cls" else 3 + 5 + 1 + 3)
    torch.testing.assert_close(ours, full, **TOL)
    torch.testing.assert_close(ours, peft_loss, **TOL)


# ---------------------------------------------------------------------------------------------------- (b) checkpointing
def gradient(backbone, method, rows, checkpointing: bool):
    backbone.gradient_checkpointing(checkpointing)
    method.zero_grad(set_to_none=True)
    loss, _ = loss_on(backbone, method.kv(backbone), rows)
    loss.backward()
    backbone.gradient_checkpointing(False)
    return loss.detach(), [p.grad.clone() for p in method.parameters()]


@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_checkpointed_gradients_equal_unchecked(backbone, method_name):
    method = make_method(backbone, method_name)
    rows = examples("gen")
    loss, grads = gradient(backbone, method, rows, checkpointing=False)
    loss_ckpt, grads_ckpt = gradient(backbone, method, rows, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)  # the same forward
    assert all(g.abs().max() > 0 for g in grads)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, **TOL)
    assert not backbone.model.training and not any(p.requires_grad for p in backbone.model.parameters())
    assert all(p.grad is None for p in backbone.model.parameters())
    assert not any("forward" in vars(layer) for layer in backbone.decoder.modules())  # wrappers removed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_checkpointing_really_recomputes(arch, method_name):
    """Each layer's inner modules run twice per step (forward, then the replay in backward), and far fewer tensors
    are saved for the backward pass."""
    backbone = tiny_backbone(arch)
    method = make_method(backbone, method_name)
    rows = examples("cls")
    mlps = [layer.mlp for layer in backbone.decoder.modules() if hasattr(layer, "mlp")]
    assert len(mlps) == backbone.shapes.num_layers
    calls = []
    for mlp in mlps:  # a pre-hook: the replay stops early, once the last tensor the backward needs is recomputed
        mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    def step(checkpointing: bool) -> tuple[int, int]:
        calls.clear()
        saved = []
        backbone.gradient_checkpointing(checkpointing)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss, _ = loss_on(backbone, method.kv(backbone), rows)
        loss.backward()
        backbone.gradient_checkpointing(False)
        return len(calls), sum(saved)

    forwards = 2 if method_name == "prompt" else 1  # prompt tuning also runs the model over P in kv()
    calls_plain, saved_plain = step(False)
    calls_ckpt, saved_ckpt = step(True)
    assert calls_plain == forwards * len(mlps)
    assert calls_ckpt == 2 * forwards * len(mlps)
    assert saved_ckpt < saved_plain / 2, (saved_ckpt, saved_plain)


def test_checkpointing_is_off_without_gradients(make_backbone, monkeypatch):
    """Evaluation and generation (no_grad) never pay for it: with checkpointing on, no layer runs under torch's
    checkpoint or through the replay wrapper, in the packed (`loss_on`) and the padded (`forward`, what generation
    runs) path, and the result is the same. With gradients the same call does checkpoint every layer (the control
    that shows the spies see it)."""
    backbone = make_backbone("qwen3")
    method = make_method(backbone, "prefix")
    rows = examples("gen")
    batch = collate(rows, PAD)
    layers = [m for m in backbone.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == backbone.shapes.num_layers
    checkpointed, wrapped = [], []  # torch checkpoint calls; per layer run, whether its forward was wrapped
    real_checkpoint = replay_module.checkpoint
    spy = lambda *args, **kwargs: checkpointed.append(1) or real_checkpoint(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(replay_module, "checkpoint", spy)
    for layer in layers:
        layer.register_forward_pre_hook(lambda layer, _: wrapped.append("forward" in vars(layer)))
    with torch.no_grad():
        plain, _ = loss_on(backbone, method.kv(backbone), rows)
        backbone.gradient_checkpointing(True)
        ckpt, _ = loss_on(backbone, method.kv(backbone), rows)
        backbone.forward(batch.input_ids, batch.attention_mask, backbone.new_cache(method.kv(backbone), len(rows)))
    assert backbone.checkpointing
    assert checkpointed == [] and wrapped == [False] * 3 * len(layers)
    torch.testing.assert_close(ckpt, plain, atol=0, rtol=0)
    wrapped.clear()
    loss_on(backbone, method.kv(backbone), rows)  # gradients recorded: checkpointed
    assert len(checkpointed) == len(layers) and wrapped == [True] * len(layers)
    backbone.gradient_checkpointing(False)


class CacheLayer(torch.nn.Module):
    """A decoder layer's contract in miniature: append this step's keys/values to its cache entry, then attend over
    the whole entry. The subclasses differ only in the name their forward gives the cache (renamed in 5.24)."""

    def __init__(self, index: int):
        super().__init__()
        self.index, self.seen = index, []
        self.proj = torch.nn.Linear(8, 8)

    def step(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        self.seen.append(cache.layers[self.index].keys.shape[-2])  # entry length as this run finds it
        states = self.proj(hidden)[:, None]  # (B, 1 head, T, 8)
        keys, values = cache.update(states, states, self.index)  # (B, 1, n + T, 8)
        weights = (states @ keys.transpose(-1, -2)).softmax(-1)
        return hidden + (weights @ values)[:, 0]


class PastKeyValuesLayer(CacheLayer):
    def forward(self, hidden, past_key_values=None):
        return self.step(hidden, past_key_values)


class RenamedCacheLayer(CacheLayer):
    def forward(self, hidden, cache=None):
        return self.step(hidden, cache)


@pytest.mark.parametrize("layer_class", [PastKeyValuesLayer, RenamedCacheLayer])
@pytest.mark.parametrize("by_keyword", [True, False])
def test_replay_wrapper_under_both_cache_names(layer_class, by_keyword):
    """The wrapper works whatever transformers calls the cache and however it passes it: the replay starts from the
    prefix alone (each run sees n cached slots, never n + T), and the gradient equals the unchecked one."""
    torch.manual_seed(0)
    layers = [layer_class(i) for i in range(2)]
    prefix = torch.randn(2, 2, 1, 3, 8, requires_grad=True)  # (layers, K/V, heads, n=3, 8), batch 1
    hidden_in = torch.randn(1, 4, 8)

    def run(wrapped: bool):
        cache = DynamicCache([(layer[0][None], layer[1][None]) for layer in prefix])
        with replaying(layers if wrapped else [], cache):
            hidden = hidden_in
            for layer in layers:
                name = "cache" if layer_class is RenamedCacheLayer else "past_key_values"
                hidden = layer(hidden, **{name: cache}) if by_keyword else layer(hidden, cache)
        (grad,) = torch.autograd.grad(hidden.square().sum(), prefix)
        return cache, grad

    _, plain = run(wrapped=False)
    for layer in layers:
        layer.seen.clear()
    cache, checkpointed = run(wrapped=True)
    assert [layer.seen for layer in layers] == [[3, 3], [3, 3]]  # the forward, then the replay, each from the prefix
    assert [entry.keys.shape[-2] for entry in cache.layers] == [7, 7]  # the prefix plus this step, once
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    assert not any("forward" in vars(layer) for layer in layers)


def test_replay_wrapper_refuses_a_layer_without_the_cache():
    """A layer that is not handed the cache would be replayed on top of its own first run: refused, not silent."""
    layer = PastKeyValuesLayer(0)
    cache = DynamicCache([(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8))])
    with replaying([layer], cache), pytest.raises(SoftPromptError, match="not handed the prefix cache"):
        layer(torch.randn(1, 4, 8, requires_grad=True), past_key_values=DynamicCache())


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointed_training_steps_match(arch):
    """A few optimizer steps with and without checkpointing end at the same prompt (both methods)."""
    for method_name in ("prompt", "prefix"):
        results = []
        for checkpointing in (False, True):
            backbone = tiny_backbone(arch).gradient_checkpointing(checkpointing)
            method = make_method(backbone, method_name)
            optimizer = torch.optim.AdamW(method.parameters(), lr=0.05)
            for step in range(3):
                optimizer.zero_grad()
                loss_on(backbone, method.kv(backbone), examples("gen", seed=step))[0].backward()
                optimizer.step()
            results.append([p.detach().clone() for p in method.parameters()])
        for plain, ckpt in zip(*results):
            torch.testing.assert_close(ckpt, plain, **TOL)


# ---------------------------------------------------------------------------------------------------- (c) packing
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method_name,given", [("prompt", "kv"), ("prompt", "embeddings"), ("prefix", "kv")])
def test_packed_forward_equals_padded_forward(make_backbone, arch, attn, method_name, given):
    """Right and left padding; one packed row for all (the default width) and one packed row per row (width 1).
    Prompt tuning's embeddings (what training hands it, `training_input`) run in front of the packed row: the rows
    get what they get behind the K/V `prefix_from_embeddings` computes in its own pass."""
    backbone = make_backbone(arch, attn=attn)
    method = make_method(backbone, method_name)
    batch = collate(examples("gen") + examples("cls", seed=1), PAD)
    ids, mask = batch.input_ids, batch.attention_mask
    left_ids, left_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    for row, n in enumerate(mask.sum(-1).tolist()):  # the same rows, left-padded
        left_ids[row, ids.shape[1] - n :], left_mask[row, ids.shape[1] - n :] = ids[row, :n], 1
    with torch.no_grad():
        kv = method.kv(backbone)
        for ids_, mask_ in ((ids, mask), (left_ids, left_mask)):
            reference, _ = backbone.forward(ids_, mask_, backbone.new_cache(kv, ids_.shape[0]))
            for width in (None, 1):
                kwargs = {} if width is None else {"width": width}
                prefix = kv if given == "kv" else method.training_input(backbone)
                packed = backbone.packed_forward(prefix, ids_, mask_, **kwargs)
                real = mask_.bool()
                torch.testing.assert_close(packed[real], reference[real], **TOL)
                assert not packed[~real].any()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method_name,given", [("prompt", "kv"), ("prompt", "training_input"), ("prefix", "kv")])
def test_training_loss_and_gradients_equal_the_full_computation(backbone, method_name, given, checkpointing):
    """`loss_on` (packed rows, head at the loss positions, optionally checkpointed) against transformers' own loss
    over full-vocabulary logits of the padded batch: the same loss and the same gradients, whether prompt tuning
    hands it K/V or (as training does, `training_input`) its embeddings."""
    method = make_method(backbone, method_name)
    rows = examples("gen")
    full_loss(backbone, method, collate(rows, PAD)).backward()
    reference = [p.grad.clone() for p in method.parameters()]
    method.zero_grad(set_to_none=True)
    backbone.gradient_checkpointing(checkpointing)
    loss, _ = loss_on(backbone, getattr(method, given)(backbone), rows)
    loss.backward()
    backbone.gradient_checkpointing(False)
    with torch.no_grad():
        torch.testing.assert_close(loss, full_loss(backbone, method, collate(rows, PAD)), **TOL)
    for p, g in zip(method.parameters(), reference):
        torch.testing.assert_close(p.grad, g, **TOL)


def forward_calls(backbone, monkeypatch) -> list:
    """Spy on `backbone.forward` (the padded path): each call is recorded, then run."""
    calls, real = [], backbone.forward

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "forward", spy)
    return calls


def test_packed_forward_falls_back_where_it_cannot_pack(make_backbone, monkeypatch):
    """Per-row prefixes (6-dim, with or without a prefix mask) and an attention kernel without dense masks (a kernel
    registered under a name transformers makes no mask for) take the padded `forward`, the shared prefix under sdpa
    does not; the results equal the padded forward's."""
    backbone = make_backbone("llama")
    method = make_method(backbone, "prefix")
    batch = collate(examples("cls"), PAD)
    ids, mask, real = batch.input_ids, batch.attention_mask, batch.attention_mask.bool()
    calls = forward_calls(backbone, monkeypatch)
    with torch.no_grad():
        kv = method.kv(backbone)
        reference, _ = backbone.forward(ids, mask, backbone.new_cache(kv, 3))
        calls.clear()
        stacked, stacked_mask = backbone.stack_prefixes([kv] * 3)
        cases = {"shared prefix": (kv, None), "per-row prefix": (kv[None].expand(3, *kv.shape), None),
                 "per-row prefix and mask": (stacked, stacked_mask)}  # fmt: skip
        for case, (prefix, prefix_mask) in cases.items():
            packed = backbone.packed_forward(prefix, ids, mask, prefix_mask)
            assert len(calls) == (0 if case == "shared prefix" else 1), case
            torch.testing.assert_close(packed[real], reference[real], **TOL)
            assert not packed[~real].any()
            calls.clear()
        kernel_calls = []

        def kernel(*args, **kwargs):  # sdpa under another name
            kernel_calls.append(1)
            return sdpa_attention_forward(*args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "softprompt-test-kernel", kernel)
        monkeypatch.setattr(backbone.model.config, "_attn_implementation", "softprompt-test-kernel")
        backbone.packed_forward(kv, ids, mask)
        assert len(calls) == 1 and kernel_calls, "a kernel without dense masks must take the padded path"
        soft = make_method(backbone, "prompt")  # its embeddings become K/V first on that path
        packed = backbone.packed_forward(soft.training_input(backbone), ids, mask)
        reference, _ = backbone.forward(ids, mask, backbone.new_cache(soft.kv(backbone), 3))
    assert len(calls) == 3
    torch.testing.assert_close(packed[real], reference[real], **TOL)


def test_packed_forward_falls_back_for_a_sliding_window_shorter_than_a_row(monkeypatch):
    """A sliding window that reaches the prefix from every token of the longest row packs (and equals the padded
    forward); one position shorter takes the padded `forward`, which applies the window."""
    batch = collate(examples("cls"), PAD)
    ids, mask, real = batch.input_ids, batch.attention_mask, batch.attention_mask.bool()
    longest = int(mask.sum(-1).max())
    for window, padded in ((N + longest, False), (N + longest - 1, True)):
        config = tiny_config("mistral")
        config.sliding_window = window
        torch.manual_seed(0)
        backbone = backbone_for(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval(),
                            tiny_tokenizer())  # fmt: skip
        kv = make_method(backbone, "prefix").kv(backbone).detach()
        calls = forward_calls(backbone, monkeypatch)
        with torch.no_grad():
            packed = backbone.packed_forward(kv, ids, mask)
            assert len(calls) == int(padded), window
            reference, _ = backbone.forward(ids, mask, backbone.new_cache(kv, len(ids)))
        torch.testing.assert_close(packed[real], reference[real], **TOL)


def test_packed_forward_honours_a_prefix_mask_with_embeddings(make_backbone):
    """A prefix mask says which slots each row sees; with embeddings in front of the packed rows their slots are
    masked as the K/V slots would be (here the first hidden from the second row, whose tokens then sit one position
    earlier): the same hidden states as the K/V prefix with that mask."""
    backbone = make_backbone("llama")
    method = make_method(backbone, "prompt")
    batch = collate(examples("cls"), PAD)
    prefix_mask = torch.ones(3, N, dtype=torch.long)
    prefix_mask[1, 0] = 0
    real = batch.attention_mask.bool()
    with torch.no_grad():
        from_embeddings = backbone.packed_forward(method.training_input(backbone), batch.input_ids,
                                                  batch.attention_mask, prefix_mask)  # fmt: skip
        from_kv = backbone.packed_forward(method.kv(backbone), batch.input_ids, batch.attention_mask, prefix_mask)
    torch.testing.assert_close(from_embeddings[real], from_kv[real], **TOL)


# ---------------------------------------------------------------------------------------------------- (d) R > 1
def explicit_loss(model, prompt_embeddings: torch.Tensor, rows: list[Example]) -> torch.Tensor:
    """The definition, one example at a time with no padding: the plain model reads inputs_embeds = [P; E(input +
    target)]; the mean over all target tokens of -log-softmax of its logits at the position before each one."""
    n, total, count = prompt_embeddings.shape[0], 0.0, 0
    for row in rows:
        ids = torch.tensor(row.input_ids + row.target_ids)
        embeds = torch.cat([prompt_embeddings, model.get_input_embeddings()(ids)])[None]
        logprobs = model(inputs_embeds=embeds).logits[0].float().log_softmax(-1)  # (n + T, vocab)
        before = n + len(row.input_ids) - 1 + torch.arange(len(row.target_ids))  # predicts each target token
        total = total - logprobs[before, torch.tensor(row.target_ids)].sum()
        count += len(row.target_ids)
    return total / count


def decoder_inputs(backbone) -> list[torch.Tensor]:
    """Spy on the decoder: what each call reads (inputs_embeds, else input_ids)."""
    seen = []
    backbone.decoder.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs.get("inputs_embeds", kwargs.get("input_ids")).detach()),
        with_kwargs=True)  # fmt: skip
    return seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prompt_over_several_packed_rows_equals_each_example_alone(arch, checkpointing):
    """Rows whose real tokens overflow one packed row (PACK_WIDTH): `loss_on` with `training_input` (what training
    runs) packs them into several rows behind P's K/V, computed once at batch 1 (P in front of each packed row would
    cost more memory for no time saved); the loss and dL/dP equal those of each example run alone over [P; E]
    through the plain model."""
    backbone = tiny_backbone(arch).gradient_checkpointing(checkpointing)
    method = make_method(backbone, "prompt")
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    rows = [Example(ids(n - 3), ids(2) + [EOS]) for n in (110, 97, 83, 64)]  # positions stay < 128 (GPT-2's table)
    assert sum(len(r.input_ids) + len(r.target_ids) for r in rows) > PACK_WIDTH
    seen = decoder_inputs(backbone)
    loss, _ = loss_on(backbone, method.training_input(backbone), rows)
    (ours,) = torch.autograd.grad(loss, method.embeddings)
    backbone.gradient_checkpointing(False)
    embeds, ids = seen[:2]  # the forward's calls (a replay may add more)
    assert torch.equal(embeds, method.embeddings.detach()[None]), "P should run alone at batch 1"
    assert ids.shape[0] == 2, "the batch should pack into two rows"
    reference = explicit_loss(backbone.model, method.embeddings, rows)
    (expected,) = torch.autograd.grad(reference, method.embeddings)
    torch.testing.assert_close(loss, reference, **TOL)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, **TOL)
