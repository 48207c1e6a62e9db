#!/usr/bin/env python3
"""Entry point of the ngd_dist images, run under tini (which forwards signals to it).

    <image> launch CONFIG --launcher torchrun --nproc 2 [--set k=v ...]   the default command
    <image> validate CONFIG | train CONFIG | quickstart ...              any ngd-dist subcommand
    <image> bash | mpirun ... | python ...                              anything else, as given

An ngd-dist subcommand replaces this process (``exec``), so tini's child is ``ngd-dist`` itself.
``docker stop`` sends SIGTERM to the container: tini passes it to ``ngd-dist launch``, which hands
it once to the launcher's process group (torchrun, mpirun, or DeepSpeed's launcher, whose runner
would pass nothing on) and waits; the workers finish their step, write a checkpoint and exit, and
``ngd-dist launch`` exits 75 (preempted; launch again to resume). SIGINT (Ctrl-C under
``docker run -it``) goes the same way.
"""

from __future__ import annotations

import os
import sys

SUBCOMMANDS = {"launch", "train", "validate", "quickstart", "-h", "--help"}


def main(argv: list[str]) -> int:
    """Run ``argv`` as described above (this process becomes the command)."""
    if not argv:
        argv = ["--help"]
    if argv[0] not in SUBCOMMANDS:
        os.execvp(argv[0], argv)
    os.execvp("ngd-dist", ["ngd-dist", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
