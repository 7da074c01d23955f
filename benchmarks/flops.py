"""How much useful arithmetic a training step does, and how fast this machine does that arithmetic at best.

Useful FLOPs of one prompt-learning step, counted from the model's own shapes the way model-FLOP utilization counts
them (one multiply-add = 2 FLOPs; elementwise work, norms and softmax not counted):

- linear layers: 2 x in x out per token for every `nn.Linear` in the decoder layers, over every real token of the
  batch, plus the virtual tokens for prompt tuning, once (every row sees the same keys/values of the prompt, however
  often a library computes them: `kv()` runs it once at batch 1, the training step's `training_input()` in front of
  each packed row; in the last layer only its key/value projections are useful, the rest of its output is never
  read);
- attention: 4 x heads x head_dim per (query, key) pair a token is allowed to see (QK^T and the weighted sum of V):
  for a row of L real tokens after n prefix slots, L*n + L(L+1)/2 pairs; for prompt tuning also n(n+1)/2 pairs for
  the prompt itself;
- the LM head: 2 x hidden x vocab at the loss positions only (the positions the loss reads);
- the backward pass to every input that needs a gradient (the weights are frozen, so no weight gradients): once the
  forward's FLOPs for the linear layers and the head (one matmul each: dX = dY W), except the first layer's
  query/key/value projections of real tokens, whose input (the frozen embeddings) needs none; twice the forward's
  for attention (four matmuls for its two; counted in every layer, a slight over-count in the first).

So a step costs about 4 x (non-embedding parameters) FLOPs per token, plus attention and the head. Work a library
does beyond this (pads, virtual tokens run per row, logits at every position) is not useful and not counted: the same
batch has the same useful FLOPs whichever library trains on it.

`matmul_peak` times the very matrix products these linear layers need, with their own weights in their order,
forward (X W^T) and backward (dY W), at the step's token count, on this machine, now: the throughput the layers
would reach with no other cost at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class StepFlops:
    linear: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head


INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
"""The linear layers that read a decoder layer's (normed) input, by their Llama-family names."""
KV_PROJECTIONS = ("k_proj", "v_proj")


def linear_shapes(model, layers: slice = slice(None), names: tuple[str, ...] = ()) -> list[tuple[int, int]]:
    """(in, out) of every linear layer inside the decoder layers `layers` (only those named `names`, if given)."""
    return [(m.in_features, m.out_features) for layer in model.base_model.layers[layers]
            for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
            and (not names or name.rsplit(".", 1)[-1] in names)]  # fmt: skip


def step_flops(model, row_lengths: list[int], loss_positions: int, virtual: int, method: str) -> StepFlops:
    """Useful FLOPs (forward + backward to the inputs) of one step over rows of `row_lengths` real tokens behind a
    prompt of `virtual` slots, the loss read at `loss_positions` positions."""
    config = model.config.get_text_config(decoder=True)
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    forward = lambda shapes: sum(2 * i * o for i, o in shapes)  # noqa: E731  per token
    per_token = forward(linear_shapes(model))  # all layers, forward
    no_gradient = forward(linear_shapes(model, slice(0, 1), INPUT_PROJECTIONS))  # real tokens' first projections
    unread = per_token - forward(linear_shapes(model, slice(None, -1))) - forward(
        linear_shapes(model, slice(-1, None), KV_PROJECTIONS))  # the prompt's last layer beyond its keys/values
    real, prompt = sum(row_lengths), (virtual if method == "prompt" else 0)
    pairs = sum(length * virtual + length * (length + 1) // 2 for length in row_lengths)
    if method == "prompt":
        pairs += virtual * (virtual + 1) // 2
    attention_forward = 4 * heads * head_dim * pairs * layers
    head_forward = 2 * config.hidden_size * config.vocab_size * loss_positions
    linear = (2 * per_token - no_gradient) * real + 2 * (per_token - unread) * prompt
    return StepFlops(linear=linear, attention=3 * attention_forward, head=2 * head_forward)


def matmul_peak(model, tokens: int, repeats: int = 3) -> float:
    """FLOP/s of the decoder's linear layers' matmuls alone at `tokens` rows, with the model's own weights in the
    model's order (so each weight comes from memory as it does in a step, not from a warm cache): every layer
    forward (X W^T), then every layer backward to the input (dY W), best of `repeats` such sweeps."""
    weights = [m.weight.detach() for layer in model.base_model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]  # fmt: skip
    xs = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}  # by width
    dys = {w.shape[0]: torch.randn(tokens, w.shape[0], dtype=w.dtype, device=w.device) for w in weights}  # dY
    wait = torch.cuda.synchronize if weights[0].is_cuda else (lambda: None)  # GPU kernels run asynchronously
    flops = 2 * 2 * tokens * sum(w.numel() for w in weights)

    def sweep() -> None:
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)  # (tokens, out)
        for w in weights:
            dys[w.shape[0]] @ w  # (tokens, in)

    sweep()  # warm-up: first-call allocation and dispatch stay out
    best = float("inf")
    for _ in range(repeats):
        wait()
        began = time.perf_counter()
        sweep()
        wait()
        best = min(best, time.perf_counter() - began)
    return flops / best


def useful_flops(model, batches, method: str, virtual: int) -> float:
    """Useful FLOPs per real input token over `batches` (lists of examples): the same for every library, since it
    counts the work the batch needs, not the work a library does."""
    from softprompt.data import collate

    flops = tokens = 0
    for examples in batches:
        batch = collate(examples, 0)
        flops += step_flops(model, batch.attention_mask.sum(-1).tolist(), len(batch.loss_tokens), virtual, method).total
        tokens += batch.num_input_tokens
    return flops / tokens
