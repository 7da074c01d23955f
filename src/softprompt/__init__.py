"""softprompt: adapt a frozen causal language model by learning continuous prompts, never its weights."""

__version__ = "0.1.0"
__all__ = ["PromptTuner", "__version__"]


def __getattr__(name: str):
    # `from softprompt import PromptTuner` without making every `import softprompt` load torch and transformers.
    if name == "PromptTuner":
        from .tuner import PromptTuner

        return PromptTuner
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
