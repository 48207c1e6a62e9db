"""``python -m ngd_dist.service.torchrun ARGS``: torchrun (``torch.distributed.run``) minus its failure report

``ngd-dist launch --launcher torchrun`` starts this instead of ``python -m torch.distributed.run``;
it takes the same arguments and runs the same launcher (:func:`torch.distributed.run.run`). The
difference is what a failure looks like: torchrun ends a failed job with a ~40-line traceback and
report (``ChildFailedError``), and a signalled one with a ``SignalException`` traceback, and exits 1
either way. Here the first failed worker's exit code is returned instead (``128 + N`` for a worker
killed by signal N, and for the launcher itself stopped by signal N), with no traceback, and the
agent's per-worker log lines about closing workers are dropped: the workers have already said why
they stopped, and ``ngd-dist launch`` reports the root cause as one line (:mod:`ngd_dist.service.failure`).
"""

from __future__ import annotations

import logging
import sys

_AGENT_NOISE = ("Sending process %s closing signal %s", "failed (exitcode: %s)", "Received %s death signal")


class _DropFailureReport(logging.Filter):
    """Drops the elastic agent's log lines that only restate a worker failure or a signal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_AGENT_NOISE))


def _exit_code(code: int) -> int:
    """A worker's exit code as a process exit status: ``128 + N`` for death by signal N."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; return 0, the first failed worker's code, or ``128 + signal``."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    quiet = _DropFailureReport()
    for name in ("multiprocessing.api", "agent.server.api"):
        logging.getLogger(f"torch.distributed.elastic.{name}").addFilter(quiet)
    try:
        run(args)
    except ChildFailedError as exc:
        _rank, first = exc.get_first_failure()
        return _exit_code(first.exitcode) or 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
