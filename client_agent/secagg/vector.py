"""A model update as the one flat vector that secure aggregation sums, and back.

Both protections (masking and homomorphic encryption) add vectors, not named tensors: a site
lays out its weighted update as float64 in a fixed order (the global model's tensor names,
sorted, without those the job keeps at the sites), the server sums the sites' protected
vectors and lays the sum back out as tensors. The layout is the global model's, which the
site and the server both hold, so nothing about it travels.

The checks that need plaintext (the names, shapes and finiteness the portal checks on a plain
update) run here, at the site, before anything is masked or encrypted: once protected, the
server can only check sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class UpdateShapeError(ValueError):
    """A site's update that does not fit the global model's layout (checked at the site)."""


@dataclass(frozen=True)
class WeightedUpdate:
    """A site's update as the vector a round sums: ``weight`` × its tensors (``pieces``, 1-D,
    each in its own dtype, in the layout's order), checked (names, shapes, finite) but not
    copied into one float64 vector: a site quantizes it straight into its masks, so a
    25M-parameter model never takes the 200 MB more that the vector would."""

    pieces: tuple[np.ndarray, ...]
    weight: float

    def __len__(self) -> int:
        return sum(piece.size for piece in self.pieces)

    def array(self) -> np.ndarray:
        """The vector as one float64 array: weight × values, each product rounded once."""
        out = np.empty(len(self), dtype=np.float64)
        offset = 0
        for piece in self.pieces:
            np.multiply(piece, self.weight, out=out[offset : offset + piece.size], dtype=np.float64)
            offset += piece.size
        return out


def as_weighted(values: np.ndarray | WeightedUpdate) -> WeightedUpdate:
    """``values`` as a :class:`WeightedUpdate` (a float vector: its one piece, weight 1)."""
    if isinstance(values, WeightedUpdate):
        return values
    return WeightedUpdate((np.asarray(values).reshape(-1),), 1.0)


@dataclass(frozen=True)
class Layout:
    """The tensors a protected vector holds, in order: (name, shape) pairs."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]], *, kept: Sequence[str] = ()) -> Layout:
        """The layout over ``shapes`` (a global model's tensor shapes), sorted by name,
        without the tensors in ``kept`` (the job's ``exclude_vars``)."""
        skip = set(kept)
        return cls(
            tuple(
                (name, tuple(int(d) for d in shapes[name]))
                for name in sorted(shapes)
                if name not in skip
            )
        )

    @classmethod
    def for_model(cls, shapes: Mapping[str, Sequence[int]], exclude_vars: str | None) -> Layout:
        """The layout of a round over a global model of these tensor ``shapes``, less the
        tensors the job's ``exclude_vars`` (a regular expression, NVFlare's ``re.search``)
        keeps at the sites."""
        kept = [n for n in shapes if exclude_vars and re.search(exclude_vars, n)]
        return cls.of(shapes, kept=kept)

    @property
    def length(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tensors)

    def flatten(self, params: Mapping[str, Any], *, weight: float = 1.0) -> np.ndarray:
        """``weight`` × the tensors of ``params`` (torch tensors or arrays) as one float64
        vector. :class:`UpdateShapeError` names a missing, extra, misshapen or non-finite
        tensor."""
        return self.weighted(params, weight=weight).array()

    def weighted(self, params: Mapping[str, Any], *, weight: float = 1.0) -> WeightedUpdate:
        """``weight`` × the tensors of ``params`` as a :class:`WeightedUpdate`: checked like
        :meth:`flatten`, without the copy into one float64 vector."""
        missing = [name for name in self.names if name not in params]
        if missing:
            raise UpdateShapeError(f"the update has no tensor {missing[0]!r}")
        extra = sorted(set(params) - set(self.names))
        if extra:
            raise UpdateShapeError(
                f"the update has tensor {extra[0]!r}, which the round does not sum (not in "
                "the global model, or kept at the sites)"
            )
        if not math.isfinite(weight):
            raise UpdateShapeError(f"the update's weight is {weight}")
        pieces = []
        for name, shape in self.tensors:
            array = _as_array(params[name])
            if tuple(array.shape) != shape:
                raise UpdateShapeError(
                    f"tensor {name!r} has shape {tuple(array.shape)}, the global model's is {shape}"
                )
            if array.dtype.kind not in "biuf":
                raise UpdateShapeError(f"tensor {name!r} holds {array.dtype}, not numbers")
            # max and min, not isfinite: no temporary array; NaN makes both NaN.
            if array.size and not (math.isfinite(array.max()) and math.isfinite(array.min())):
                raise UpdateShapeError(f"tensor {name!r} holds NaN or Inf")
            pieces.append(array.reshape(-1))
        return WeightedUpdate(tuple(pieces), float(weight))

    def update_vector(
        self,
        params: Mapping[str, Any],
        *,
        weight: float,
        model_names: Collection[str],
        withheld: Collection[str] = (),
        global_params: Callable[[Collection[str]], Mapping[str, Any]] | None = None,
        diff: bool = False,
    ) -> WeightedUpdate:
        """A site's weighted update as the vector it protects. ``params`` are what it sends
        (its weights, or its change with ``diff``); a tensor its privacy policy ``withheld``
        counts as no change, as on a plain round (``global_params(names)`` gives the global
        tensors for FULL; zero for DIFF); tensors of the model outside the layout (kept at
        the sites by ``exclude_vars``) are not summed. Any name not in ``model_names`` is an
        :class:`UpdateShapeError`."""
        foreign = sorted(set(params) - set(model_names))
        if foreign:
            raise UpdateShapeError(f"the update has tensor {foreign[0]!r}, which the model has not")
        summed = {name: params[name] for name in self.names if name in params}
        missing = [name for name in self.names if name in set(withheld) and name not in params]
        if missing:
            if diff:
                for name in missing:
                    summed[name] = np.zeros(dict(self.tensors)[name])
            else:
                if global_params is None:
                    raise UpdateShapeError("withheld tensors need the global model's values")
                summed.update(global_params(missing))
        return self.weighted(summed, weight=weight)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The vector laid back out as arrays by name (views into ``vector``)."""
        if len(vector) != self.length:
            raise ValueError(f"a vector of {len(vector)} values, the layout holds {self.length}")
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in self.tensors:
            size = math.prod(shape)
            out[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        return out


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported here
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.asarray(value)  # its own dtype: the caller widens it as it copies
