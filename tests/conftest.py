"""Shared test fixtures: tiny random models of several architectures, built from configs in code (no network),
a tiny offline word-level tokenizer, and the embedded real model for the few tests marked `real_model`."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PhiConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
    StableLmConfig,
    Starcoder2Config,
)

from softprompt.backbones import Backbone, backbone_for
from skip_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks: undocumented skips fail)

pytest_plugins = ["pytester"]  # tests/test_skip_policy.py runs small suites of its own

os.environ["SOFTPROMPT_REPORT_TO"] = "none"
"""What report_to="auto" (the default) means in the tests, and in the commands they start: no tracker, so a run
writes only its own files; test_trackers.py asks for TensorBoard where it tests it (and checks "auto" itself)."""

os.environ["SOFTPROMPT_DTYPE"] = "float32"
"""What dtype="auto" means in the tests and the commands they start: float32 on every CPU, as the independent
computations they compare against (bfloat16 where a CPU multiplies it is what users get: test_loading.py checks that
choice, test_half_precision.py the equivalences in bfloat16)."""

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
"""Architectures every tiny-model test runs on."""

MORE_ARCHS = ("gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo2", "granite", "smollm3", "starcoder2", "stablelm",
              "cohere", "gpt_neox", "falcon", "qwen3_moe")  # fmt: skip
"""Further architectures (HF model_type names), checked in test_backbones_architectures.py; Gemma 2 needs attn="eager"."""

VOCAB_SIZE = 128
PAD, EOS, UNK = 0, 1, 2
SPECIALS = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
WORDS = (
    "the a an movie film book song was is were it this that very not quite really great good fine bad terrible "
    "awful boring fun positive negative neutral yes no true false question answer review label sentiment text "
    "hello world cat dog red blue green one two three four five and or but of in on to with"
).split()
"""Words tests may use; the rest of the vocabulary is filler `w<id>` so the tokenizer spans the model's ids."""
VOCAB = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(WORDS)}}
VOCAB.update({f"w{i}": i for i in range(len(VOCAB), VOCAB_SIZE)})
assert len(VOCAB) == VOCAB_SIZE and sorted(VOCAB.values()) == list(range(VOCAB_SIZE))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over VOCAB; whitespace splitting, so `" positive"` and `"positive"` both give one token."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(arch: str):
    """A 2-layer, 32-wide, 4-head config; 2 KV heads where the architecture has GQA; Qwen3 with head_dim 16 != 32/4."""
    common = dict(vocab_size=VOCAB_SIZE, eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD, initializer_range=0.1)
    llama_like = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=128, **common,
    )  # fmt: skip
    builders = {
        "llama": lambda: LlamaConfig(**llama_like),
        "qwen2": lambda: Qwen2Config(**llama_like),
        "qwen3": lambda: Qwen3Config(head_dim=16, **llama_like),
        "mistral": lambda: MistralConfig(sliding_window=None, **llama_like),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
        # MORE_ARCHS. How logits are taken is set away from the defaults (a missing transform must show): Cohere's
        # logit_scale, Granite's logits_scaling, and a softcap small enough to bend these models' logits (|x| ~ 2).
        "gemma": lambda: GemmaConfig(head_dim=8, **llama_like),
        "gemma2": lambda: Gemma2Config(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=1.0, **llama_like),
        "gemma3_text": lambda: Gemma3TextConfig(head_dim=16, final_logit_softcapping=1.0, **llama_like),
        "phi": lambda: PhiConfig(qk_layernorm=True, **llama_like),  # partial rotary (half of each head)
        "phi3": lambda: Phi3Config(**llama_like),
        "olmo2": lambda: Olmo2Config(**llama_like),
        "granite": lambda: GraniteConfig(logits_scaling=4.0, embedding_multiplier=4.0, attention_multiplier=0.125,
                                         residual_multiplier=0.5, **llama_like),  # fmt: skip
        "smollm3": lambda: SmolLM3Config(no_rope_layers=[1, 0], **llama_like),  # layer 1 without rotary positions
        "starcoder2": lambda: Starcoder2Config(**llama_like),
        "stablelm": lambda: StableLmConfig(qk_layernorm=True, **llama_like),
        "cohere": lambda: CohereConfig(logit_scale=0.25, use_qk_norm=True, **llama_like),
        "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=128, **common),  # fmt: skip
        # Falcon-40B's layout: 2 KV heads in the weights, all 4 in the cache
        "falcon": lambda: FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
            max_position_embeddings=128, **common,
        ),  # fmt: skip
        "qwen3_moe": lambda: Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                            **llama_like),  # fmt: skip
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {', '.join(ARCHS)}")
    return builders[arch]()


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """A seeded random float32 causal LM in eval mode (not frozen: Backbone does that)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def tiny_backbone(arch: str, seed: int = 0, attn: str = "sdpa") -> Backbone:
    """A fresh tiny model of `arch` with the tiny tokenizer, wrapped (and frozen) as a Backbone."""
    return backbone_for(tiny_model(arch, seed, attn), tiny_tokenizer())


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny matmuls are dominated by thread synchronization (milliseconds per 32x32 linear on a busy machine, against
    microseconds on one thread); real-model tests keep every thread."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture
def tiny(arch, tokenizer) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer) for the parametrized `arch`: a fresh model per test."""
    return tiny_model(arch), tokenizer


@pytest.fixture
def backbone(tiny) -> Backbone:
    """Backbone over the `tiny` model (the same model object, now frozen)."""
    model, tok = tiny
    return backbone_for(model, tok)


@pytest.fixture
def make_backbone():
    """Factory `make_backbone(arch, seed=0, attn="sdpa") -> Backbone` for tests that need several or other archs."""
    return tiny_backbone


SKIP_REAL_MODEL = "SOFTPROMPT_SKIP_REAL_MODEL"
"""Set to 1 to skip the tests marked `real_model` on a machine without the embedded model (CI never sets it): any
other failure to load the model fails those tests."""


@pytest.fixture(scope="session")
def real_backbone() -> Backbone:
    """The embedded default model (SmolLM2-135M) as a Backbone, converted on first use; for tests marked
    `real_model`."""
    import os

    from softprompt.models import load_model

    if os.environ.get(SKIP_REAL_MODEL) == "1":
        pytest.skip(f"reason: {SKIP_REAL_MODEL}=1 (the embedded model is not installed here)")
    return backbone_for(*load_model("smollm2-135m"))


def free_port() -> int:
    """A loopback port nothing listens on now (for a server a test starts, or a backend that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(monkeypatch, capsys, args) -> tuple[int, str, str]:
    """`softprompt ARGS` in this process (the same code path as the command): exit code, stdout, stderr."""
    from softprompt.cli import main

    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["softprompt", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def random_prompt(backbone: Backbone, method: str = "prompt", n: int = 4, seed: int = 1, **config):
    """A prompt of `n` virtual tokens with seeded random values (init="random" unless `config` says otherwise)."""
    from softprompt import methods
    from softprompt.config import PromptConfig

    config = PromptConfig(method=method, num_tokens=n, **{"init": "random", **config})
    return methods.build(config, backbone, generator=torch.Generator().manual_seed(seed))
