"""SIGTERM honoured in every phase of a run: :func:`install_stop_deadline` arms an alarm on the first SIGTERM;
a phase with no stop check of its own ends with :class:`StopDeadlineExceeded` after a grace period."""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

from lightning.pytorch.utilities.exceptions import SIGTERMException

class StopDeadlineExceeded(SIGTERMException):
    """Raised in the main thread when a SIGTERM was not honoured at a safe point within the grace period
    (a phase without a stop check, e.g. reference statistics): ends the run; no checkpoint is written
    from an arbitrary point of a training step."""


def install_stop_deadline(grace_seconds: Optional[float] = None) -> None:
    """Make SIGTERM end the program in every phase. Lightning only reacts to SIGTERM at batch boundaries
    of its loops, and diffproc's samplers between network evaluations; any other long phase would run
    on. This adds a SIGTERM handler (Lightning composes it with its own) that arms a SIGALRM after
    ``grace_seconds`` (default ``$DIFFPROC_SIGTERM_GRACE`` or 10 s): if the program is still running
    then, :class:`StopDeadlineExceeded` is raised wherever the main thread is. POSIX only."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return
    grace = float(os.environ.get("DIFFPROC_SIGTERM_GRACE", 10.0) if grace_seconds is None else grace_seconds)

    def on_alarm(signum, frame) -> None:
        raise StopDeadlineExceeded()

    def on_term(signum, frame) -> None:
        if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # the first SIGTERM arms the deadline once
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(grace, 0.01))
        if callable(previous):
            previous(signum, frame)
        if signal.getsignal(signal.SIGTERM) is on_term:  # called directly: no Trainer runs to notice it
            raise SIGTERMException()

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_term)


def cancel_stop_deadline() -> None:
    """Disarm the SIGTERM deadline once the program is stopping anyway (an alarm during interpreter
    shutdown would kill the process with SIGALRM instead of its exit code)."""
    if hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
