"""Training progress on stderr: a tqdm bar per epoch on a terminal, else one line per epoch."""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

from tqdm import tqdm


def _screen(stream) -> Tuple[int, int]:
    """The terminal's columns and rows; 80 x 24 where it reports none (a pseudo-terminal that
    was never sized reports 0 x 0, and tqdm would then draw nothing)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


class EpochProgress:
    """``enabled=False`` shows nothing.  Otherwise each epoch ends with a summary line, and on a
    terminal a bar (cleared at the end of the epoch) shows the triplets trained, the rate and the running
    loss."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.live = enabled and self.stream.isatty()  # whether update() is worth a device sync
        self._bar: Optional[tqdm] = None

    def start(self, epoch: int, epochs: int, rows: int) -> None:
        """An epoch over ``rows`` training triplets begins."""
        if self.live:
            columns, lines = _screen(self.stream)
            self._bar = tqdm(total=rows, desc=f"epoch {epoch}/{epochs}", unit=" triplets", unit_scale=True,
                             file=self.stream, leave=False, ncols=columns, nrows=lines)

    def update(self, done: int, loss: float) -> None:
        """``done`` triplets of the epoch trained, with this running mean loss."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self._bar.update(done - self._bar.n)

    def end(self, epoch: int, epochs: int, steps: int, loss: float, seconds: float) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            self.stream.write(f"epoch {epoch}/{epochs}: {steps} steps, loss {loss:.4f}, {seconds:.1f} s\n")
            self.stream.flush()
