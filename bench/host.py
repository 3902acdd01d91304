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


class CpuMeter:
    """CPU seconds (user + system) that this process and all of its descendants (Ray's raylet and
    workers under an embedded `ray.init`, loader processes) consumed over a window. A background
    thread samples every descendant's `psutil` cpu_times every `interval` s. A direct child that
    has exited and been waited for is counted through this process's children times (exact); a
    deeper descendant that exits before the window ends (a Ray worker, a loader) counts with its
    last sample, so at most `interval` of its time is missed. `CpuMeter.start()` ... `.stop()` ->
    CPU seconds."""

    def __init__(self, interval: float = 0.5):
        import threading

        import psutil

        self.root, self.interval = psutil.Process(), interval
        self.first: dict[tuple[int, float], tuple[float, int]] = {}
        self.last: dict[tuple[int, float], tuple[float, int]] = {}
        self.root_first = self.root_seconds()
        self.done = threading.Event()
        self.sample(self.first)
        self.thread = threading.Thread(target=self.run, daemon=True)

    @classmethod
    def start(cls, interval: float = 0.5) -> "CpuMeter":
        meter = cls(interval)
        meter.thread.start()
        return meter

    def root_seconds(self) -> float:
        times = self.root.cpu_times()  # children_*: the direct children that have exited and been waited for
        return times.user + times.system + times.children_user + times.children_system

    def sample(self, into: dict) -> set:
        """Records every live descendant's CPU seconds and parent; returns the keys seen now."""
        import psutil

        seen = set()
        try:
            processes = self.root.children(recursive=True)
        except psutil.Error:
            return seen
        for process in processes:
            try:
                with process.oneshot():
                    times, parent = process.cpu_times(), process.ppid()
                    key = (process.pid, process.create_time())
            except psutil.Error:  # exited between listing and reading
                continue
            into[key] = (times.user + times.system, parent)
            seen.add(key)
        return seen

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample(self.last)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        alive = self.sample(self.last)
        total = self.root_seconds() - self.root_first
        for key, (seconds, parent) in self.last.items():
            if key in alive or parent != self.root.pid:  # a reaped direct child is in the root's children times
                total += seconds - self.first.get(key, (0.0, parent))[0]
        return round(total, 2)
