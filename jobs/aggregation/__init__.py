"""Aggregation as pure functions over tensors: no Django, no network, no processes."""

from jobs.aggregation.fedavg import SiteUpdate, fedavg, weighted_metrics
from jobs.aggregation.robust import (
    AGGREGATORS,
    Aggregator,
    coordinate_median,
    krum,
    make_aggregator,
    trimmed_mean,
)
from jobs.aggregation.server_opt import FedAdagrad, FedAdam, FedYogi, ServerOptimizer
from jobs.aggregation.sources import FileTensorSource, MemoryTensorSource, TensorSource
from jobs.aggregation.validation import UpdateRejected, check_update

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "FileTensorSource",
    "MemoryTensorSource",
    "ServerOptimizer",
    "SiteUpdate",
    "TensorSource",
    "UpdateRejected",
    "check_update",
    "coordinate_median",
    "fedavg",
    "krum",
    "make_aggregator",
    "trimmed_mean",
    "weighted_metrics",
]
