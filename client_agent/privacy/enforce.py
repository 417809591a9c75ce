"""The site's policy applied to one result before it leaves: exclusion, clipping, noise.

Runs in the agent (and in SimEnv for each simulated site) after the client script answered
and before anything is uploaded, so a script that sends an unclipped update, or tensors the
site keeps, still results in a compliant upload. The protected quantity is the update, the
change ``Δ = local − global`` of the floating-point tensors:

1. tensors matching ``exclude_tensors`` are dropped from the file (the portal counts them as
   no change from this site);
2. ``Δ`` is clipped to L2 norm ``C`` (``clip_scope="model"``: one norm over every tensor;
   ``"layer"``: each tensor to ``C / √L``, so the whole stays within ``C``);
3. Gaussian noise of standard deviation ``σ·C`` is added to every coordinate, drawn from a
   generator seeded from the operating system's CSPRNG (``secrets``);
4. the file carries FULL (``global + Δ``) or DIFF (``Δ``) params, as the script sent them.

Integer and boolean tensors (BatchNorm's ``num_batches_tracked``) cannot carry noise: under
clipping they leave as the global model's values (no change), so they reveal nothing.
Tensors a script puts in ``FLModel.meta`` (SCAFFOLD's control variates) are derived from the
update and cannot be clipped with it: under clipping such a result is refused, not sent.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel, ParamsType
from client_agent.privacy.policy import PrivacyPolicy
from client_agent.wire import is_tensor_mapping, load_state_dict, read_model_file, write_model_file

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are handled, not with this module: the agent imports it to
# know PrivacyRefusal, and an agent whose policy rewrites nothing never needs torch (an agent
# process without it is about 130 MB smaller: a host can run many more of them).


class PrivacyRefusal(Exception):
    """A result the policy does not let leave; ``reason`` is what the round's failure says."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass
class Enforcement:
    """What enforcement did to one result. ``norm`` and ``clipped`` stay at the site: they
    describe the raw update, so sending them would leak what the noise hides."""

    excluded: list[str] = field(default_factory=list)
    norm: float = 0.0
    clipped: bool = False
    noise_std: float = 0.0
    seconds: float = 0.0


NOISE_CHUNK_ELEMENTS = 1 << 22
"""Noise is drawn in slices of this many elements, spread over one generator per thread:
drawing Gaussian noise is the enforcement's main cost, and one generator uses one core."""
CLIP_MARGIN = 1e-5
"""Clipping scales to ``C·(1 − CLIP_MARGIN)``: float32 rounding then never leaves an update
a hair over ``C``."""
NORM_BLOCK_ELEMENTS = 1 << 10
"""A norm is taken in float32 over blocks of this many elements and the blocks' squares are
summed in float64: torch's float32 norm of a whole 8M-element tensor is off by about 3e-4,
far over :data:`CLIP_MARGIN`, and an update clipped with it leaves over ``C``; a float64 norm
of the whole costs 40 times as long."""


def new_generators(count: int, seed: int | None = None) -> list[torch.Generator]:
    """``count`` generators for the noise, each seeded from the OS's CSPRNG (``secrets``), or
    from ``seed``, ``seed + 1``, … when a test gives one."""
    import torch

    generators = []
    for index in range(count):
        generator = torch.Generator()
        generator.manual_seed(secrets.randbits(63) if seed is None else seed + index)
        generators.append(generator)
    return generators


def privatize(
    params: dict[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    params_type: ParamsType | str,
    policy: PrivacyPolicy,
    seed: int | None = None,
) -> Enforcement:
    """Apply ``policy`` to ``params``, changing the dict and its float32 tensors in place (see
    the module's docstring). ``seed`` makes the noise repeatable, for tests only.

    ``base`` is the model the site received (the round's global model); ``params`` holds FULL
    weights or a DIFF against it. Tensors missing from ``base`` are refused: nothing without
    a reference point can be clipped.
    """
    import torch

    started = time.perf_counter()
    report = Enforcement(excluded=sorted(policy.excluded(params)))
    for name in report.excluded:
        del params[name]
    if not policy.changes_updates:
        report.seconds = time.perf_counter() - started
        return report
    full = ParamsType(params_type) == ParamsType.FULL
    unknown = sorted(set(params) - set(base))
    if unknown:
        raise PrivacyRefusal(
            f"tensors {unknown[:5]} are not in the model this site received, so they cannot "
            "be clipped against it"
        )
    deltas: dict[str, torch.Tensor] = {}
    for name, tensor in params.items():
        reference = base[name]
        if not tensor.dtype.is_floating_point:
            # No change leaves: the global's value (FULL) or zero (DIFF).
            params[name] = reference.clone() if full else torch.zeros_like(tensor)
            continue
        if tuple(tensor.shape) != tuple(reference.shape):
            raise PrivacyRefusal(
                f"tensor {name!r} has shape {list(tensor.shape)}, the model's is "
                f"{list(reference.shape)}"
            )
        delta = tensor.detach().to(torch.float32, copy=tensor.dtype != torch.float32)
        if not delta.is_contiguous():  # the noise is drawn into flat views of it
            delta = delta.contiguous()
        if full:
            delta.sub_(reference)
        deltas[name] = delta
    clip = float(policy.clip_norm or 0.0)
    squares = {n: _squared_norm(d) for n, d in deltas.items()}
    report.norm = math.sqrt(math.fsum(squares.values()))
    if policy.clip_scope == "layer" and deltas:
        per_tensor = clip / math.sqrt(len(deltas))
        for name, delta in deltas.items():
            norm = math.sqrt(squares[name])
            if norm > per_tensor * (1 - CLIP_MARGIN):
                delta.mul_(per_tensor * (1 - CLIP_MARGIN) / norm)
                report.clipped = True
    elif report.norm > clip * (1 - CLIP_MARGIN):
        scale = clip * (1 - CLIP_MARGIN) / report.norm
        for delta in deltas.values():
            delta.mul_(scale)
        report.clipped = True
    if policy.adds_noise:
        report.noise_std = policy.noise_multiplier * clip
        _add_noise(list(deltas.values()), report.noise_std, seed)
    for name, delta in deltas.items():
        if full:
            delta.add_(base[name])
        dtype = params[name].dtype
        params[name] = delta if dtype == torch.float32 else delta.to(dtype)
    report.seconds = time.perf_counter() - started
    return report


def _squared_norm(tensor: torch.Tensor) -> float:
    """``‖tensor‖₂²`` to about 1e-9 relative, at a sixth of the cost of a float64 norm (see
    :data:`NORM_BLOCK_ELEMENTS`)."""
    import torch

    flat = tensor.reshape(-1)
    whole = flat.numel() - flat.numel() % NORM_BLOCK_ELEMENTS
    blocks = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_BLOCK_ELEMENTS), dim=1)
    return float(blocks.double().square().sum()) + float(flat[whole:].double().square().sum())


def _add_noise(tensors: list[torch.Tensor], std: float, seed: int | None) -> None:
    """Add N(0, std²) to every element, in slices spread over one generator per thread. The
    slices each generator draws, and their order, depend only on the tensors' sizes: a seeded
    run is repeatable."""
    import torch

    slices = [
        flat[start : start + NOISE_CHUNK_ELEMENTS]
        for tensor in tensors
        for flat in (tensor.view(-1),)
        for start in range(0, flat.numel(), NOISE_CHUNK_ELEMENTS)
    ]
    workers = max(1, min(torch.get_num_threads(), len(slices)))
    generators = new_generators(workers, seed)

    def draw(worker: int) -> None:
        buffer = torch.empty(min(NOISE_CHUNK_ELEMENTS, max(s.numel() for s in slices)))
        for piece in slices[worker::workers]:
            noise = buffer[: piece.numel()].view_as(piece)
            noise.normal_(0.0, std, generator=generators[worker])
            piece.add_(noise)

    if workers == 1:
        draw(0)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(draw, range(workers)))


def enforce_file(
    result_path: str | Path,
    model_path: str | Path,
    out_path: str | Path,
    *,
    policy: PrivacyPolicy,
    report: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Enforcement:
    """Read a script's result file, apply ``policy`` against the model in ``model_path``, and
    write what may leave to ``out_path``, with ``report`` (and the excluded names) in its
    meta under :data:`PRIVACY_META_KEY`. A result without params (a validate task's metrics)
    is written as it is. Raises :class:`PrivacyRefusal` for a result that may not leave."""
    model = read_model_file(result_path)
    params = dict(model.params or {})
    meta = dict(model.meta or {})
    meta_tensors = [key for key, value in meta.items() if is_tensor_mapping(value)]
    enforcement = Enforcement()
    if params:
        if meta_tensors and policy.changes_updates:
            raise PrivacyRefusal(
                f"the result carries tensors in its meta ({', '.join(meta_tensors)}: SCAFFOLD's "
                "control variates, for one), derived from the update; under this site's "
                "clipping they would leave unclipped and without noise"
            )
        base = load_state_dict(model_path) if policy.changes_updates else {}
        enforcement = privatize(
            params,
            base,
            params_type=model.params_type or ParamsType.FULL,
            policy=policy,
            seed=seed,
        )
        for key in meta_tensors:  # only without clipping: drop the excluded names there too
            meta[key] = {n: t for n, t in meta[key].items() if n not in enforcement.excluded}
    meta[PRIVACY_META_KEY] = {**dict(report or {}), "excluded": enforcement.excluded}
    write_model_file(
        out_path,
        FLModel(
            params=params or None,
            params_type=model.params_type,
            metrics=model.metrics,
            meta=meta,
            start_round=model.start_round,
            current_round=model.current_round,
            total_rounds=model.total_rounds,
        ),
    )
    return enforcement
