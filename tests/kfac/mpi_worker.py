"""Run under mpirun: torch.distributed bootstrapped through MPI, then the equivalence scenarios
with the MPI transport and with torch.distributed. Rank 0 prints one JSON line; exit code 1 on a
mismatch."""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

os.environ.pop("MASTER_ADDR", None)
os.environ.pop("MASTER_PORT", None)
torch.set_num_threads(1)


def main() -> int:
    from mpi4py import MPI

    from ngd_dist.kfac.distributed.mpi import init_from_mpi
    from ngd_dist.service.environment import teardown
    from tests.kfac.scenarios import SCENARIOS, rel_diff, train

    rank, world = init_from_mpi("gloo", timeout_s=60)
    worst = 0.0
    checked = 0
    for transport in ("mpi", "torch"):
        for scenario in SCENARIOS[::2]:
            scenario = {**scenario, "transport": transport}
            reference, _ = train(scenario, rank, world, distributed=False)
            params, _ = train(scenario, rank, world, distributed=True)
            worst = max(worst, rel_diff(params, reference))
            checked += 1
    diffs = MPI.COMM_WORLD.gather(worst, root=0)
    if rank == 0:
        print(json.dumps({"world": world, "checked": checked, "max_rel_diff": max(diffs)}), flush=True)
    # release DDP and the process groups before the interpreter exits (as the worker does), or a
    # gloo thread can abort the process at shutdown
    gc.collect()
    teardown()
    return 0 if worst < 2e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
