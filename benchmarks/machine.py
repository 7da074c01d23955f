"""The machine line both benchmarks print: cores, CPU model, torch threads and the load at the end."""

from __future__ import annotations

import os
import platform
import re

import torch


def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    load = ", load average %.1f %.1f %.1f at the end" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} cores ({cpu}), torch threads {torch.get_num_threads()}{load}"
