"""Stop requests that arrive as signals: SLURM's `--signal` before the time limit, or preemption.

A signal lands on one process at an arbitrary moment; acting on it there (submitit's hook saves
on rank 0 only) would leave ZeRO-3/FSDP shards of the other ranks unsaved. So the handler only
records the request and the loop asks every rank at each step boundary (all_reduce_max):
all ranks then write one checkpoint together and stop.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Remembers the first stop signal this process received."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def listening(self) -> Iterator[StopRequest]:
        """Record stop signals inside the block; the previous handlers come back after it."""
        # signal.signal only works in the main thread; elsewhere (tests, notebooks) nothing listens.
        main = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS} if main else {}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _record(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum


def ignore_stop_signals() -> None:
    """For launchers (torchrun): a stop signal is for the ranks, and would otherwise kill them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
