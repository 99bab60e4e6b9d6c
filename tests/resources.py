"""Resource measurements of the stack's processes from /proc (bounds, never timings)."""

from __future__ import annotations

import threading
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn's workers are children of the supervisor)."""
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


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples the RSS of every process in a tree every 50 ms; `peak` is the largest single
    process seen (each uvicorn worker is bounded on its own)."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in process_tree(self.root):
                self.peak = max(self.peak, rss_bytes(pid))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def established_to_port(pids: list[int], port: int) -> int:
    """How many ESTABLISHED TCP connections the processes hold to a local port."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
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
            remote_port = int(parts[2].split(":")[1], 16)
            if parts[3] == "01" and remote_port == port and parts[9] in inodes:
                count += 1
    return count


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between the processes sharing them), so a
    component's processes can be summed without counting shared memory twice."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
