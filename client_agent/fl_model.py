"""The record that crosses between a client script and the federation: ``FLModel``.

The names and the constructor's argument order are NVFlare's (``nvflare.app_common.abstract.
fl_model``), so that a script written for NVFlare's Client API runs after changing only its
import line. Params are a mapping of tensor name to ``torch.Tensor`` (a ``state_dict``), or to numpy
arrays in a NumPy job (``NumpyFedAvgRecipe``); numpy arrays are accepted on ``send`` in any
job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ParamsType(StrEnum):
    """Whether ``params`` are whole weights or the change from the received global model."""

    FULL = "FULL"
    DIFF = "DIFF"


class FLMetaKey:
    """Well-known keys of ``FLModel.meta``: every member of NVFlare's
    ``nvflare.apis.fl_constant.FLMetaKey``, with its value.

    A received model's meta holds ``job_id``, ``site_name``, ``current_round``,
    ``total_rounds`` and ``start_round`` under these keys, and (FedPortal's earlier spelling,
    kept so that older scripts run) ``JOB_ID``, ``SITE_NAME`` and ``TASK_NAME``.
    """

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    """The site's FedAvg weight for this round; a missing key counts as 1.0."""
    PROCESSED_ALGORITHM = "PROCESSED_ALGORITHM"
    PROCESSED_KEYS = "PROCESSED_KEYS"
    INITIAL_METRICS = "initial_metrics"
    FILTER_HISTORY = "filter_history"
    CONFIGS = "configs"
    VALIDATE_TYPE = "validate_type"
    START_ROUND = "start_round"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"
    PROCESS_RC_FILE = "_process_rc.txt"
    SUBMIT_MODEL_NAME = "submit_model_name"
    AUTH_TOKEN = "auth_token"
    AUTH_TOKEN_SIGNATURE = "auth_token_signature"


# The task's name in a received model's meta (NVFlare's ``ConfigKey.TASK_NAME``).
TASK_NAME_META_KEY = "TASK_NAME"
# FedPortal's earlier spelling of the job id and site name in meta, still set.
LEGACY_JOB_ID_META_KEY = "JOB_ID"
LEGACY_SITE_NAME_META_KEY = "SITE_NAME"


class NPConstants:
    """NVFlare's ``nvflare.app_common.np.constants.NPConstants``."""

    NUMPY_KEY = "numpy_key"


class AlgorithmConstants:
    """Keys of ``FLModel.meta`` that federated algorithms use (NVFlare's names and values, from
    ``nvflare.app_common.app_constant``), so the two ends of one algorithm agree on them.

    ``meta[SCAFFOLD_CTRL_GLOBAL]`` (server to site) and ``meta[SCAFFOLD_CTRL_DIFF]`` (site to
    server) each map parameter names to tensors; the wire format carries such a mapping as
    tensors (``client_agent.wire``), not JSON.
    """

    FEDPROX_MU = "fedprox_mu"
    SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"
    """A site's change of its control variate this round, ``c_i+ - c_i``, per parameter."""
    SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"
    """The server's control variate ``c``, per parameter."""
    SCAFFOLD_CTRL_AGGREGATOR_ID = "scaffold_ctrl_aggregator"


@dataclass
class FLModel:
    """Weights, metrics and metadata exchanged in one task.

    ``current_round`` counts from 0, as in NVFlare. ``metrics`` sent with a train result score
    the *received* global model (NVFlare's convention); the workflow uses them to choose the
    best model. ``optimizer_params`` is kept for NVFlare compatibility but not sent: optimizer
    state stays at the site.
    """

    params_type: ParamsType | str | None = None
    params: Mapping[str, Any] | None = None
    optimizer_params: Mapping[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.params_type is not None:
            try:
                self.params_type = ParamsType(self.params_type)
            except ValueError:
                raise ValueError(
                    f"FLModel.params_type must be 'FULL' or 'DIFF', got {self.params_type!r}"
                ) from None
        if self.meta is None:
            self.meta = {}

    @property
    def weight(self) -> Any:
        """This model's FedAvg weight as sent: ``meta["NUM_STEPS_CURRENT_ROUND"]``, 1.0 when
        missing or None. Not converted: the server checks it and names a bad value."""
        value = self.meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
        return 1.0 if value is None else value

    def __repr__(self) -> str:
        n = 0 if self.params is None else len(self.params)
        return (
            f"FLModel(params_type={self.params_type}, params=<{n} tensors>, "
            f"metrics={self.metrics}, current_round={self.current_round}, "
            f"total_rounds={self.total_rounds}, meta={self.meta})"
        )
