"""The quiet-machine check of the benches: how many cores other processes use, from /proc/stat less this
process's own CPU time, and a bounded wait for a quiet machine."""

import os
import resource
import time


def busy_seconds() -> float | None:
    """CPU seconds all processors spent busy since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu(children: bool) -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def mark(children: bool = False) -> tuple:
    """The start of an interval for `others_since` (`children`: this process's work runs in child processes)."""
    return busy_seconds(), own_cpu(children), time.time(), children


def others_since(start: tuple) -> float | None:
    """Cores other processes used on average since `mark()`: all busy CPU time less this process's own (or its
    children's); None without /proc/stat."""
    busy0, own0, t0, children = start
    if busy0 is None:
        return None
    return max(0.0, (busy_seconds() - busy0) - (own_cpu(children) - own0)) / (time.time() - t0)


def others_now(seconds: float = 2.0) -> float | None:
    """Cores other processes use right now (this process idles meanwhile); None without /proc/stat."""
    start = mark()
    if start[0] is None:
        return None
    time.sleep(seconds)
    return others_since(start)


def wait_quiet(busy_cores: float, max_wait: float) -> float:
    """Wait (at most max_wait s) until other processes use at most busy_cores (the load average where /proc/stat is
    missing, below 1 + busy_cores); returns the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < max_wait:
        others = others_now()
        if (others if others is not None else os.getloadavg()[0] - 1) <= busy_cores:
            break
        time.sleep(min(8.0, max(0.0, max_wait - (time.time() - t0))))
    return time.time() - t0
