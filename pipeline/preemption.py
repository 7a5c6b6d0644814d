"""Stop requests that arrive as signals: SLURM's `--signal` before the time limit (SIGUSR1/2), or
SIGTERM, which preemption and a plain `scancel` send to every process of the job (SIGKILL follows
after the cluster's KillWait or GraceTime).

A signal lands on one process at an arbitrary moment; acting on it there (submitit's hook saves
on rank 0 only) would leave ZeRO-3/FSDP shards of the other ranks unsaved. So the handler only
records the request and the loop asks every rank at each step boundary (all_reduce_max):
all ranks then write one checkpoint together and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# torchrun turns these signals into "kill the workers" unless told otherwise (env read by its argparse).
TORCHRUN_HANDLES = {"PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
                    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}
log = logging.getLogger("ftpipe")


class StopRequest:
    """Remembers the first stop signal this process received."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def listening(self) -> Iterator[StopRequest]:
        """Record stop signals inside the block; the previous handlers come back after it (unless one
        came: then they are ignored until the process ends)."""
        # signal.signal only works in the main thread; elsewhere (tests, notebooks) nothing listens.
        main = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS} if main else {}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                # Once stopping, a repeated signal (SLURM's, a launcher's re-forward) must not kill the
                # process between the checkpoint and its exit code: ignore it from here on.
                signal.signal(signum, signal.SIG_IGN if self.requested else handler)

    def _record(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum


def ignore_stop_signals() -> None:
    """For launchers (torchrun): a stop signal is for the ranks, and would otherwise kill them (torchrun
    would also SIGTERM them, then SIGKILL, on its own SIGTERM)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    os.environ.update(TORCHRUN_HANDLES)


@dataclass
class LeadCheck:
    """Warns once when the slowest step (but the first) plus a checkpoint takes longer than the time a
    stop signal leaves to save (launch.slurm.signal_lead_seconds); None: not in a SLURM job."""

    lead_seconds: float | None = None
    slowest_step: float = 0.0
    save: float | None = None
    warned: bool = False
    steps: int = 0

    def step_took(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > 1:  # the first step warms up (allocations, kernels, communicators): not typical
            self.slowest_step = max(self.slowest_step, seconds)
        self._check()

    def save_took(self, seconds: float) -> None:
        self.save = seconds
        self._check()

    def _check(self) -> None:
        need = self.slowest_step + (self.save or 0.0)
        if self.warned or self.lead_seconds is None or need <= self.lead_seconds:
            return
        self.warned = True
        save = f"{self.save:.1f} s" if self.save is not None else "not measured yet"
        log.warning("train: a step (%.1f s) plus a checkpoint (%s) takes longer than "
                    "launch.slurm.signal_lead_seconds (%d s): a stop signal before the time limit may "
                    "come too late to save; raise it", self.slowest_step, save, self.lead_seconds)
