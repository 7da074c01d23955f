"""softprompt: adapt a frozen causal language model by learning continuous prompts, never its weights."""

import logging

__version__ = "0.1.0"
__all__ = ["PromptTuner", "__version__"]

# bitsandbytes (the optional `quantize` extra, which transformers imports whenever it is installed) logs on import, on
# CPUs with AVX-512 BF16, that the optional `kernels` package is missing: that concerns 4-bit bases on a CPU only,
# and would otherwise open the output of every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit" not in str(record.msg))


def __getattr__(name: str):
    # `from softprompt import PromptTuner` without making every `import softprompt` load torch and transformers.
    if name == "PromptTuner":
        from .tuner import PromptTuner

        return PromptTuner
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
