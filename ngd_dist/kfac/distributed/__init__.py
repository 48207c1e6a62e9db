"""Who computes what across ranks, and how tensors travel between them."""

from ngd_dist.kfac.distributed.assignment import LayerShape, WorkPlan, make_plan
from ngd_dist.kfac.distributed.comm import Communicator, LocalCommunicator, TorchCommunicator

__all__ = ["Communicator", "LayerShape", "LocalCommunicator", "TorchCommunicator", "WorkPlan", "make_plan"]
