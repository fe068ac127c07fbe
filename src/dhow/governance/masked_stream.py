"""Masked standard streams: what model code prints in the server's own process passes the ``Masker`` too.

A process instance's output reaches the server as lines it logs, through the log filter; a thread instance's
model runs in the server process itself, so its ``print()`` writes to this process's ``sys.stdout``. The
server replaces ``sys.stdout`` and ``sys.stderr`` with a ``MaskedStream`` at start, before any model loads.

A value can be split over several writes (``print(a, b)`` writes ``a``, a space, ``b`` and a newline apart),
so each thread's text is held until a line ends (a newline or a carriage return), a flush, or 64 KiB, and
masked whole. Binary writes to ``sys.stdout.buffer`` pass unmasked: text is what models print.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO, cast

from dhow.governance.masking import Masker

__all__ = ["MaskedStream", "mask_standard_streams"]

#: text without a line end is masked and written once it reaches this size: a progress bar without newlines
#: must not grow the buffer forever
MAX_PENDING_CHARS = 64 * 1024


class MaskedStream:
    """A text stream that masks each line before writing it to ``target``; other attributes are the target's."""

    def __init__(self, target: TextIO, masker: Masker) -> None:
        self.target = target
        self.masker = masker
        # per thread: two models printing at once must not mix halves of their lines before masking
        self._pending = threading.local()

    def write(self, text: str) -> int:
        held: str = getattr(self._pending, "text", "") + text
        end = max(held.rfind("\n"), held.rfind("\r")) + 1
        if not end and len(held) >= MAX_PENDING_CHARS:
            end = len(held)
        self._pending.text = held[end:]
        if end:
            self.target.write(self.masker.mask_text(held[:end]))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        held: str = getattr(self._pending, "text", "")
        if held:
            self._pending.text = ""
            self.target.write(self.masker.mask_text(held))
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        # encoding, fileno, isatty, buffer...: what libraries look up on sys.stdout
        return getattr(self.target, name)


def mask_standard_streams(masker: Masker) -> None:
    """Replace ``sys.stdout`` and ``sys.stderr`` with masked streams (once: a second call changes nothing).

    Log handlers made earlier keep the stream they were given, whose records the log filter masks already.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskedStream):
            setattr(sys, name, cast(TextIO, MaskedStream(stream, masker)))
