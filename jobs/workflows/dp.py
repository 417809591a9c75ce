"""Server-side differential privacy for the FedAvg family: DP-FedAvg (McMahan et al. 2018,
"Learning differentially private recurrent language models"), with fixed clipping or the
adaptive clipping of Andrew et al. 2021 ("Differentially private learning with adaptive
clipping"), the two server-side options Flower users know.

What it protects: each *site's* whole contribution to a round (user-level privacy where the
user is a site). Every site's update is clipped to ``clip_norm`` on the worker, the clipped
updates are averaged over a fixed denominator, and Gaussian noise is added to the average, so
the released global model after ``T`` rounds is (ε, δ)-DP with respect to adding or removing
one site's data. What it does not protect: the updates themselves on their way to and on the
worker (the server is trusted with them; a site that does not trust the server wants the
agent's own update DP, which a site's privacy policy enforces), and individual records from
a site's peers inside the same site (record-level privacy is DP-SGD in the script).

This module checks the parameters and does the accounting; it imports no torch. The tensor
maths is :mod:`jobs.aggregation.dp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from common.validators import FieldError, check_finite_number, is_int, shown

DP_STATE_KEY = "server_dp"
"""The workflow's server state under this key: the clip norm adaptive clipping carries."""

EPSILON_METRIC = "privacy/epsilon"
DELTA_METRIC = "privacy/delta"
CLIP_NORM_METRIC = "privacy/clip_norm"
PRIVACY_METRICS = (EPSILON_METRIC, DELTA_METRIC, CLIP_NORM_METRIC)
"""The round metrics a DP round records: ε spent after the round (left out while it is
infinite, with no noise), the δ it is stated at, and the clip norm the round used."""

DEFAULT_COUNT_STDDEV_SHARE = 20
"""Without ``clipped_count_stddev``, the clipped count's noise is sites / 20 (Andrew et al.'s
suggestion, Flower's default)."""


@dataclass(frozen=True)
class ServerDP:
    """DP-FedAvg's settings: ``FedAvgRecipe(..., dp=ServerDP(noise_multiplier=1.0))``.

    ``noise_multiplier`` σ: the noise on the average has standard deviation σ·C/n, C the clip
    norm and n the sites planned for the round. ``clip_norm`` C: each site's update (local −
    global, whole-model L2 over the floating-point tensors) is scaled down to at most C.
    ``delta`` δ: the ε reported each round is stated at this δ; choose it well below one over
    the number of sites.

    ``adaptive``: C follows the ``target_quantile`` γ of the sites' update norms: after each
    round C ← C·exp(−η(b̃ − γ)), η the ``clip_learning_rate`` and b̃ the noised share of sites
    whose update norm was at most C (its count noised with ``clipped_count_stddev`` σ_b,
    default sites/20). Part of the privacy goes to that count: the update noise is raised to
    (σ⁻² − (2σ_b)⁻²)^(-1/2) so that the two together cost what σ alone would (Andrew et al.,
    Theorem 1), and the accounting is at σ. That needs σ < 2σ_b.

    ``seed`` makes the noise repeatable, for tests only: anyone who knows the seed can take
    the noise back out, so a real job leaves it None (the noise is then seeded from
    :mod:`secrets`).
    """

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        sigma = check_finite_number("dp.noise_multiplier", self.noise_multiplier)
        if sigma < 0:
            raise FieldError("dp.noise_multiplier", f"must be at least 0, got {sigma!r}")
        clip = check_finite_number("dp.clip_norm", self.clip_norm)
        if not clip > 0:
            raise FieldError("dp.clip_norm", f"must be greater than 0, got {clip!r}")
        delta = check_finite_number("dp.delta", self.delta)
        if not 0 < delta < 1:
            raise FieldError("dp.delta", f"must be between 0 and 1 (exclusive), got {delta!r}")
        if not isinstance(self.adaptive, bool):
            raise FieldError("dp.adaptive", f"must be true or false, got {shown(self.adaptive)}")
        quantile = check_finite_number("dp.target_quantile", self.target_quantile)
        if not 0 < quantile < 1:
            raise FieldError(
                "dp.target_quantile", f"must be between 0 and 1 (exclusive), got {quantile!r}"
            )
        rate = check_finite_number("dp.clip_learning_rate", self.clip_learning_rate)
        if not rate > 0:
            raise FieldError("dp.clip_learning_rate", f"must be greater than 0, got {rate!r}")
        count_stddev = self.clipped_count_stddev
        if count_stddev is not None:
            count_stddev = check_finite_number("dp.clipped_count_stddev", count_stddev)
            if count_stddev < 0:
                raise FieldError(
                    "dp.clipped_count_stddev", f"must be at least 0, got {count_stddev!r}"
                )
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise FieldError(
                "dp.seed", f"must be a non-negative integer or None, got {self.seed!r}"
            )
        for name, value in (
            ("noise_multiplier", sigma),
            ("clip_norm", clip),
            ("delta", delta),
            ("target_quantile", quantile),
            ("clip_learning_rate", rate),
            ("clipped_count_stddev", count_stddev),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def from_value(cls, value: Any) -> ServerDP | None:
        """``dp`` as a recipe or a job spec gives it: None, a :class:`ServerDP`, or its JSON
        object (a job bundle's spec); anything else, or an unknown key, names the field."""
        if value is None or isinstance(value, ServerDP):
            return value
        if not isinstance(value, Mapping):
            raise FieldError(
                "dp", f"must be a ServerDP, an object of its settings or None, got {shown(value)}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in value if key not in known)
        if unknown:
            raise FieldError(
                f"dp.{unknown[0]}", f"not a DP setting (known: {', '.join(sorted(known))})"
            )
        return cls(**value)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    # -- per round ------------------------------------------------------------------------

    def count_stddev(self, sites: int) -> float:
        """σ_b: the noise on the count of unclipped sites (adaptive clipping)."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        if self.noise_multiplier == 0:
            return 0.0  # no privacy is claimed, so none is spent on the count
        return sites / DEFAULT_COUNT_STDDEV_SHARE

    def update_noise_multiplier(self, sites: int) -> float:
        """The noise multiplier of the noise on the average: σ with fixed clipping; with
        adaptive clipping, the larger (σ⁻² − (2σ_b)⁻²)^(-1/2) that leaves the rest of σ's
        privacy to the clipped count. A :class:`FieldError` when no such value exists."""
        sigma = self.noise_multiplier
        if not self.adaptive or sigma == 0:
            return sigma
        count_stddev = self.count_stddev(sites)
        if not sigma < 2 * count_stddev:
            raise FieldError(
                "dp.clipped_count_stddev",
                f"adaptive clipping with noise_multiplier={sigma} needs clipped_count_stddev "
                f"above {sigma / 2} (noise_multiplier / 2); with {sites} site(s) it is "
                f"{count_stddev}: raise it, lower noise_multiplier, or clip at a fixed norm",
            )
        return float((sigma**-2 - (2 * count_stddev) ** -2) ** -0.5)

    def next_clip_norm(self, clip_norm: float, unclipped_share: float) -> float:
        """Adaptive clipping's geometric step toward the target quantile."""
        return clip_norm * math.exp(
            -self.clip_learning_rate * (unclipped_share - self.target_quantile)
        )

    def epsilon_after(self, rounds: int, sample_rate: float = 1.0) -> float:
        """ε at ``delta`` after ``rounds`` DP rounds, each a sample of ``sample_rate`` of the
        sites (Opacus's RDP accountant, through the agent's accounting module so that the
        portal and the agent count alike); ``inf`` without noise."""
        from client_agent.privacy.accounting import epsilon

        return epsilon([(self.noise_multiplier, sample_rate, rounds)], self.delta)


def privacy_metrics(
    dp: ServerDP, *, rounds: int, clip_norm: float, sample_rate: float = 1.0
) -> dict[str, float]:
    """The round metrics a DP round records (:data:`PRIVACY_METRICS`)."""
    metrics = {DELTA_METRIC: dp.delta, CLIP_NORM_METRIC: clip_norm}
    spent = dp.epsilon_after(rounds, sample_rate)
    if math.isfinite(spent):
        metrics[EPSILON_METRIC] = spent
    return metrics
