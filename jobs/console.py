"""What a command shows: its `[tailseed]` log lines on stdout, a tqdm bar per stage on stderr, and
the libraries' own output held back; `--quiet` and `--verbose` set how much.

- quiet: warnings, errors and a command's final summary line; no bars.
- default: tailseed's log lines and the bars. diffusers' and transformers' progress bars and
  logs below ERROR are off (`pipeline.models.load_pipeline`), and so is Ray's start-up noise
  (`pipeline.runner.RayRunner`).
- verbose: also tailseed's debug lines (which unit ran on which node) and the libraries' logs
  at INFO (Ray's, with the actors' output forwarded to the driver; diffusers', transformers');
  the libraries' own progress bars stay off, so that they do not tear tailseed's.
Bars are drawn only when stderr is a terminal (as tqdm's `disable=None`): in a log file or CI,
where a bar's carriage-return redraws would pile up, the per-unit log lines are the progress.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading

QUIET, NORMAL, VERBOSE = 0, 1, 2
SUMMARY = 25  # a command's final summary line: between INFO and WARNING, so that --quiet keeps it
_THRESHOLD = {QUIET: SUMMARY, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}

_verbosity = NORMAL


def verbosity() -> int:
    return _verbosity


def configure(level: int | None) -> None:
    """Set this process's verbosity (None: the default) before any work starts."""
    global _verbosity
    _verbosity = NORMAL if level is None else level
    if _verbosity == VERBOSE:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_info()
        transformers_logging.set_verbosity_info()
        return
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        library = sys.modules.get(name)  # raised by an earlier --verbose in this process
        if library is not None and library.get_verbosity() < logging.WARNING:
            library.set_verbosity_error()


def add_flags(parser, at_top: bool = True) -> None:
    """--quiet / --verbose on a parser. At the top (`tailseed --quiet augment`) they default to
    the normal verbosity; on a subcommand (`tailseed augment --quiet`) they default to nothing,
    so that they do not undo the top-level flag."""
    group = parser.add_mutually_exclusive_group()
    default = {"default": None if at_top else argparse.SUPPRESS}
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=QUIET,
        help="only warnings, errors and the final summary line; no progress bars",
        **default,
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=VERBOSE,
        help="also debug lines (what ran where) and the libraries' logs (Ray, diffusers, "
        "transformers)",
        **default,
    )


def log(message: str, level: int = logging.INFO, prefix: str = "[tailseed] ") -> None:
    """One line on stdout, if the verbosity shows `level`; drawn above any progress bar."""
    if level < _THRESHOLD[_verbosity]:
        return
    from tqdm import tqdm

    with tqdm.get_lock():  # the bars are cleared, the line written, the bars drawn again
        for bar in _drawn:
            bar.bar.clear(nolock=True)
        sys.stdout.write(f"{prefix}{message}\n")
        sys.stdout.flush()
        for bar in _drawn:
            bar.bar.refresh(nolock=True)


_drawn: list[StageBar] = []  # the bars on the terminal now


def _bar_stream():
    """(stream, owned): where a bar is drawn, or None when not on a terminal (tqdm's
    `disable=None` test). Under the Ray runner's stderr filter a bar writes to the terminal
    directly, on a copy of the filter's original stderr: through the filter's pipe it would
    arrive late, after a log line written to stdout meanwhile."""
    from tailseed.pipeline.runner import StderrFilter

    if not StderrFilter.stderr_is_terminal():
        return None, False
    if not StderrFilter.active:
        return sys.stderr, False
    fd = os.dup(StderrFilter.active[0].original)
    return os.fdopen(fd, "w", encoding=sys.stderr.encoding or "utf-8", errors="replace"), True


class StageBar:
    """A stage's progress in images, as a tqdm bar on stderr.

    Inside a unit the images are computed together as one batch, step by step, so `within`
    reports the images' worth of the unit done so far (its images times the fraction of steps
    done); the bar shows whole images, and a unit's images are all counted once it finishes
    (`finished`). Off when quiet, and when stderr is not a terminal. `within` may come from
    another thread (the Ray runner's progress reader).
    """

    def __init__(self, stage: str, total: int, initial: int = 0, unit: str = "img"):
        from tqdm import tqdm

        self.stage = stage
        self.stream, self._owned = (None, False) if _verbosity == QUIET else _bar_stream()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=stage,
            unit=unit,
            file=self.stream or sys.stderr,
            dynamic_ncols=True,
            disable=self.stream is None,
        )
        self.counted = initial  # whole images of finished units, plus those done before
        self.partial: dict[int, float] = {}  # unit -> images' worth done inside it
        self.done_units: set[int] = set()
        self._lock = threading.Lock()  # on Ray, `within` comes from the runner's thread
        # a drawn bar redraws each second, so that its elapsed time runs between two images
        self._closed = threading.Event()
        self._ticker = None
        if not self.bar.disable:
            _drawn.append(self)
            self._ticker = threading.Thread(target=self._tick, name="bar-ticker", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._closed.wait(1.0):
            self.bar.refresh()

    @property
    def n(self) -> int:
        """The whole images the bar shows (also when it is not drawn)."""
        return math.floor(self.counted + sum(self.partial.values()) + 1e-6)

    def within(self, unit: int, done: float) -> None:
        """The images' worth of `unit` done so far (the runner's progress callback); a report
        that arrives after the unit finished is ignored."""
        with self._lock:
            if unit not in self.done_units:
                self.partial[unit] = max(done, self.partial.get(unit, 0.0))
                self._show()

    def batch(self, unit: int, images: int):
        """A callback for a batch of `images` images that reports the fraction of its steps
        done (`Inverter.invert`'s and `Sampler.generate`'s progress), as `within(unit, ...)`."""
        return lambda fraction: self.within(unit, fraction * images)

    def finished(self, unit: int, images: int) -> None:
        """`unit`, of `images` images, is done."""
        with self._lock:
            self.done_units.add(unit)
            self.partial.pop(unit, None)
            self.counted += images
            self._show()

    def _show(self) -> None:
        shown = self.n
        if shown > self.bar.n:
            self.bar.update(shown - self.bar.n)

    def close(self) -> None:
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
        if self in _drawn:
            _drawn.remove(self)
        self.bar.close()
        if self._owned:
            self.stream.close()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
