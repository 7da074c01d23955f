"""How a causal LM turns final hidden states into logits, and the check that we take them the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import SoftPromptError


@dataclass(frozen=True)
class HeadTransform:
    """What a causal LM's forward does to its LM head's output, in the model's own operations: Cohere multiplies by
    `logit_scale`, Granite divides by `logits_scaling`, Gemma 2 and 3 softcap with `final_logit_softcapping`.
    `check_head` refuses a model whose forward does anything else."""

    scale: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> "HeadTransform":
        config = config.get_text_config(decoder=True)
        names = ("logit_scale", "logits_scaling", "final_logit_softcapping")
        return cls(*(getattr(config, name, None) for name in names))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def check_head(backbone) -> None:
    """Refuse a model whose forward takes its logits otherwise than `backbone.logits` does. The model's own forward runs
    once with its decoder replaced by a module returning probe hidden states, so only what follows the decoder
    (the head and any transform of its output) is compared. Probe rows up to logits far past a softcap make any
    scale, divisor or cap show."""
    scales = torch.tensor([[0.1], [1.0], [10.0], [100.0]])
    probe = torch.randn(4, backbone.shapes.hidden_size, generator=torch.Generator().manual_seed(0)) * scales
    probe = probe[None].to(backbone.device, backbone.dtype)  # (1, 4, hidden)
    name, problem = backbone.model.base_model_prefix, None
    if getattr(backbone.model, name, None) is not backbone.decoder:
        problem = f"its decoder is not its attribute {name!r}, so its forward cannot be checked"
    else:
        setattr(backbone.model, name, _DecoderStandIn(probe))
        try:
            with torch.no_grad():
                ids = torch.zeros(probe.shape[:2], dtype=torch.long, device=backbone.device)
                theirs = backbone.model(input_ids=ids, use_cache=False).logits.float()
        except Exception as error:  # any failure leaves the head unchecked: refused below
            problem = f"its forward failed on a stand-in decoder ({type(error).__name__}: {error})"
        finally:
            setattr(backbone.model, name, backbone.decoder)
    if problem is None:
        with torch.no_grad():
            ours = backbone.logits(probe)
        if ours.shape != theirs.shape:
            problem = f"its forward gives logits of shape {tuple(theirs.shape)}, the LM head {tuple(ours.shape)}"
        elif not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.nan_to_num(0, 0, 0).abs().max().item()):
            problem = f"its logits differ from ours by up to {(ours - theirs).abs().max():.3g} on probe states"
    if problem is not None:
        raise SoftPromptError(
            f"{type(backbone.model).__name__} takes its logits in a way softprompt does not know: {problem}. Known "
            "transforms of the LM head's output: logit_scale (Cohere), logits_scaling (Granite), "
            "final_logit_softcapping (Gemma 2, Gemma 3)"
        )


@dataclass
class _StandInOutput(BaseModelOutputWithPast):
    """What `_DecoderStandIn` returns: fields a causal LM's forward copies from its decoder's output and a stand-in
    does not have (router logits, image states) read as None."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _DecoderStandIn(torch.nn.Module):
    """Takes a decoder's place in its causal LM for `check_head`: returns the given hidden states."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> _StandInOutput:
        return _StandInOutput(last_hidden_state=self.hidden)
