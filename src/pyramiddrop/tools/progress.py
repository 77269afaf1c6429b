"""Progress bars that suit where they are written: a live bar on a terminal, a few plain lines in a log.

Written to a file or a pipe (a CI log, `nohup`), tqdm's bar would be hundreds of carriage-return updates on one
line; there it prints a newline-terminated line at most every `log_interval` seconds instead.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _LineWriter:
    """A stream wrapper that ends each of tqdm's updates with a newline instead of starting it with a return."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "")
        if text.strip():
            self.stream.write(text.rstrip("\n") + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*, log_interval: float = 30.0, file=None, **kwargs) -> tqdm:
    """`tqdm(**kwargs)` on a terminal; elsewhere plain lines, at most one per `log_interval` seconds."""
    stream = file if file is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(file=stream, **kwargs)
    return tqdm(file=_LineWriter(stream), mininterval=log_interval, maxinterval=float("inf"), ascii=True, **kwargs)
