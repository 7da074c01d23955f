"""`python -m softprompt`, e.g. under `accelerate launch -m softprompt train ...`."""

from .cli import main

main()
