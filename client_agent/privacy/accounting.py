"""Privacy accounting: what a sequence of Gaussian mechanisms costs in (ε, δ).

The arithmetic is Opacus's Rényi-DP accountant (Mironov 2017; Mironov, Talwar and Zhang 2019
for the subsampled Gaussian), not ours: :func:`epsilon` hands Opacus a history of
``(noise_multiplier, sample_rate, steps)`` and asks for ε at δ. The agent (a site's own
spending), the portal (the spend it shows, the spend a job is expected to cost) and the
server-side DP recipe option all call these functions, so the same inputs give the same ε
everywhere, to the bit.

A *step* is one release of a clipped update with Gaussian noise of standard deviation
``noise_multiplier × clip_norm``. ``sample_rate`` is the chance that the protected unit takes
part in a step: 1.0 for a site's own update (its data is in every update it sends), the
fraction of sites sampled per round for server-side, site-level DP.

Only Opacus's RDP analysis module is loaded (``opacus/accountants/analysis/rdp.py``: numpy and
scipy), by its path, on first use: importing the ``opacus`` package imports torch (about 9 s
and 300 MB), which the portal's web workers otherwise never load. What ``RDPAccountant`` adds
on top of that module — the orders it searches and the sum over its history — is repeated in
:func:`_epsilon`; a test checks both give the same ε.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from pathlib import Path
from types import ModuleType

Step = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: Opacus's history entry."""

DEFAULT_DELTA = 1e-5
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
"""The Rényi orders ε is minimised over: ``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS``."""


def merged(history: Iterable[Step]) -> tuple[Step, ...]:
    """Consecutive entries with the same noise and sample rate as one (Opacus does the same)."""
    out: list[Step] = []
    for sigma, rate, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == rate:
            out[-1] = (sigma, rate, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(rate), int(steps)))
    return tuple(out)


def epsilon(history: Iterable[Step], delta: float) -> float:
    """ε at ``delta`` after the steps of ``history``; 0.0 for no step, ``inf`` when any step
    had no noise (a noiseless release of data-dependent values has no finite ε)."""
    steps = merged(history)
    if not steps:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in steps):
        return math.inf
    return _epsilon(steps, float(delta))


@cache
def _rdp_analysis() -> ModuleType:
    """Opacus's ``accountants/analysis/rdp.py``, loaded on its own (see the module's docstring)."""
    spec = importlib.util.find_spec("opacus")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("opacus is not installed: privacy accounting needs it")
    path = Path(spec.origin).parent / "accountants" / "analysis" / "rdp.py"
    module_spec = importlib.util.spec_from_file_location("_opacus_rdp_analysis", path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load Opacus's RDP analysis from {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[Step, ...], delta: float) -> float:
    """``RDPAccountant(history).get_epsilon(delta)``: the RDP of each entry at every order,
    summed (composition), converted to (ε, δ) at the best order."""
    rdp = _rdp_analysis()
    total = sum(
        rdp.compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
        for sigma, rate, steps in history
    )
    eps, _ = rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps)


def as_json(value: float | None) -> float | None:
    """ε as JSON carries it (the wire, the portal's fields): None when it is unbounded (a
    release without noise), since JSON has no infinity."""
    return value if value is None or math.isfinite(value) else None


def epsilon_after(
    noise_multiplier: float, steps: int, delta: float, sample_rate: float = 1.0
) -> float:
    """ε after ``steps`` releases with the same noise and sample rate."""
    return epsilon([(noise_multiplier, sample_rate, steps)], delta)


def steps_within(
    max_epsilon: float,
    noise_multiplier: float,
    delta: float,
    *,
    sample_rate: float = 1.0,
    spent: Sequence[Step] = (),
    most: int = 100_000,
) -> int:
    """How many more steps fit after ``spent`` without ε passing ``max_epsilon`` (at most
    ``most``). ε grows with every step, so a binary search over the count is exact. Cached:
    the portal asks it for every site and job on a page of approvals, mostly with the same
    numbers."""
    return _steps_within(
        float(max_epsilon),
        float(noise_multiplier),
        float(delta),
        float(sample_rate),
        merged(spent),
        int(most),
    )


@lru_cache(maxsize=4096)
def _steps_within(
    max_epsilon: float,
    noise_multiplier: float,
    delta: float,
    sample_rate: float,
    spent: tuple[Step, ...],
    most: int,
) -> int:
    def fits(count: int) -> bool:
        return epsilon((*spent, (noise_multiplier, sample_rate, count)), delta) <= max_epsilon

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= most and fits(high):
        low, high = high, high * 2
    high = min(high, most + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def noise_for_epsilon(
    target_epsilon: float, steps: int, delta: float, *, sample_rate: float = 1.0
) -> float:
    """The smallest noise multiplier (to 0.1 %) that keeps ``steps`` releases within
    ``target_epsilon``: what a site admin sets ``noise_multiplier`` to for a budget."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon!r}")
    low, high = 0.0, 1.0
    while epsilon_after(high, steps, delta, sample_rate) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier keeps {steps} steps within ε={target_epsilon}")
    while high - low > high * 1e-3:
        middle = (low + high) / 2
        if middle > 0 and epsilon_after(middle, steps, delta, sample_rate) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
