"""A rich progress bar on a terminal for long reconciles."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class RichReporter:
    def __init__(self, pair: str, files: int, nbytes: int):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("files"), DownloadColumn(binary_units=True), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            redirect_stderr=True, redirect_stdout=False)
        self.files = self.progress.add_task(pair, total=files)
        self.bytes_total = nbytes
        self.progress.start()
        self.progress.update(self.files, total=files)
        self._bytes = self.progress.add_task("bytes", total=max(nbytes, 1), visible=False)

    def advance(self, files: int, nbytes: int) -> None:
        self.progress.advance(self.files, files)

    def close(self) -> None:
        self.progress.stop()
