"""A signal stops the whole job, not only the run being trained.

``Trainer.fit`` turns SIGINT/SIGTERM into a saved checkpoint and returns with ``stop_signal`` set. A
verb that trains several runs in a row (quickstart, sweep, transition) asks :func:`stop_code` after
each ``fit`` and returns that code at once instead of starting the next run; a rerun of the same
command resumes from the saved checkpoint. :func:`note` keeps the last signal for callers that only
see a run's True/False (``sweeps.runner.train_run``).
"""

from __future__ import annotations

import signal

_last: list[str] = []


def exit_code(signal_name: str | None) -> int | None:
    """The shell's exit code for death by ``signal_name`` (SIGINT 130, SIGTERM 143); None for no signal."""
    return None if signal_name is None else 128 + signal.Signals[signal_name].value


def stop_code(trainer) -> int | None:
    """The job's exit code if a signal stopped ``trainer``'s fit, else None (go on)."""
    note(trainer.stop_signal)
    return exit_code(trainer.stop_signal)


def note(signal_name: str | None) -> None:
    if signal_name is not None:
        _last.append(signal_name)


def last_exit_code(default: int = 130) -> int:
    """The exit code of the last signal a run stopped on in this process (``default`` if none was seen)."""
    return exit_code(_last[-1]) if _last else default
