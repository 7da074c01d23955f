"""The embedded demos: movie-review sentiment on SmolLM2-135M (the default), and English -> Chinese translation
taught by a prompt and by a prefix on Gemma 3 270M."""

from .sentiment import DEMO_TRAINING, INIT_TEXT, LABELS, TEMPLATE, run_demo
from .translation import run_translation_demo

__all__ = ["DEMO_TRAINING", "INIT_TEXT", "LABELS", "TEMPLATE", "run_demo", "run_translation_demo"]
