"""FedAvg: every round, each site trains from the global model; the aggregate is next.

The aggregate is the weighted mean by default (``aggregator="mean"``), or one of the robust
aggregators of :mod:`jobs.aggregation.robust` (``"median"``, ``"trimmed_mean"``, ``"krum"``)
with its ``aggregator_args``, or, with ``dp``, DP-FedAvg's clipped and noised mean
(:mod:`jobs.workflows.dp`).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from client_agent.config import (
    EXCHANGE_FORMAT_META_KEY,
    EXCLUDE_VARS_META_KEY,
    TRANSFER_TYPE_META_KEY,
)
from client_agent.runtime import TASK_TRAIN
from common.validators import FieldError, check_finite_number
from jobs.workflows.aggregators import AGGREGATOR_PARAMETERS, check_aggregator
from jobs.workflows.base import (
    KEY_METRIC_PARAMETERS,
    ROUND_COUNT_PARAMETERS,
    RoundOutcome,
    RoundPlan,
    ServerState,
    TaskSpec,
    WorkflowDefaults,
    check_key_metric,
    check_round_counts,
    every_site,
    params_checked,
    round_label,
)
from jobs.workflows.dp import DP_STATE_KEY, ServerDP, privacy_metrics
from jobs.workflows.results import train_updates
from jobs.workflows.secure import SECURE_AGGREGATION_META_KEY, check_secure_aggregation
from jobs.workflows.training_options import (
    EARLY_STOP_STATE_KEY,
    StopCondition,
    check_aggregation_weights,
    check_exclude_vars,
    check_stop_options,
    early_stop_after,
    excluded,
    rounds_run_when_stopped,
)

if TYPE_CHECKING:  # the aggregation (torch) is imported where a round is aggregated
    import torch

    from jobs.aggregation import SiteUpdate, TensorSource
    from jobs.workflows.results import TaskResult


def fold(
    aggregator: str,
    aggregator_args: Mapping[str, Any],
    updates: list[SiteUpdate],
    global_model: Mapping[str, torch.Tensor] | TensorSource,
) -> dict[str, torch.Tensor]:
    """The aggregate of checked updates (site-name order) by the named aggregator."""
    from jobs.aggregation import make_aggregator

    return make_aggregator(aggregator, **aggregator_args)(updates, global_model)


# The workflows whose rounds DP-FedAvg's analysis covers: SCAFFOLD's control variates are a
# second, unclipped release of every site's data.
DP_WORKFLOWS = ("fedavg", "fedprox", "fedopt")


def noise_seed(seed: int | None, round_number: int) -> int:
    """The seed of a DP round's noise: from :mod:`secrets`, or, for tests, from ``seed`` and
    the round (each round its own noise)."""
    if seed is None:
        return secrets.randbits(63)
    return (seed * 1_000_003 + round_number) % (1 << 63)


# NVFlare's TransferType names and the exchange formats a script may get its params in.
PARAMS_TRANSFER_TYPES = ("FULL", "DIFF")
EXCHANGE_FORMATS = ("pytorch", "numpy")


@dataclass(frozen=True)
class FedAvg(WorkflowDefaults):
    """Federated averaging for ``num_rounds`` rounds, each needing ``min_clients`` good updates.

    ``key_metric`` picks the best global model: a site's train result carries metrics that
    score the global model it *received* (NVFlare's convention), so round ``r``'s aggregated
    ``key_metric`` belongs to the model that round ``r`` started from.

    NVFlare's options (``jobs.workflows.training_options``): ``stop_cond`` and ``patience``
    end the job early, ``exclude_vars`` keeps tensors at the sites, ``aggregation_weights``
    weighs sites; ``exchange_format="numpy"`` hands the script numpy arrays (a NumPy job).
    ``dp`` (a :class:`~jobs.workflows.dp.ServerDP` or its JSON object) makes the aggregate
    DP-FedAvg's (:meth:`close_dp_round`) and records ``privacy/epsilon``, ``privacy/delta``
    and ``privacy/clip_norm`` with every round's metrics.
    FedProx, FedOpt and SCAFFOLD are this class with their own :meth:`close_round`.
    """

    min_clients: int
    num_rounds: int
    key_metric: str | None = "accuracy"
    key_metric_mode: str = "max"
    aggregator: str = "mean"
    aggregator_args: Mapping[str, Any] = field(default_factory=dict)
    params_transfer_type: str = "FULL"
    stop_cond: str | None = None
    patience: int | None = None
    exclude_vars: str | None = None
    aggregation_weights: Mapping[str, float] = field(default_factory=dict)
    exchange_format: str = "pytorch"
    dp: ServerDP | None = None
    secure_aggregation: str | bool | None = None

    name: ClassVar[str] = "fedavg"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["min_clients", "num_rounds"],
        "additionalProperties": False,
        "properties": {
            **ROUND_COUNT_PARAMETERS,
            **KEY_METRIC_PARAMETERS,
            **AGGREGATOR_PARAMETERS,
            "params_transfer_type": {
                "enum": list(PARAMS_TRANSFER_TYPES),
                "description": "FULL: sites send their weights; DIFF: their change",
            },
            "stop_cond": {
                "type": ["string", "null"],
                "description": "stop early when the round's metric meets it: 'accuracy >= 0.95'",
            },
            "patience": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "with stop_cond: stop after this many rounds without improvement",
            },
            "exclude_vars": {
                "type": ["string", "null"],
                "description": "a regular expression: matching tensors stay at the sites",
            },
            "aggregation_weights": {
                "type": "object",
                "description": "a weight per site, times its NUM_STEPS_CURRENT_ROUND",
            },
            "exchange_format": {
                "enum": list(EXCHANGE_FORMATS),
                "description": "the script gets torch tensors (pytorch) or numpy arrays",
            },
            "dp": {
                "type": ["object", "null"],
                "description": "server-side DP-FedAvg: {noise_multiplier, clip_norm, delta, "
                "adaptive, target_quantile, clip_learning_rate, clipped_count_stddev}",
            },
            "secure_aggregation": {
                "enum": ["masking", "he", None],
                "description": "the server sees only the sum: masking (SecAgg+) or "
                "homomorphic encryption (CKKS)",
            },
        },
    }

    def __post_init__(self) -> None:
        check_round_counts(self.min_clients, self.num_rounds)
        if self.params_transfer_type not in PARAMS_TRANSFER_TYPES:
            raise FieldError(
                "params_transfer_type",
                f"must be one of {list(PARAMS_TRANSFER_TYPES)}, got {self.params_transfer_type!r}",
            )
        check_key_metric(self.key_metric, self.key_metric_mode)
        object.__setattr__(
            self,
            "aggregator_args",
            check_aggregator(self.aggregator, self.aggregator_args, self.min_clients),
        )
        check_stop_options(self.stop_cond, self.patience)
        object.__setattr__(self, "exclude_vars", check_exclude_vars(self.exclude_vars))
        object.__setattr__(
            self,
            "aggregation_weights",
            check_aggregation_weights(self.aggregation_weights, self.aggregator),
        )
        if self.exchange_format not in EXCHANGE_FORMATS:
            raise FieldError(
                "exchange_format",
                f"must be one of {list(EXCHANGE_FORMATS)}, got {self.exchange_format!r}",
            )
        object.__setattr__(self, "dp", ServerDP.from_value(self.dp))
        if self.dp is not None:
            self.check_dp(self.dp)
        object.__setattr__(
            self,
            "secure_aggregation",
            check_secure_aggregation(
                self.secure_aggregation,
                workflow=self.name,
                min_clients=self.min_clients,
                aggregator=self.aggregator,
                aggregation_weights=self.aggregation_weights,
                dp=self.dp,
            ),
        )

    def check_dp(self, dp: ServerDP) -> None:
        """What DP-FedAvg's sensitivity analysis needs of the rest of the workflow."""
        if self.name not in DP_WORKFLOWS:
            raise FieldError(
                "dp",
                f"the {self.name} workflow cannot take server-side DP: its rounds release more "
                "than the clipped updates (use fedavg, fedprox or fedopt)",
            )
        if self.aggregator != "mean":
            raise FieldError(
                "dp",
                f"cannot be combined with aggregator={self.aggregator!r}: DP-FedAvg's noise is "
                "sized for a mean of clipped updates; a robust aggregate's sensitivity differs",
            )
        if self.aggregation_weights:
            raise FieldError(
                "dp",
                "cannot be combined with aggregation_weights: every site must count the same "
                "for the noise to cover its contribution",
            )
        if dp.adaptive and self.name == "fedopt":
            raise FieldError(
                "dp.adaptive",
                "FedOpt keeps the server optimizer's state only, so the adapted clip norm "
                "would be lost between rounds: use a fixed clip norm with FedOpt",
            )
        # The noise split must exist for the smallest round the job may run; more sites only
        # raise the default count noise.
        dp.update_noise_multiplier(self.min_clients)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FedAvg:
        return cls(**params_checked(cls.name, cls.PARAMETERS, params))

    def to_params(self) -> dict[str, Any]:
        params = asdict(self)
        params["aggregator_args"] = dict(self.aggregator_args)
        params["aggregation_weights"] = dict(self.aggregation_weights)
        params["dp"] = self.dp.to_json() if self.dp is not None else None
        # Options at their defaults stay out of the spec: job specs written before they
        # existed read the same, and a plain FedAvg job's spec is unchanged.
        for name, default in _OPTION_DEFAULTS.items():
            if params[name] == default:
                del params[name]
        return params

    def total_rounds(self, sites: Sequence[str]) -> int:
        return self.num_rounds

    @functools.cached_property
    def stop_condition(self) -> StopCondition | None:
        """``stop_cond`` read once (it was checked when the workflow was made)."""
        return check_stop_options(self.stop_cond, self.patience)

    def total_rounds_given(self, sites: Sequence[str], state: ServerState) -> int:
        """``num_rounds``, or fewer once ``stop_cond`` or ``patience`` stopped the job."""
        stopped = rounds_run_when_stopped(state.data)
        return self.num_rounds if stopped is None else stopped

    def initial_state(self, sites: Sequence[str]) -> ServerState:
        return ServerState()

    def train_meta(self) -> dict[str, Any]:
        """What every train task's ``FLModel.meta`` carries: with DIFF, the Client API sends
        the site's weights minus the global weights it received, NVFlare's way."""
        meta: dict[str, Any] = {}
        # Each key only when it is not the default: absent means FULL, nothing excluded,
        # torch tensors, so bundles made before these keys read the same.
        if self.params_transfer_type != "FULL":
            meta[TRANSFER_TYPE_META_KEY] = self.params_transfer_type
        if self.exclude_vars:
            meta[EXCLUDE_VARS_META_KEY] = self.exclude_vars
        if self.exchange_format != "pytorch":
            meta[EXCHANGE_FORMAT_META_KEY] = self.exchange_format
        if self.secure_aggregation:
            # The site's agent protects the update it sends (client_agent.secure_round).
            meta[SECURE_AGGREGATION_META_KEY] = self.secure_aggregation
        return meta

    def round_task(self, round_number: int) -> TaskSpec:
        return TaskSpec(
            task_name=TASK_TRAIN,
            current_round=round_number,
            total_rounds=self.num_rounds,
            meta=self.train_meta(),
        )

    def plan(self, round_number: int, sites: Sequence[str], state: ServerState) -> RoundPlan:
        return every_site(
            sites,
            self.round_task(round_number),
            min_results=self.min_clients,
            label=round_label(round_number),
        )

    def close(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        """The round closed by :meth:`close_round` (each workflow of the family has its own)
        over the tensors the sites share, then the excluded tensors put back unchanged and
        the early-stop count carried on."""
        from jobs.aggregation.sources import SubsetTensorSource, as_source, tensors_of

        kept = excluded(self.exclude_vars, as_source(global_model).specs())
        if kept:
            source = as_source(global_model)
            shared = SubsetTensorSource(source, set(source.specs()) - kept)
            outcome = self.close_round(round_number, plan, shared, results, state)
            if outcome.global_params is not None:
                unchanged = tensors_of(SubsetTensorSource(source, kept))
                outcome.global_params = {**outcome.global_params, **unchanged}
        else:
            outcome = self.close_round(round_number, plan, global_model, results, state)
        if self.stop_condition is not None:
            record = early_stop_after(
                self.stop_condition,
                self.patience,
                round_number,
                outcome.metrics,
                state.data.get(EARLY_STOP_STATE_KEY),
            )
            outcome.state = ServerState(
                tensors=outcome.state.tensors,
                data={**outcome.state.data, EARLY_STOP_STATE_KEY: record},
            )
        return outcome

    def weighted(self, updates: list[SiteUpdate]) -> list[SiteUpdate]:
        """The updates with ``aggregation_weights`` applied to their weights."""
        if not self.aggregation_weights:
            return updates
        return [
            dataclasses.replace(u, weight=u.weight * self.aggregation_weights.get(u.site, 1.0))
            for u in updates
        ]

    def close_round(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
    ) -> RoundOutcome:
        """Fold the round's accepted updates, in site-name order so the bits are repeatable."""
        from jobs.aggregation import weighted_metrics

        if self.dp is not None:
            return self.close_dp_round(round_number, plan, global_model, results, state, self.dp)
        updates = self.weighted(train_updates(list(results)))
        return RoundOutcome(
            global_params=fold(self.aggregator, self.aggregator_args, updates, global_model),
            state=state,
            metrics=weighted_metrics(updates),
            site_metrics={u.site: dict(u.metrics) for u in updates},
            sites=tuple(u.site for u in updates),
        )

    def close_dp_round(
        self,
        round_number: int,
        plan: RoundPlan,
        global_model: Mapping[str, torch.Tensor] | TensorSource,
        results: Sequence[TaskResult],
        state: ServerState,
        dp: ServerDP,
    ) -> RoundOutcome:
        """DP-FedAvg's round: ``global + Σᵢ clip(Δᵢ, C) / n + N(0, (z·C/n)²)``.

        ``n`` is the number of sites the round planned, not the number that answered: the
        fixed-denominator estimator of McMahan et al., whose sensitivity is C/n whoever
        answers (dividing by the answers would let a round with few of them reveal more,
        and bias only shrinks the step when sites drop out). ``NUM_STEPS_CURRENT_ROUND`` does
        not weigh the mean under DP: a site that claims many steps would otherwise move the
        model by more than C/n, past what the noise covers. Accounting is site-level, every
        site sampled every round (FedAvg plans them all): ε after ``r`` rounds is Opacus's
        RDP accountant for ``(z, 1.0, r)`` at δ.
        """
        import torch

        from jobs.aggregation import weighted_metrics
        from jobs.aggregation.dp import dp_fedavg
        from jobs.aggregation.sources import as_source

        updates = train_updates(list(results))
        sites = len(plan.tasks)
        clip_norm = dp.clip_norm
        carried = state.data.get(DP_STATE_KEY)
        if dp.adaptive and isinstance(carried, Mapping) and "clip_norm" in carried:
            clip_norm = float(carried["clip_norm"])
        update_sigma = dp.update_noise_multiplier(sites)
        generator = torch.Generator().manual_seed(noise_seed(dp.seed, round_number))
        params, clipped = dp_fedavg(
            updates,
            as_source(global_model),
            clip_norm=clip_norm,
            noise_std=update_sigma * clip_norm / sites,
            denominator=sites,
            generator=generator,
        )
        data = state.data
        if dp.adaptive:
            count_noise = torch.randn((), generator=generator, dtype=torch.float64).item()
            noised = clipped.unclipped + dp.count_stddev(sites) * count_noise
            next_clip = dp.next_clip_norm(clip_norm, noised / sites)
            data = {**state.data, DP_STATE_KEY: {"clip_norm": next_clip}}
        metrics = {
            **weighted_metrics(updates),
            **privacy_metrics(dp, rounds=round_number + 1, clip_norm=clip_norm),
        }
        return RoundOutcome(
            global_params=params,
            state=ServerState(tensors=state.tensors, data=data),
            metrics=metrics,
            site_metrics={u.site: dict(u.metrics) for u in updates},
            sites=tuple(u.site for u in updates),
        )


FEDPROX_MU_META_KEY = "fedprox_mu"

_OPTION_DEFAULTS: dict[str, Any] = {
    "params_transfer_type": "FULL",
    "stop_cond": None,
    "patience": None,
    "exclude_vars": None,
    "aggregation_weights": {},
    "exchange_format": "pytorch",
    "dp": None,
    "secure_aggregation": None,
}


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg whose train tasks carry the proximal weight ``fedprox_mu`` in ``FLModel.meta``
    (``meta["fedprox_mu"]``); the site script adds ``PTFedProxLoss(mu)`` (Li et al. 2020) to
    its loss. The server side is FedAvg's, aggregator included."""

    fedprox_mu: float = 0.01

    name: ClassVar[str] = "fedprox"
    PARAMETERS: ClassVar[dict[str, Any]] = {
        **FedAvg.PARAMETERS,
        "properties": {
            **FedAvg.PARAMETERS["properties"],
            "fedprox_mu": {
                "type": "number",
                "minimum": 0,
                "description": "the proximal term's weight mu, handed to the site script",
            },
        },
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        mu = check_finite_number("fedprox_mu", self.fedprox_mu)
        if mu < 0:
            raise FieldError("fedprox_mu", f"must be at least 0, got {self.fedprox_mu!r}")
        object.__setattr__(self, "fedprox_mu", mu)

    def round_task(self, round_number: int) -> TaskSpec:
        return TaskSpec(
            task_name=TASK_TRAIN,
            current_round=round_number,
            total_rounds=self.num_rounds,
            meta={**self.train_meta(), FEDPROX_MU_META_KEY: self.fedprox_mu},
        )
