"""What a benchmark figure needs beside it: the machine it ran on, and how busy that machine was meanwhile."""
from __future__ import annotations

import os
import platform
import resource
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat, idle and iowait left out)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """Cores this process kept busy during a stretch of time, and cores others did (PostgreSQL counts as other):
    on a shared 2-core machine a busy neighbour halves every figure, so each figure carries its own."""

    def __init__(self):
        self.wall, self.own, self.machine = time.perf_counter(), cpu_seconds(), machine_busy_seconds()

    def cores(self) -> dict:
        wall = time.perf_counter() - self.wall
        own = cpu_seconds() - self.own
        others = max(machine_busy_seconds() - self.machine - own, 0.0)
        return {"own_cores": own / wall, "other_cores": others / wall, "own_cpu_seconds": own}
