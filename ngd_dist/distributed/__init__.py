"""Who computes what across ranks, and how tensors travel between them."""

from ngd_dist.distributed.assignment import LayerShape, WorkPlan, greedy, round_robin
from ngd_dist.distributed.comm import Communicator, LocalCommunicator

__all__ = ["Communicator", "LayerShape", "LocalCommunicator", "WorkPlan", "greedy", "round_robin"]
