"""What every benchmark prints with its figures: the CPU model and the flags int8 speed
depends on (VNNI, AMX, BF16), and the peak resident memory of the process."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def cpu_description() -> str:
    """CPU model and the flags int8/bf16 speed depends on (Linux /proc/cpuinfo)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    have = [f for f in wanted if f in flags] or ["none of avx512/vnni/amx"]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have)}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
