"""Engines: what runs the rows a server accepts. `base.Engine` is the contract the HTTP side relies on; `local` runs
the model in this process (continuous batching), `vllm` forwards to a running `vllm serve --enable-prompt-embeds`."""
