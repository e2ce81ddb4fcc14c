"""The process's own memory high-water mark, as the launchers, the profiler and the benchmarks report it."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB, counted from its last exec.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over a fork and an exec, so a process started by a
    large one (a launcher run by pytest: 1.1 GB where the run itself peaked at 438 MB) reports its parent's
    size. ``VmHWM`` belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:  # no procfs (macOS): ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    raise RuntimeError("/proc/self/status has no VmHWM line")
