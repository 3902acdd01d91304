"""What the shared host did during a measurement: steal and idle time from /proc/stat.

These machines are shared: another tenant's load shows as steal (the hypervisor ran someone else)
and every wall-clock figure drifts with it. Benchmarks print the window's steal and idle beside
their throughput so figures from different runs can be read against each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _cpu_ticks() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:  # not Linux
        return []
    return [int(v) for v in fields]


@dataclass
class HostWindow:
    """Start with `HostWindow.start()`, read `.stop()` -> {"steal_pct", "idle_pct"} over the window."""

    ticks: list[int]

    @classmethod
    def start(cls) -> "HostWindow":
        return cls(_cpu_ticks())

    def stop(self) -> dict[str, float]:
        now = _cpu_ticks()
        if not now or not self.ticks:
            return {}
        delta = [b - a for a, b in zip(self.ticks, now)]
        total = sum(delta[:8]) or 1  # guest time is already counted in user
        idle = delta[3] + delta[4]  # idle + iowait
        steal = delta[7] if len(delta) > 7 else 0
        return {"steal_pct": round(100 * steal / total, 1), "idle_pct": round(100 * idle / total, 1)}
