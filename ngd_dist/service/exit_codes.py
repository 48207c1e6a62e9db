"""The exit codes of ``ngd-dist train`` and ``ngd-dist launch``: what a scheduler or script can act on.

A worker exits with one of these; ``ngd-dist launch`` exits with the code of the rank whose failure
came first (the root cause), not the launcher's own code. docs/reliability.md lists which failure
gives which code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Why a job ended."""

    OK = 0
    """Trained to ``train.steps`` (or nothing was left to do)."""

    INTERNAL = 1
    """An unexpected error: a bug, or a failure not classified below (its traceback is logged)."""

    BAD_INPUT = 2
    """The job, its data, its model or its resume target is wrong: fix the input and launch again."""

    DIVERGED = 3
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient."""

    DECOMPOSITION_FAILED = 4
    """A factor's decomposition failed ``max_failed_decompositions`` times in a row."""

    CHECKPOINT_FAILED = 5
    """A checkpoint could not be written (disk full, read-only or missing directory)."""

    PREEMPTED = 75
    """Stopped by SIGTERM / SIGINT after every rank checkpointed: launch again to resume (EX_TEMPFAIL)."""
