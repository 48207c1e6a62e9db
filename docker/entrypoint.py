#!/usr/bin/env python3
"""Entry point of the ngd_dist images, run under tini (which forwards signals to it).

    <image> launch CONFIG --launcher torchrun --nproc 2 [--set k=v ...]   the default command
    <image> validate CONFIG | train CONFIG | quickstart ...              any ngd-dist subcommand
    <image> bash | mpirun ... | python ...                              anything else, as given

``ngd-dist launch`` starts the launcher (torchrun, mpirun, deepspeed) as its child and waits for it.
``docker stop`` sends SIGTERM to the container; passed to ``ngd-dist launch`` it would end that
process alone, tini would then exit and the workers would die with the container before
checkpointing. So for ``launch`` this script hands SIGTERM to the launcher itself, which passes it
once to its workers; they finish their step, write a checkpoint and exit, and so does everything
above them. (SIGINT, e.g. Ctrl-C under ``docker run -it``, reaches the launcher from the terminal
directly and is not passed on again.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SUBCOMMANDS = {"launch", "train", "validate", "quickstart", "-h", "--help"}


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def main(argv: list[str]) -> int:
    """Run ``argv`` as described above; the exit status is the command's."""
    if not argv:
        argv = ["--help"]
    if argv[0] not in SUBCOMMANDS:
        os.execvp(argv[0], argv)
    if argv[0] != "launch":
        os.execvp("ngd-dist", ["ngd-dist", *argv])
    job = subprocess.Popen(["ngd-dist", *argv])

    def hand_over(signum: int, _frame: object) -> None:
        # To the launcher once ngd-dist has started it; before that (while the job is being
        # checked) to ngd-dist itself.
        for pid in children(job.pid) or [job.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, hand_over)
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)  # the launcher got it from the terminal
    code = job.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
