"""A one-line transfer progress report on stderr, for the CLI's uploads, downloads and exports.

    bundle.zip  [#######.............]  12.0 MiB / 34.5 MiB  35%  8.1 MiB/s  ETA 0:03

It is a `tracepipe.client.Progress` callable (bytes so far, total or -1), so it plugs into
the client directly. On a terminal the line is redrawn in place (at most 10 times a
second); when stderr is a file or a pipe a full line is written every `interval` seconds
and once at the end, so logs of CI jobs show progress without a flood of carriage returns.
Without a total (an export) it shows bytes and rate, no percentage or ETA. Hand-written
rather than rich or tqdm: this is all the CLI needs, and it adds no dependency.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 20
RATE_WINDOW_S = 3.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine:
    """Progress of one transfer; call it with (done, total), then `finish()`.

    The rate is measured over the last few seconds (not since the start), so the ETA
    follows a transfer that speeds up or stalls. A `done` smaller than before (the client
    retried from the start) restarts the measurement.
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.interval = 0.1 if self.tty else interval
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.total = -1
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._last_draw = float("-inf")
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done < self.done:  # a retry counts again from 0
            self.started = now
            self._samples.clear()
        self.done, self.total = done, total
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        if self.enabled and now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw(self.line())

    def rate(self) -> float:
        """Bytes per second over the recent window (0 before two samples)."""
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, *, final: bool = False) -> str:
        parts = [self.label]
        if self.total > 0:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * BAR_WIDTH)
            parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
            parts.append(f"{human_bytes(self.done)} / {human_bytes(self.total)}")
            parts.append(f"{fraction * 100:3.0f}%")
        else:
            parts.append(human_bytes(self.done))
        if final:
            elapsed = max(self.clock() - self.started, 1e-9)
            parts.append(f"{human_bytes(self.done / elapsed)}/s")
            parts.append(f"in {human_duration(elapsed)}")
        else:
            rate = self.rate()
            parts.append(f"{human_bytes(rate)}/s")
            if self.total > 0:
                left = self.total - self.done
                parts.append(f"ETA {human_duration(left / rate)}" if rate > 0 else "ETA --:--")
        return "  ".join(parts)

    def finish(self) -> None:
        """The closing line (average rate, time taken); idempotent."""
        if self._finished or not self.enabled:
            return
        self._finished = True
        self._draw(self.line(final=True))
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def abort(self) -> None:
        """Ends the line without a summary (the transfer failed), so that the error message
        that follows starts on a line of its own."""
        if self._finished or not self.enabled:
            return
        self._finished = True
        if self.tty and self._last_draw > float("-inf"):
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
