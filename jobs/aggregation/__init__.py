"""Aggregation as pure functions over tensors: no Django, no network, no processes."""

from jobs.aggregation.fedavg import SiteUpdate, fedavg, weighted_metrics
from jobs.aggregation.sources import FileTensorSource, MemoryTensorSource, TensorSource
from jobs.aggregation.validation import UpdateRejected, check_update

__all__ = [
    "FileTensorSource",
    "MemoryTensorSource",
    "SiteUpdate",
    "TensorSource",
    "UpdateRejected",
    "check_update",
    "fedavg",
    "weighted_metrics",
]
