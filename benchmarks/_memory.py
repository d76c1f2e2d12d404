"""Resident memory of the running benchmark process, read from Linux's /proc."""

from __future__ import annotations


def rss_gib() -> tuple[float, float]:
    """Current and peak resident memory of this process, GiB (``nan`` where /proc lacks them)."""
    values = {"VmRSS:": float("nan"), "VmHWM:": float("nan")}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(tuple(values)):
                key, amount, _ = line.split()
                values[key] = int(amount) / 2**20
    return values["VmRSS:"], values["VmHWM:"]


def peak_rss_gib() -> float:
    """Peak resident memory of this process, GiB."""
    return rss_gib()[1]
