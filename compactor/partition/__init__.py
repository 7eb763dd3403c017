"""Edge–cloud deployment planning: run a model on the device, offload it to a server, or
split it between the two, decided by measurement (``compactor partition``).

- :mod:`~compactor.partition.graph`: where an ONNX graph can be cut; head/tail extraction
- :mod:`~compactor.partition.profile`: timing the parts under each profile
- :mod:`~compactor.partition.cost`: the latency and device-energy model, crossovers
- :mod:`~compactor.partition.simulate`: two processes over a shaped loopback link
- :mod:`~compactor.partition.planner`: all of it, end to end (:func:`plan_partition`)

Importing this package stays light: onnx and onnxruntime load inside the functions.
"""

from __future__ import annotations

from compactor.partition.config import PartitionSpec

__all__ = ["PartitionSpec", "plan_partition"]


def __getattr__(name: str):
    if name == "plan_partition":
        from compactor.partition.planner import plan_partition

        return plan_partition
    raise AttributeError(f"module 'compactor.partition' has no attribute {name!r}")
