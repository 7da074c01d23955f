"""softprompt: adapt a frozen causal language model by learning continuous prompts, never its weights."""

__version__ = "0.1.0"
