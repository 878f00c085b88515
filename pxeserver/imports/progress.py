"""How an import tells what it is doing: a bar per file on a terminal (tqdm), one line per
step anywhere else (a log, a pipe, systemd), and a readable state for the API's job."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Protocol, TextIO

from tqdm import tqdm


class Progress(Protocol):
    def step(self, message: str) -> None:
        """One thing done or started, as one line."""

    def begin(self, label: str, total: int) -> None:
        """A file of ``total`` bytes starts being copied and hashed."""

    def advance(self, count: int) -> None:
        """``count`` more bytes of it are done."""

    def end(self) -> None:
        """The file is done."""


class LineProgress:
    """One line per step; file copies say when they start, not every chunk."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def step(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def begin(self, label: str, total: int) -> None:
        self.step(f"copying and hashing {label} ({total} bytes)")

    def advance(self, count: int) -> None:
        pass

    def end(self) -> None:
        pass


class BarProgress(LineProgress):
    """A tqdm bar per file on the terminal; steps are printed above the bar."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._bar: tqdm[Any] | None = None

    def step(self, message: str) -> None:
        tqdm.write(message, file=self.stream)

    def begin(self, label: str, total: int) -> None:
        self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                         file=self.stream, leave=True)

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def for_terminal(stream: TextIO = sys.stderr) -> Progress:
    return BarProgress(stream) if stream.isatty() else LineProgress(stream)


class JobProgress:
    """The state of an import the API runs, read by ``GET /api/imports/<id>`` while it runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: list[dict[str, Any]] = []
        self._file: dict[str, Any] | None = None

    def step(self, message: str) -> None:
        with self._lock:
            self._steps.append({"time": time.time(), "message": message})

    def begin(self, label: str, total: int) -> None:
        self.step(f"copying and hashing {label} ({total} bytes)")
        with self._lock:
            self._file = {"name": label, "bytes": 0, "total": total}

    def advance(self, count: int) -> None:
        with self._lock:
            if self._file is not None:
                self._file["bytes"] += count

    def end(self) -> None:
        with self._lock:
            self._file = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"steps": list(self._steps), "copying": dict(self._file) if self._file else None}
