"""The facts every benchmark report states (machine, date, versions, command) and the process it measures in."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
import warnings

import torch


def machine() -> str:
    """Cores, CPU model, torch threads and the load average (called at the end of a run: the load it ran under)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    load = ", load average %.1f %.1f %.1f at the end" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gpu = f"; GPU: {', '.join(gpus)} (CUDA {torch.version.cuda})" if gpus else ""
    return f"{os.cpu_count()} cores ({cpu}), torch threads {torch.get_num_threads()}{load}{gpu}"


def now() -> str:
    return f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"


def command() -> str:
    """The command line as typed, for the report (so a reader can rerun it)."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def versions() -> dict[str, str]:
    """The libraries whose speed is compared: ours runs on torch and transformers, the peer is PEFT."""
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def print_facts(machine_note: str = "") -> None:
    """The date, machine, versions and command lines that head a report's table."""
    print(f"date     : {now()}")
    print(f"machine  : {machine()}{machine_note}")
    print(f"versions : {', '.join(f'{name} {version}' for name, version in versions().items())}")
    print(f"command  : {command()}")


def quiet_process(threads: int) -> None:
    """torch on `threads` threads, and no warnings or progress bars: PEFT's and transformers' deprecation notes would
    repeat at every run, and tokenizers' thread pool warns when the process forks (starting vLLM does)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)


def log(message: str) -> None:
    """A progress line, on stderr: stdout keeps the report."""
    print(message, file=sys.stderr, flush=True)
