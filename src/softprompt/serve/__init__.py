"""Serving many prompts on one frozen model: a registry of loaded prompts (each one's input computed once), an engine
(ours, continuous batching, or a running vLLM), and an OpenAI-compatible HTTP app. `serve(ServeConfig(...))` runs it
all (the `softprompt serve` command)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import SoftPromptError
from ..models import DEFAULT_MODEL


@dataclass
class ServeConfig:
    """What `softprompt serve` runs."""

    model: str = DEFAULT_MODEL
    """Base model: the embedded short name, a local folder or a hub name."""
    prompts: Path | None = None
    """Folder whose subfolders are prompt artifacts; each subfolder's name is its model id."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """When set, every endpoint but /health and the playground page's files (/, /ui, /static/) needs
    `Authorization: Bearer <key>`."""
    max_batch: int = 64
    """Rows decoded together."""
    max_queue: int = 256
    """Rows that may wait; more are refused with 429."""
    max_prompt_tokens: int = 2048
    """Longest prompt, in tokens; longer ones are refused with 400."""
    max_tokens: int = 512
    """Most new tokens per choice."""
    max_n: int = 16
    """Most choices per prompt."""
    log_level: str = "info"
    vllm_url: str | None = None
    """Front a running `vllm serve --enable-prompt-embeds` of the same base model instead of running it here."""
    vllm_timeout: float = 60.0
    """Seconds to wait for vLLM's next bytes before answering 504."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "max_n"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if self.prompts is not None and not Path(self.prompts).is_dir():
            problems.append(f"--prompts {self.prompts} is not a directory (give a folder of prompt artifacts)")
        if self.vllm_url is not None and not self.vllm_url.startswith(("http://", "https://")):
            problems.append(f"--vllm-url must be an http(s) URL such as http://127.0.0.1:8000, got {self.vllm_url!r}")
        if self.vllm_timeout <= 0:
            problems.append(f"vllm_timeout must be positive, got {self.vllm_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty: give a key or leave the option out")
        if problems:
            raise SoftPromptError("Invalid serve settings:\n  - " + "\n  - ".join(problems))


def build(config: ServeConfig):
    """(app, engine, registry) for `config`: the model loaded, every prompt's input computed, the engine started."""
    from ..backbones import backbone_for
    from ..models import load_model
    from .app import create_app
    from .engines.base import EngineConfig
    from .jobs import Limits
    from .registry import Registry

    engine_config = EngineConfig(max_batch=config.max_batch, max_queue=config.max_queue)
    if config.vllm_url:  # a front: the tokenizer and the input embeddings only; vLLM runs the model
        from .engines.vllm import VllmEngine
        from .vllm_embeds import InputEmbeddings

        model = InputEmbeddings.load(config.model)
        engine = VllmEngine(model, config.vllm_url, engine_config, config.vllm_timeout)
    else:
        from .engines.local import LocalEngine
        from .served import LocalModel

        backbone = backbone_for(*load_model(config.model))
        backbone.check_joinable()  # before loading any prompt: an unservable model fails fast
        model, engine = LocalModel(backbone), LocalEngine(backbone, engine_config)
    registry = Registry(model, config.model, config.prompts)
    registry.reload(strict=True)  # a broken artifact at startup is an error, not a silent gap
    engine.start()
    limits = Limits(config.max_prompt_tokens, config.max_tokens, config.max_n, model.context)
    return create_app(registry, engine, limits, config.api_key), engine, registry


def serve(config: ServeConfig) -> None:
    """Load everything, then answer HTTP until interrupted."""
    import uvicorn

    app, engine, registry = build(config)
    names = sorted(p for p in registry.prompts if p != registry.base.name)
    print(f"softprompt: serving {registry.base.name} and {len(names)} prompt(s) {', '.join(names[:10])}"
          f"{' ...' if len(names) > 10 else ''} on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    except KeyboardInterrupt:  # older uvicorn re-raises Ctrl-C after its graceful shutdown: still a clean stop
        pass
    finally:
        engine.stop()


__all__ = ["ServeConfig", "build", "serve"]
