"""Progress reporting of a build: a (stage, done, total) callback and/or a rich bar."""
from __future__ import annotations


class _Progress:
    """progress=True: a rich bar on stderr (off when not a terminal); a callable gets
    (stage, done, total) and is how the CLI and tests observe a running build."""

    def __init__(self, progress):
        self.cb = progress if callable(progress) else None
        self.bar = None
        self.tasks = {}
        if progress is True:
            from rich.console import Console
            from rich.progress import Progress

            err = Console(stderr=True)
            if err.is_terminal:
                self.bar = Progress(console=err, transient=True)
                self.bar.start()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.cb is not None:
            self.cb(stage, done, total)
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total)
            self.bar.update(self.tasks[stage], completed=done, total=total)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
