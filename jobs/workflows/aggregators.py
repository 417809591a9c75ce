"""The ``aggregator`` parameters FedAvg and FedOpt share, checked without torch."""

from __future__ import annotations

from typing import Any

from common.validators import FieldError
from jobs.aggregator_arguments import AGGREGATOR_ARGUMENTS, check_aggregator_args

AGGREGATOR_PARAMETERS: dict[str, Any] = {
    "aggregator": {
        "enum": sorted(AGGREGATOR_ARGUMENTS),
        "description": "how the round's updates are combined: the weighted mean, or a robust "
        "aggregator",
    },
    "aggregator_args": {
        "type": "object",
        "description": "the aggregator's arguments: trim_fraction (trimmed_mean); "
        "num_malicious and num_to_keep (krum)",
    },
}


def check_aggregator(name: Any, args: Any, min_clients: int) -> dict[str, Any]:
    """The aggregator's checked arguments; also refused: a Krum that the round's quorum of
    ``min_clients`` updates could never satisfy."""
    checked = check_aggregator_args(name, args if args is not None else {})
    if name == "krum":
        malicious = checked["num_malicious"]
        if min_clients <= 2 * malicious + 2:
            raise FieldError(
                "num_malicious",
                f"{malicious} is too many for min_clients={min_clients}: Krum needs more than "
                f"2 × num_malicious + 2 updates (at least {2 * malicious + 3} sites)",
            )
        keep = checked.get("num_to_keep", 1)
        if keep > min_clients - malicious:
            raise FieldError(
                "num_to_keep",
                f"{keep} is more than min_clients - num_malicious = {min_clients - malicious}: "
                "keeping that many could keep an attacker",
            )
    return checked
