"""Progress for long work: a rich bar on a terminal, plain periodic lines otherwise (CI, logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, "perplexity") as p: p.update(i, "PPL 12.3")` — one line per step off a terminal."""

    def __init__(self, total: int, desc: str, stream=None, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.enabled and self.stream.isatty():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                     "{task.total}"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, info="")
        return self

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        w = len(str(self.total))
        print(f"[{done:{w}d}/{self.total}] {self.desc}: {elapsed / max(done, 1):.2f} s/step, ETA {eta:.0f} s"
              + (f", {info}" if info else ""), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
