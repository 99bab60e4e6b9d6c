"""The stack's processes as /proc sees them: trees, RSS and PSS, CPU time, sockets. Used by
the tests (resource bounds) and the benchmarks (peak RSS, whole-stack PSS, CPU per request)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (PostgreSQL backends, uvicorn and nginx workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far (exited ones count 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _kib(pid: int, field: str, path: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    return _kib(pid, "VmRSS:", "status") * 1024


def pss_bytes(pid: int) -> int:
    """Proportional set size: what summing over processes does not double count."""
    return _kib(pid, "Pss:", "smaps_rollup") * 1024


class PeakRss:
    """Samples every process of a tree every 50 ms. `peak` is the largest single process
    seen (each uvicorn worker is bounded on its own), `peak_total` the largest sum, `start`
    the largest single process when sampling began (what the work added is peak - start)."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.peak = 0
        self.peak_total = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [rss_bytes(p) for p in process_tree(self.root)]
            self.peak = max(self.peak, *sizes)
            self.peak_total = max(self.peak_total, sum(sizes))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self.start = max((rss_bytes(p) for p in process_tree(self.root)), default=0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def established_to_port(pids: list[int], port: int) -> int:
    """How many ESTABLISHED TCP connections the processes hold to a local port."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = fd.readlink().as_posix()
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "01" and int(parts[2].split(":")[1], 16) == port and parts[9] in inodes:
                count += 1
    return count
