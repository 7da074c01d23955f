"""Serving many prompts on one frozen model: a registry of loaded prompts (each one's input computed once), an engine
(ours, continuous batching, or a running vLLM), and an OpenAI-compatible HTTP app. `serve(ServeConfig(...))` runs it
all (the `softprompt serve` command)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import SoftPromptError
from ..models import DEFAULT_MODEL, LoadConfig


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
    `Authorization: Bearer <key>`. A command line shows in `ps`: prefer --api-key-file or the environment variable
    SOFTPROMPT_API_KEY (read when neither option is given)."""
    max_batch: int = 64
    """Rows decoded together."""
    max_queue: int = 256
    """Rows that may wait; more are refused with 429 (retry later)."""
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
    api_key_file: Path | None = None
    """A file that holds the API key (read once, at start; surrounding whitespace dropped): the key out of the
    command line."""
    vllm_api_key: str | None = None
    """The key this server sends to vLLM with --vllm-url (vLLM's own --api-key or VLLM_API_KEY); read from
    SOFTPROMPT_VLLM_API_KEY when not given."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes; a larger one is refused with 413 before it is read (chunked ones too)."""
    max_prompts: int = 64
    """Most prompts in one /v1/completions request (400 beyond)."""
    max_prompt_chars: int = 65536
    """Longest prompt text, or all of a chat's messages together, in characters: refused (400) before tokenizing."""
    max_stops: int = 4
    """Most stop strings per request (400 beyond)."""
    max_stop_chars: int = 256
    """Longest stop string in characters (400 beyond): a stream holds back that much text until it is sure."""
    max_rows: int = 256
    """Most rows one request may need (prompts x n; a classification prompt: its prompts); 400 beyond. Never more
    than max_queue (with --vllm-url, max_batch + max_queue): a larger request could never be queued."""
    request_timeout: float = 600.0
    """Seconds a request may take (its wait for the model and its answer); past them a whole answer is a 504 and a
    stream ends with an error event."""
    load: LoadConfig = field(default_factory=LoadConfig)
    """How the model is loaded here (dtype, device, device map, quantization); in front of vLLM only its input
    embeddings load here, and vLLM's own --dtype decides how it runs the model."""

    def __post_init__(self) -> None:
        problems = self._read_keys()
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "max_n", "max_body_bytes",
                     "max_prompts", "max_prompt_chars", "max_stops", "max_stop_chars", "max_rows"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.request_timeout > 0:
            problems.append(f"request_timeout must be positive, got {self.request_timeout}")
        if not 0 <= self.port < 65536:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if self.prompts is not None and not Path(self.prompts).is_dir():
            problems.append(f"--prompts {self.prompts} is not a directory (give a folder of prompt artifacts)")
        if self.vllm_url is not None and not self.vllm_url.startswith(("http://", "https://")):
            problems.append(f"--vllm-url must be an http(s) URL such as http://127.0.0.1:8000, got {self.vllm_url!r}")
        if self.vllm_timeout <= 0:
            problems.append(f"vllm_timeout must be positive, got {self.vllm_timeout}")
        if problems:
            raise SoftPromptError("Invalid serve settings:\n  - " + "\n  - ".join(problems))

    def _read_keys(self) -> list[str]:
        """The API key from --api-key, --api-key-file or SOFTPROMPT_API_KEY (in that order; the file read now), and
        vLLM's from --vllm-api-key or SOFTPROMPT_VLLM_API_KEY; what is wrong with them."""
        problems = []
        if self.api_key is not None and self.api_key_file is not None:
            problems.append("give the API key by --api-key or by --api-key-file, not both")
        elif self.api_key_file is not None:
            try:
                self.api_key = Path(self.api_key_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                problems.append(f"--api-key-file {self.api_key_file} cannot be read ({type(error).__name__}: "
                                f"{error.strerror if isinstance(error, OSError) else error})")  # fmt: skip
            else:
                if not self.api_key:
                    problems.append(f"--api-key-file {self.api_key_file} is empty: write the key into it")
        elif self.api_key is None and "SOFTPROMPT_API_KEY" in os.environ:
            self.api_key = os.environ["SOFTPROMPT_API_KEY"]
            if not self.api_key.strip():
                problems.append("SOFTPROMPT_API_KEY is set but empty: give it a key or unset it")
        elif self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty: give a key or leave the option out")
        if self.vllm_api_key is None:
            self.vllm_api_key = os.environ.get("SOFTPROMPT_VLLM_API_KEY") or None
        elif not self.vllm_api_key.strip():
            problems.append("vllm_api_key is empty: give vLLM's key or leave the option out")
        elif not self.vllm_url:
            problems.append("--vllm-api-key is the key for --vllm-url's vLLM: give --vllm-url too, or leave it out")
        return problems


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
        engine = VllmEngine(model, config.vllm_url, engine_config, config.vllm_timeout, config.vllm_api_key)
    else:
        from .engines.local import LocalEngine
        from .served import LocalModel

        backbone = backbone_for(*load_model(config.model, config.load))
        backbone.check_joinable()  # before loading any prompt: an unservable model fails fast
        model, engine = LocalModel(backbone), LocalEngine(backbone, engine_config)
    registry = Registry(model, config.model, config.prompts)
    registry.reload(strict=True)  # a broken artifact at startup is an error, not a silent gap
    engine.start()
    limits = Limits(context=model.context, **{f.name: getattr(config, f.name) for f in fields(Limits)
                                               if f.name != "context"})  # ServeConfig's fields of the same names
    return create_app(registry, engine, limits, config.api_key, config.host), engine, registry


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
