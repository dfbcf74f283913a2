"""A rich progress bar on a terminal for long reconciles: bytes when there are bytes to
send, files otherwise."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class RichReporter:
    def __init__(self, pair: str, files: int, nbytes: int):
        self.by_bytes = nbytes > 0
        self.files_done = 0
        self.total_files = files
        columns = [TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.fields[files]}/{task.fields[total_files]} files")]
        if self.by_bytes:
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        columns.append(TimeRemainingColumn())
        self.progress = Progress(*columns, console=Console(stderr=True), transient=True,
                                 redirect_stderr=True, redirect_stdout=False)
        self.task = self.progress.add_task(pair, total=nbytes if self.by_bytes else files,
                                           files=0, total_files=files)
        self.progress.start()

    def advance(self, files: int, nbytes: int) -> None:
        self.files_done += files
        self.progress.update(self.task, advance=nbytes if self.by_bytes else files,
                             files=self.files_done)

    def set_totals(self, files: int, nbytes: int) -> None:
        """Raise the totals while a first sync's walk is still finding files."""
        self.total_files = files
        self.progress.update(self.task, total=nbytes if self.by_bytes else files,
                             total_files=files)

    def close(self) -> None:
        self.progress.stop()
