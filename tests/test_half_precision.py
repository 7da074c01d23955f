"""Half precision (issue 25): every equivalence family in bfloat16 and float16, on tiny random models cast with
`model.to(dtype)`, against independent references computed in the same dtype by plain transformers calls:

(a) prompt tuning: logits, loss and dL/dP of our paths (K/V prefix; P in front of packed rows; `loss_on` over
    `training_input`) against the model reading inputs_embeds = [P; E], each example alone;
(b) prefix tuning: logits, loss and dL/dprefix against the model given the key/values as its cache, built here;
(c) a packed batch whose rows run behind different prompts (`side_by_side`): loss and gradients against each example
    alone behind its own prompt;
(d) mixed batches (a prompt per row, or none): label scores against each row alone; greedy tokens against the plain
    model alone (up to near-ties, see below);
(e) served answers (the local engine): the tokens `generate` gives for the same batch, and greedy up to near-ties
    against the plain model alone when rows join mid-generation;
(f) resume: a bfloat16 run stopped after a checkpoint and resumed ends with the very tensors of a straight run;
(g) the precision policy: trainable parameters and optimizer state float32 beside a half-precision model, losses and
    label scores float32 log-softmaxes of the model's half-precision logits up-cast, artifacts float32;
(h) T5 (the encoder-decoder backbone): prompt tuning's [P; E] and prefix tuning's hand-built key/values.

Tolerances. A half-precision number carries 8 (bfloat16) or 11 (float16) significant bits: one rounding moves a
value by up to half an ulp, 2^-9 ~ 2e-3 relative in bfloat16 (its eps, the ulp at 1, is 2^-7 ~ 8e-3; the issue's
"~4e-3 per op" is that order) and 2^-12 ~ 2.4e-4 in float16 (eps 2^-10). Our path and the reference run the same
operations in another order and shape (the prefix computed at batch 1 or in the row's own pass, packed rows, a
cache of another length), so they round differently, and the differences compound over the layers (attention, MLP,
norms, residual sums); matrix products, softmax and norms accumulate in float32 inside the kernels, and log-softmax,
losses and label scores are float32 here, so they add nothing. The bound, `ULPS`, is 4 eps x (1 + max |reference|)
in each dtype's own eps (bfloat16: 0.03 x (1 + max) on logits of magnitude ~1 - 3; float16 1/8 of that); gradients
are compared relative to their largest entry. Measured on these 21 models: at most 0.8 on logits and 1.1 on
gradients. A real mistake lands well outside: the K/V prefix of a soft prompt that lost a slot on a sliding-window
model (the bug this file found: the `-window4` cases) 9 (bfloat16) and 68 (float16), positions shifted by one 6 - 15
and 20 - 120 (all but Gemma in bfloat16, whose 8-wide heads barely rotate). T5 gets `T5_ULPS` = 16: its hand-written
prefix-tuning reference takes its softmax in the model's dtype (transformers' T5 in float32), measured up to 10.

Near-ties. Greedy decoding takes the argmax; two tokens whose logits lie within the rounding above of each other may
swap when a row runs in another batch shape (its sums then round differently). So greedy tokens are checked against
the plain model by teacher forcing, the chosen token's logit within the bound of the best one at every step (and EOS
within it where a row stopped), and token for token against `generate` where the batch shape is the same.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from softprompt import methods
from softprompt.backbones import Backbone, backbone_for
from softprompt.config import PromptConfig
from softprompt.data import Example, collate
from softprompt.scoring.generate import generate
from softprompt.scoring.mixed import generate_mixed, label_scores_mixed
from softprompt.scoring.scorer import label_logprobs, target_logprobs
from softprompt.serve.engines.base import EngineConfig, Sampling, Sequence
from softprompt.serve.engines.local import LocalEngine
from softprompt.training.checkpoint import latest_checkpoint
from softprompt.training.loop import loss_on, prompt_input_for, train

from conftest import ARCHS, EOS, MORE_ARCHS, VOCAB_SIZE, random_prompt, tiny_config, tiny_tokenizer
from test_backbones_architectures import ATTENTION, cache_logits
from test_backbones_causal import explicit_logits, prefix_path_logits, right_padded_batch
from test_backbones_fast_paths import explicit_loss
from test_backbones_seq2seq import EXAMPLES, hf_logits, random_prefix, reference_logits, teacher_forced, tiny_t5
from test_train import prompt_config, sentiment_records, sentiment_task, train_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ULPS = 4
"""The bound on a difference between two computations of the same value in one dtype, in units of the dtype's eps
times (1 + the largest magnitude compared); see the module docstring."""
T5_ULPS = 16
WINDOWED = ("starcoder2-window4", "gemma3_text-window4")
"""Sliding windows of 4 slots, no longer than the prompts here: every layer windowed, or windowed and full layers
alternating."""
ALL_ARCHS = (*ARCHS, *MORE_ARCHS, *WINDOWED)
"""Every tested causal architecture."""
REPRESENTATIVE = ("llama", "gpt2", "qwen3", "gemma2")
"""For the heavier families: grouped-query attention with rotary positions, learned positions, an explicit head_dim
with q/k norms, a softcapped head with sliding-window layers and eager attention."""


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(params=list(DTYPES))
def dtype(request) -> torch.dtype:
    return DTYPES[request.param]


def half_model(arch: str, dtype: torch.dtype, seed: int = 0):
    """A tiny random causal LM (conftest's config; `NAME-windowN` sets a sliding window of N), cast to `dtype`."""
    name, _, window = arch.partition("-window")
    config = tiny_config(name)
    if window:
        config.sliding_window = int(window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION.get(name, "sdpa"))
    return model.eval().to(dtype)


def half_backbone(arch: str, dtype: torch.dtype, seed: int = 0) -> Backbone:
    return backbone_for(half_model(arch, dtype, seed), tiny_tokenizer())


def bound(dtype: torch.dtype, reference: torch.Tensor, ulps: int = ULPS) -> float:
    """`ulps` eps x (1 + max |reference|): how far two roundings of the same computation in `dtype` may drift."""
    return ulps * torch.finfo(dtype).eps * (1 + reference.detach().abs().max().item())


def assert_within(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str,
                  ulps: int = ULPS) -> None:  # fmt: skip
    assert ours.shape == reference.shape, what
    assert ours.dtype == reference.dtype == torch.float32, what  # both up-cast before comparing
    limit = bound(dtype, reference, ulps)
    diff = (ours - reference).abs().max().item()
    assert diff <= limit, f"{what}: max abs diff {diff:.3g} > {limit:.3g} ({diff / limit * ulps:.1f} eps x (1 + max))"


def token_lists(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in lengths]


def examples(seed=9) -> list[Example]:
    inputs, targets = token_lists([5, 2, 7], seed), token_lists([1, 3, 2], seed + 1)
    return [Example(i, t + [EOS]) for i, t in zip(inputs, targets)]


def row_logits(model, prompt: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """The plain model over one row after `prompt` (soft tokens (n, hidden): inputs_embeds = [P; E]; a K/V prefix:
    handed to it as its cache; None: the bare model), logits (T, vocab) up-cast to float32."""
    ids = torch.tensor([ids])
    if prompt is None:
        return model(input_ids=ids).logits[0].float()
    if prompt.dim() == 2:
        return explicit_logits(model, prompt, ids, torch.ones_like(ids))[0]
    return cache_logits(model, prompt, ids, torch.ones_like(ids))[0]


def reference_nll(model, prompt: torch.Tensor | None, rows: list[Example]) -> tuple[torch.Tensor, int]:
    """Summed -log p(target) of each row alone (float32 log-softmax of the up-cast logits), and the target count."""
    total, count = 0.0, 0
    for row in rows:
        logprobs = row_logits(model, prompt, row.input_ids + row.target_ids).log_softmax(-1)
        before = len(row.input_ids) - 1 + torch.arange(len(row.target_ids))
        total = total - logprobs[before, torch.tensor(row.target_ids)].sum()
        count += len(row.target_ids)
    return total, count


def assert_greedy_up_to_ties(model, prompt, ids: list[int], tokens: list[int], max_new: int, dtype) -> None:
    """`tokens`, decoded greedily after `ids`, are the plain model's argmax at every step up to near-ties (the chosen
    token's logit within `bound` of the best), teacher-forced with our tokens; a row that stopped early had EOS
    within it. One forward pass over the whole row: no cache, no batch."""
    logits = row_logits(model, prompt, ids + tokens)[len(ids) - 1 :]  # (len(tokens) + 1, vocab): step k predicts
    chosen = tokens + ([EOS] if len(tokens) < max_new else [])
    for step, token in enumerate(chosen):
        best, limit = logits[step].max().item(), bound(dtype, logits[step])
        gap = best - logits[step, token].item()
        assert gap <= limit, f"step {step}: token {token} is {gap:.3g} below the best ({limit:.3g} allowed)"


# ---------------------------------------------------------------------------------------------------- (a), (b)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prompt_tuning_logits_loss_and_gradient_equal_explicit_inputs_embeds(arch, dtype):
    """(a) Logits through the K/V prefix and through P in front of packed rows, and `loss_on` over `training_input`
    with its dL/dP, against the plain model reading inputs_embeds = cat(P, E) in the same dtype (P is float32, cast
    to the model's dtype on its way in, as both paths do), each example alone for the loss."""
    backbone = half_backbone(arch, dtype)
    prompt = random_prompt(backbone, "prompt", n=4)
    assert prompt.embeddings.dtype == torch.float32
    ids, mask = right_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        reference = explicit_logits(backbone.model, prompt.embeddings.to(dtype), ids, mask)
        assert_within(prefix_path_logits(backbone, prompt.kv(backbone), ids, mask)[real], reference[real], dtype,
                      "K/V prefix")  # fmt: skip
        packed = backbone.logits(backbone.packed_forward(prompt.training_input(backbone), ids, mask, width=8))
        assert_within(packed[real], reference[real], dtype, "P in front of packed rows")
    rows = examples()
    loss, _ = loss_on(backbone, prompt.training_input(backbone), rows)
    (ours,) = torch.autograd.grad(loss, prompt.embeddings)
    expected_loss = explicit_loss(backbone.model, prompt.embeddings.to(dtype), rows)
    (expected,) = torch.autograd.grad(expected_loss, prompt.embeddings)
    assert_within(loss, expected_loss, dtype, "loss")
    assert ours.dtype == torch.float32 and expected.abs().max() > 0
    assert_within(ours / expected.abs().max(), expected / expected.abs().max(), dtype, "dL/dP (over its max)")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prefix_tuning_logits_loss_and_gradient_equal_the_model_given_its_cache(arch, dtype):
    """(b) The prefix through our cache path against transformers' forward with past_key_values built here from the
    same key/values (cast to the model's dtype), logits of a padded batch and the loss and its gradient per row."""
    backbone = half_backbone(arch, dtype)
    prompt = random_prompt(backbone, "prefix", n=3, seed=2)
    ids, mask = right_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        prefix = prompt.kv(backbone)
        assert prefix.dtype == dtype and prompt.prefix.dtype == torch.float32
        reference = cache_logits(backbone.model, prompt.prefix.to(dtype), ids, mask)
        assert_within(prefix_path_logits(backbone, prefix, ids, mask)[real], reference[real], dtype, "logits")
    rows = examples(seed=3)
    loss, _ = loss_on(backbone, prompt.training_input(backbone), rows)
    (ours,) = torch.autograd.grad(loss, prompt.prefix)
    total, count = reference_nll(backbone.model, prompt.prefix.to(dtype), rows)
    (expected,) = torch.autograd.grad(total / count, prompt.prefix)
    assert_within(loss, total / count, dtype, "loss")
    assert ours.dtype == torch.float32 and expected.abs().max() > 0
    assert_within(ours / expected.abs().max(), expected / expected.abs().max(), dtype, "dL/dprefix (over its max)")


# ---------------------------------------------------------------------------------------------------- (c), (d)
@pytest.mark.parametrize("arch", REPRESENTATIVE)
def test_rows_behind_different_prompts_in_one_packed_batch_equal_each_row_alone(arch, dtype):
    """(c) A training batch whose rows run behind a prompt-tuning prompt or a prefix (`prompt_input_for`, as a
    multitask run builds it): the loss and both prompts' gradients against each row alone behind its own prompt."""
    backbone = half_backbone(arch, dtype)
    soft, prefix = random_prompt(backbone, "prompt", n=2, seed=4), random_prompt(backbone, "prefix", n=3, seed=5)
    rows = examples(seed=6) + examples(seed=7)
    names = ["soft", "prefix", "prefix", "soft", "prefix", "soft"]
    inputs = {"soft": soft.training_input(backbone), "prefix": prefix.training_input(backbone)}
    prompt_input, prefix_mask = prompt_input_for(backbone, inputs, names)
    loss, _ = loss_on(backbone, prompt_input, rows, None, prefix_mask)
    ours = torch.autograd.grad(loss, [soft.embeddings, prefix.prefix])
    alone = {"soft": soft.embeddings.to(dtype), "prefix": prefix.prefix.to(dtype)}
    totals = [reference_nll(backbone.model, alone[name], [row]) for name, row in zip(names, rows)]
    reference = sum(t for t, _ in totals) / sum(c for _, c in totals)
    expected = torch.autograd.grad(reference, [soft.embeddings, prefix.prefix])
    assert_within(loss, reference, dtype, "loss")
    for what, got, want in zip(("dL/dP", "dL/dprefix"), ours, expected):
        scale = want.abs().max()
        assert scale > 0
        assert_within(got / scale, want / scale, dtype, what)


def mixed_prompts(backbone: Backbone, dtype):
    """(what a row's prompt hands our engine, what the plain model reads alone): a prompt-tuning prompt (its K/V;
    P), a prefix (its K/V; the same K/V as the reference's cache) and no prompt."""
    soft, prefix = random_prompt(backbone, "prompt", n=2, seed=1), random_prompt(backbone, "prefix", n=4, seed=2)
    with torch.no_grad():
        return [(soft.kv(backbone), soft.embeddings.detach().to(dtype)),
                (prefix.kv(backbone), prefix.prefix.detach().to(dtype)), (None, None)]  # fmt: skip


@pytest.mark.parametrize("arch", REPRESENTATIVE)
def test_mixed_label_scores_equal_each_row_alone(arch, dtype):
    """(d) Label scores of rows with their own prompts and label words (several tokens each) in one batch."""
    backbone = half_backbone(arch, dtype, seed=4)
    kinds = mixed_prompts(backbone, dtype)
    labels = [[[10], [11, 12]], [[13, 14, 15], [16]], [[17], [18, 19]]]
    owner = [1, 0, 2, 0, 1]
    inputs = token_lists([3, 5, 1, 2, 4], seed=6)
    scores = label_scores_mixed(backbone, inputs, [labels[k] for k in owner], [kinds[k][0] for k in owner],
                                batch_size=4)  # fmt: skip
    with torch.no_grad():
        for row, k in enumerate(owner):
            expected = torch.stack([-reference_nll(backbone.model, kinds[k][1], [Example(inputs[row], word)])[0]
                                    for word in labels[k]])  # fmt: skip
            assert scores[row].dtype == torch.float32
            assert_within(scores[row], expected, dtype, f"row {row}")


@pytest.mark.parametrize("arch", REPRESENTATIVE)
def test_mixed_generation_is_each_row_alone_up_to_near_ties(arch, dtype):
    """(d) Greedy tokens of a mixed batch (left-padded rows and prompt slots) against the plain model alone."""
    backbone = half_backbone(arch, dtype, seed=2)
    kinds = mixed_prompts(backbone, dtype)
    owner = [0, 1, 2, 1, 0, 2]
    prompts = token_lists([3, 1, 6, 4, 5, 2], seed=5)
    mixed = generate_mixed(backbone, prompts, [kinds[k][0] for k in owner], max_new_tokens=8)
    with torch.no_grad():
        for ids, tokens, k in zip(prompts, mixed, owner):
            assert_greedy_up_to_ties(backbone.model, kinds[k][1], ids, tokens, 8, dtype)
    assert sum(map(len, mixed)) >= 12, "the random model ended too early to compare anything"


@pytest.mark.parametrize("arch", WINDOWED)
def test_generation_across_a_sliding_window_is_each_row_alone_up_to_near_ties(arch, dtype):
    """(d) Prompts of more slots than the window (5 > 4), a prompt-tuning one and a prefix, rows of different
    lengths in one call (`generate` decodes them one by one): the plain model reading [P; E] or the prefix as its
    cache, the whole sequence at once."""
    backbone = half_backbone(arch, dtype, seed=2)
    soft, prefix = random_prompt(backbone, "prompt", n=5, seed=3), random_prompt(backbone, "prefix", n=5, seed=4)
    prompts, total = token_lists([2, 6, 4], seed=8), 0
    with torch.no_grad():
        for ours, theirs in ((soft.kv(backbone), soft.embeddings.to(dtype)),
                             (prefix.kv(backbone), prefix.prefix.to(dtype))):  # fmt: skip
            for ids, tokens in zip(prompts, generate(backbone, prompts, ours, max_new_tokens=8)):
                assert_greedy_up_to_ties(backbone.model, theirs, ids, tokens, 8, dtype)
                total += len(tokens)
    assert total >= 12, "the random model ended too early to compare anything"


# ---------------------------------------------------------------------------------------------------- (e) serving
def run_engine(engine: LocalEngine, rows: list[Sequence], later: list[Sequence] = ()) -> None:
    """Step the engine (not started: this thread) until every row finished; `later` joins after two steps."""
    engine.submit(rows)
    engine.step()
    engine.step()
    if later:
        engine.submit(list(later))
    for _ in range(200):
        if not engine.running and not engine.queue_depth:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("arch", ("llama", "gpt2", "qwen3"))
def test_served_answers_equal_generate_over_the_same_batch(arch, dtype):
    """(e) The local engine with a half-precision backbone, all rows submitted together: token for token what
    `generate` gives for the same rows in one batch (the same batch shape at every step, so the same rounding), and
    greedy up to near-ties against the plain model alone."""
    backbone = half_backbone(arch, dtype, seed=1)
    kinds = mixed_prompts(backbone, dtype)
    owner = [0, 1, 2, 1, 0]
    prompts = token_lists([3, 1, 6, 4, 2], seed=8)
    finals: dict[int, list[int]] = {}
    rows = [Sequence(ids, kinds[k][0], Sampling(max_tokens=8), lambda u, i=i: finals.__setitem__(i, u.tokens))
            for i, (ids, k) in enumerate(zip(prompts, owner))]  # fmt: skip
    run_engine(LocalEngine(backbone, EngineConfig(max_batch=8)), rows)
    served = [finals[i] for i in range(len(rows))]
    assert served == generate_mixed(backbone, prompts, [kinds[k][0] for k in owner], max_new_tokens=8)
    with torch.no_grad():
        for ids, tokens, k in zip(prompts, served, owner):
            assert_greedy_up_to_ties(backbone.model, kinds[k][1], ids, tokens, 8, dtype)
    assert sum(map(len, served)) >= 10, "the random model ended too early to compare anything"


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_served_rows_joining_mid_generation_are_greedy_up_to_near_ties(arch, dtype):
    """(e) Rows that join a running batch as others leave (batch shapes no single `generate` call has): every row
    greedy up to near-ties against the plain model alone. Against `generate` alone such rows differ now and then
    (here 4 rows in 300 over 5 architectures, both dtypes), each time at a near-tie: the two tokens' logits equal
    (bfloat16) or one ulp apart (float16) in the plain model's own half-precision pass, and less than a bfloat16
    ulp apart in float32. Another batch shape rounds the attention's sums differently and the tie breaks the other
    way; the rule is the same."""
    backbone = half_backbone(arch, dtype, seed=3)
    kinds = mixed_prompts(backbone, dtype)
    requests = [(ids, i % 3, 3 + i % 6) for i, ids in enumerate(token_lists([1 + i % 7 for i in range(10)], seed=9))]
    finals: dict[int, list[int]] = {}
    rows = [Sequence(ids, kinds[k][0], Sampling(max_tokens=m), lambda u, i=i: finals.__setitem__(i, u.tokens))
            for i, (ids, k, m) in enumerate(requests)]  # fmt: skip
    engine = LocalEngine(backbone, EngineConfig(max_batch=4))
    run_engine(engine, rows[:3], rows[3:])
    assert engine.stats.rows_joined_running > 0
    with torch.no_grad():
        for i, (ids, k, m) in enumerate(requests):
            assert_greedy_up_to_ties(backbone.model, kinds[k][1], ids, finals[i], m, dtype)


# ---------------------------------------------------------------------------------------------------- (f) resume
class Stop(Exception):
    """Ends a run mid-step, as a kill would: nothing of the step is written."""


def stopping_after(calls: int):
    """`loss_on` that raises on its call number `calls + 1` (a step's forward, after `calls` steps)."""
    count = [0]

    def objective(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Stop
        return loss_on(*args, **kwargs)

    return objective


def float32_state(checkpoint: dict) -> list[torch.Tensor]:
    """What a checkpoint keeps of the trainable side: the prompt's tensors and the optimizer's moment tensors."""
    moments = [v for state in checkpoint["optimizer"]["state"].values() for v in state.values() if v.dim()]
    assert moments, "no optimizer moments in the checkpoint"
    return [*checkpoint["prompts"].values(), *moments]


@pytest.mark.parametrize("method, mlp", [("prompt", False), ("prefix", True)], ids=["prompt", "prefix-mlp"])
def test_a_bfloat16_run_stopped_and_resumed_equals_a_straight_run(tmp_path, method, mlp):
    """(f) Two runs of `train` on a bfloat16 model: a straight one, and one stopped in its 8th step (after the
    checkpoint of step 5) then resumed from that checkpoint: identical prompt tensors, artifact and optimizer state.
    (g) Beside the bfloat16 model, the prompt, its MLP and the optimizer's moments are float32, the artifact is
    float32, and the model's weights are untouched."""
    task = sentiment_task(half_backbone("llama", torch.bfloat16))
    data = task.encode(sentiment_records(32, seed=1), "train"), task.encode(sentiment_records(8, seed=2), "valid")
    config = prompt_config(method, "random", prefix_mlp=mlp)
    cfg = train_config(steps=12, eval_every=5, checkpoint_every=5)

    def run(out, **options):
        backbone = half_backbone("llama", torch.bfloat16)  # a fresh model each time, as a new process would load
        weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        result = train(backbone, task, config, cfg, data[0], tmp_path / out, data[1], progress=False, **options)
        assert backbone.dtype == torch.bfloat16
        assert all(torch.equal(v, weights[k]) for k, v in backbone.model.state_dict().items())
        return result

    straight = run("straight")
    with pytest.raises(Stop):
        run("stopped", objective=stopping_after(7))
    assert latest_checkpoint(tmp_path / "stopped").name == "step-0000005.pt"
    run("stopped", resume=True)
    a, b = (load_file(tmp_path / out / "prompt.safetensors") for out in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.float32}
    a, b = (torch.load(latest_checkpoint(tmp_path / out), weights_only=False) for out in ("straight", "stopped"))
    assert a["step"] == b["step"] == 12 and a["finished"] and b["finished"]
    assert all(torch.equal(x, y) for x, y in zip(float32_state(a), float32_state(b), strict=True))
    assert {v.dtype for v in float32_state(a)} == {torch.float32}
    assert {p.dtype for p in straight.method.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------------- (g) policy
@pytest.mark.parametrize("method, extra", [("prompt", {}), ("prompt", {"residual": True}), ("prefix", {}),
                                           ("prefix", {"prefix_mlp": True})],
                         ids=["prompt", "prompt-residual", "prefix", "prefix-mlp"])  # fmt: skip
def test_trainable_parameters_and_their_gradients_are_float32_beside_a_half_model(dtype, method, extra):
    """(g) Built on a half-precision model (from its own embeddings or activations: init="vocab"), every trainable
    parameter (soft tokens, prefix, MLP) is float32, what it hands the model is in the model's dtype, and the
    gradients that reach it are float32 (the optimizer's state follows its parameters: see the resume test)."""
    backbone = half_backbone("llama", dtype)
    config = PromptConfig(method=method, num_tokens=3, init="vocab", mlp_hidden=16, **extra)
    prompt = methods.build(config, backbone, ["negative", "positive"], torch.Generator().manual_seed(0))
    assert {p.dtype for p in prompt.parameters()} == {torch.float32}
    assert prompt.training_input(backbone).dtype == prompt.kv(backbone).dtype == dtype
    loss, _ = loss_on(backbone, prompt.training_input(backbone), examples())
    loss.backward()
    assert loss.dtype == torch.float32
    assert {p.grad.dtype for p in prompt.parameters()} == {torch.float32}
    assert any(p.grad.abs().sum() > 0 for p in prompt.parameters())  # (a residual MLP starts at zero output)
    assert {v.dtype for v in prompt.artifact_tensors().values()} == {torch.float32}


def head_outputs(backbone: Backbone) -> list[torch.Tensor]:
    """Spy on the LM head: its outputs, in the model's dtype, as the model computes them."""
    seen = []
    backbone.head.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    return seen


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_losses_and_label_scores_are_float32_log_softmaxes_of_the_half_logits(arch, dtype):
    """(g) What the LM head gives (half precision) is up-cast before log-softmax: the loss and label scores equal a
    float32 log-softmax over the head's own output up-cast, to float32 rounding (one taken in half precision is off
    by ~1e-2 in bfloat16 and ~1e-3 in float16, even when its result is up-cast)."""
    backbone = half_backbone(arch, dtype)
    prompt = random_prompt(backbone, "prompt", n=3)
    seen = head_outputs(backbone)
    rows = examples()
    with torch.no_grad():
        loss, _ = loss_on(backbone, prompt.training_input(backbone), rows)
        assert seen[-1].dtype == dtype and loss.dtype == torch.float32
        targets = torch.tensor([t for row in rows for t in row.target_ids])
        torch.testing.assert_close(loss, F.cross_entropy(seen[-1].float(), targets), rtol=1e-6, atol=1e-6)

        inputs, words = [row.input_ids for row in rows], [[10], [11]]
        scores = label_logprobs(backbone, inputs, words, prompt.kv(backbone))
        assert scores.dtype == torch.float32 and seen[-1].dtype == dtype
        torch.testing.assert_close(scores, seen[-1].float().log_softmax(-1)[:, [10, 11]], rtol=1e-6, atol=1e-6)

        summed = target_logprobs(backbone, rows, prompt.kv(backbone))
        assert summed.dtype == torch.float32
        logprobs = seen[-1].float().log_softmax(-1)[torch.arange(len(targets)), targets]
        expected = torch.stack([part.sum() for part in logprobs.split([len(row.target_ids) for row in rows])])
        torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- (h) T5
@pytest.mark.parametrize("variant", ["t5", "t5-v1.1"])
def test_t5_prompt_and_prefix_tuning_equal_their_references(variant, dtype):
    """(h) Prompt tuning: logits, loss and dL/dP against transformers' T5 reading inputs_embeds = [P; E] in the same
    dtype; prefix tuning: logits against the T5 written out in test_backbones_seq2seq.py with the key/values
    prepended by hand (its softmax in the model's dtype, transformers' in float32). Both within `T5_ULPS`."""
    backbone = backbone_for(tiny_t5(variant).to(dtype), tiny_tokenizer())
    soft = random_prompt(backbone, "prompt", n=3, seed=1)
    loss, _ = loss_on(backbone, soft.training_input(backbone), EXAMPLES)
    (ours,) = torch.autograd.grad(loss, soft.embeddings)
    total, count = 0.0, 0
    for e in EXAMPLES:
        logprobs = hf_logits(backbone.model, e.input_ids, teacher_forced(e), soft.embeddings).float().log_softmax(-1)
        total = total - logprobs[torch.arange(len(e.target_ids)), torch.tensor(e.target_ids)].sum()
        count += len(e.target_ids)
    (expected,) = torch.autograd.grad(total / count, soft.embeddings)
    assert_within(loss, total / count, dtype, "loss", T5_ULPS)
    assert_within(ours / expected.abs().max(), expected / expected.abs().max(), dtype, "dL/dP (over its max)", T5_ULPS)
    prefix = random_prefix(3, seed=2).to(dtype)
    with torch.no_grad():
        for e in EXAMPLES:
            want = hf_logits(backbone.model, e.input_ids, teacher_forced(e), soft.embeddings).float()
            assert_within(target_logits(backbone, e, soft.kv(backbone)), want, dtype, "prompt tuning logits", T5_ULPS)
            got = target_logits(backbone, e, prefix)
            want = reference_logits(backbone.model, e.input_ids, teacher_forced(e), prefix).float()
            assert_within(got, want, dtype, "prefix tuning logits", T5_ULPS)


def target_logits(backbone: Backbone, example: Example, prefix: torch.Tensor) -> torch.Tensor:
    """Our logits at each of the example's target positions after `prefix`, (len(target), vocab)."""
    batch = collate([example], backbone.pad_id)
    return backbone.logits(backbone.target_hidden(batch, prefix))
