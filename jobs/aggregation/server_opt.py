"""FedOpt's server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization"): the round's
weighted-mean model, turned into a gradient, steps a real ``torch.optim`` optimizer.

Sign convention (NVFlare's): the server's gradient is the negated mean update,
``grad = global - aggregate``, so a descent step ``x - lr * grad`` moves the global model
toward the aggregate. SGD with ``lr=1`` and no momentum therefore gives the aggregate back
(FedAvg): bit for bit wherever ``global - aggregate`` is exact in the working dtype, as it is
for an aggregate within a factor of two of the global weight (Sterbenz), else within a
rounding. With momentum it is FedAvgM (Hsu et al. 2019). :class:`FedAdam`, :class:`FedYogi` and
:class:`FedAdagrad` are the paper's Algorithm 2, exactly: no bias correction, the second moment
starts at ``tau**2``, and ``x <- x + lr * m / (sqrt(v) + tau)`` with ``m`` the momentum of
the mean update.

:class:`ServerOptimizer` holds nothing between rounds. Each :meth:`ServerOptimizer.step`
rebuilds the optimizer (and its learning-rate scheduler) from the state the previous step
returned, as tensors and JSON, steps it once and hands the new state back: a worker killed
mid-round loses nothing, and a resumed job steps from the same bits as one that never stopped.

The optimizer's path comes from a job spec a user submitted and is resolved on the portal's
workers, so it is looked up in a table of the classes allowed here, never imported.
"""

from __future__ import annotations

import abc
import inspect
import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as torch_lr_scheduler
from torch.optim.lr_scheduler import LRScheduler

from common.validators import FieldError, check_int, is_number, shown

OPTIMIZER_FIELD = "optimizer_args"
SCHEDULER_FIELD = "lr_scheduler_args"
STATE_FORMAT = 1
"""Version of the layout :meth:`ServerOptimizer.step` stores its state in."""

_T = TypeVar("_T")
StateTensors = dict[str, torch.Tensor]
StateData = dict[str, Any]


# --------------------------------------------------------------------------------------------
# The paper's adaptive optimizers
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise FieldError(name, f"must be a finite number above 0, got {shown(value)}")
    return float(value)


def _check_decay(name: str, value: Any) -> float:
    """A momentum or moment decay: ``0 <= value < 1`` (1 would never forget, above diverges)."""
    if not is_number(value) or not 0 <= value < 1:
        raise FieldError(name, f"must be a number with 0 <= {name} < 1, got {shown(value)}")
    return float(value)


def _check_betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise FieldError(name, f"must be a pair (beta1, beta2), got {shown(value)}")
    return _check_decay(f"{name}[0]", value[0]), _check_decay(f"{name}[1]", value[1])


class _AdaptiveServerOptimizer(Optimizer, metaclass=abc.ABCMeta):
    """Reddi et al.'s Algorithm 2, for the subclass's second-moment rule.

    In gradient terms (``grad = -delta``): ``m <- beta1 m + (1 - beta1) grad`` is the negated
    paper's ``m``, the second moment sees ``grad**2 = delta**2`` either way, and
    ``x <- x - lr m / (sqrt(v) + tau)`` is the paper's ``x + eta m / (sqrt(v) + tau)``.
    ``tau`` guards the division and bounds how adaptive the step is; ``v`` starts at
    ``tau**2`` (the paper's ``v_{-1}``), ``m`` at zero.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        tau: float,
        **moments: Any,
    ) -> None:
        """``lr`` and ``tau`` checked here; ``moments`` (``betas``, or ``beta1``) by the
        subclass, which owns their meaning."""
        defaults = {"lr": _check_positive("lr", lr), **moments, "tau": _check_positive("tau", tau)}
        super().__init__(params, defaults)

    @abc.abstractmethod
    def _update_second_moment(
        self, second_moment: torch.Tensor, grad: torch.Tensor, group: Mapping[str, Any]
    ) -> None:
        """The subclass's rule for ``v``, in place."""

    def _beta1(self, group: Mapping[str, Any]) -> float:
        return float(group["betas"][0])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, tau, beta1 = group["lr"], group["tau"], self._beta1(group)
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not take sparse gradients")
                state = self.state[param]
                if not state:
                    state["momentum"] = torch.zeros_like(param)
                    state["second_moment"] = torch.full_like(param, tau * tau)
                momentum, second_moment = state["momentum"], state["second_moment"]
                momentum.mul_(beta1).add_(grad, alpha=1 - beta1)
                self._update_second_moment(second_moment, grad, group)
                param.addcdiv_(momentum, second_moment.sqrt().add_(tau), value=-lr)
        return loss


class FedAdam(_AdaptiveServerOptimizer):
    """FedAdam: ``v <- beta2 v + (1 - beta2) delta**2``.

    Defaults are Flower's ``FedAdam``: ``lr`` (the server's eta) 0.1, ``betas`` (0.9, 0.99),
    ``tau`` 1e-9.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-9,
    ) -> None:
        super().__init__(params, lr=lr, tau=tau, betas=_check_betas("betas", betas))

    def _update_second_moment(
        self, second_moment: torch.Tensor, grad: torch.Tensor, group: Mapping[str, Any]
    ) -> None:
        beta2 = float(group["betas"][1])
        second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


class FedYogi(_AdaptiveServerOptimizer):
    """FedYogi: ``v <- v - (1 - beta2) delta**2 sign(v - delta**2)``: ``v`` moves toward
    ``delta**2`` by a step that does not shrink with ``v``, so it grows slower than FedAdam's
    after a large update and decays slower after small ones.

    Defaults are Flower's ``FedYogi``: ``lr`` 0.01, ``betas`` (0.9, 0.99), ``tau`` 1e-3.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
    ) -> None:
        super().__init__(params, lr=lr, tau=tau, betas=_check_betas("betas", betas))

    def _update_second_moment(
        self, second_moment: torch.Tensor, grad: torch.Tensor, group: Mapping[str, Any]
    ) -> None:
        beta2 = float(group["betas"][1])
        squared = grad * grad
        direction = torch.sign(second_moment - squared)  # taken before v changes
        second_moment.addcmul_(squared, direction, value=-(1 - beta2))


class FedAdagrad(_AdaptiveServerOptimizer):
    """FedAdagrad: ``v <- v + delta**2``.

    It has no second decay, so it takes ``beta1`` (the momentum of ``m``) alone rather than a
    pair whose second half it would ignore. Defaults are Flower's ``FedAdagrad``: ``lr`` 0.1,
    ``beta1`` 0 (``m`` is the round's update), ``tau`` 1e-9.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        beta1: float = 0.0,
        tau: float = 1e-9,
    ) -> None:
        super().__init__(params, lr=lr, tau=tau, beta1=_check_decay("beta1", beta1))

    def _beta1(self, group: Mapping[str, Any]) -> float:
        return float(group["beta1"])

    def _update_second_moment(
        self, second_moment: torch.Tensor, grad: torch.Tensor, group: Mapping[str, Any]
    ) -> None:
        second_moment.addcmul_(grad, grad)


# --------------------------------------------------------------------------------------------
# What a job spec may name
# --------------------------------------------------------------------------------------------

REFUSED_OPTIMIZERS = {
    "LBFGS": "it re-evaluates the loss through a closure, and the server has no loss",
    "SparseAdam": "it takes sparse gradients only, and the server's gradient is dense",
    "Muon": "it optimizes 2-D matrices only, and a model also has biases and norms",
}
REFUSED_SCHEDULERS = {
    "LambdaLR": "it takes a Python function, which a job spec cannot carry",
    "MultiplicativeLR": "it takes a Python function, which a job spec cannot carry",
    "SequentialLR": "it takes scheduler objects, which a job spec cannot carry",
    "ChainedScheduler": "it takes scheduler objects, which a job spec cannot carry",
    "ReduceLROnPlateau": "it steps on a validation metric, and the server steps once a round",
}


def _classes(
    namespace: Any, base: type[_T], prefix: str, refused: Mapping[str, str]
) -> dict[str, type[_T]]:
    """The public subclasses of ``base`` that ``namespace`` exports, by every accepted path."""
    found: dict[str, type[_T]] = {}
    for name, value in vars(namespace).items():
        if name.startswith("_") or name in refused or not isinstance(value, type):
            continue
        if not issubclass(value, base) or value is base:
            continue
        found[f"{prefix}.{name}"] = value
    return found


_TORCH_OPTIMIZERS = _classes(torch.optim, Optimizer, "torch.optim", REFUSED_OPTIMIZERS)
_OWN_OPTIMIZERS: dict[str, type[Optimizer]] = {
    f"{__name__}.{cls.__name__}": cls for cls in (FedAdam, FedYogi, FedAdagrad)
}
ALLOWED_OPTIMIZERS: dict[str, type[Optimizer]] = {**_TORCH_OPTIMIZERS, **_OWN_OPTIMIZERS}
"""Canonical dotted path -> class, for every optimizer a job may name."""
ALLOWED_SCHEDULERS: dict[str, type[LRScheduler]] = _classes(
    torch_lr_scheduler,
    LRScheduler,
    "torch.optim.lr_scheduler",
    REFUSED_SCHEDULERS,
)
"""Canonical dotted path -> class, for every learning-rate scheduler a job may name."""


def _aliases(allowed: Mapping[str, type]) -> dict[str, str]:
    """Each accepted spelling -> its canonical path: the path itself, the class name alone,
    and the dotted path of the module that defines it (``torch.optim.sgd.SGD``)."""
    aliases: dict[str, str] = {}
    for path, cls in allowed.items():
        aliases[path] = path
        aliases[cls.__name__] = path
        aliases[f"{cls.__module__}.{cls.__name__}"] = path
    return aliases


_OPTIMIZER_ALIASES = _aliases(ALLOWED_OPTIMIZERS)
_SCHEDULER_ALIASES = _aliases(ALLOWED_SCHEDULERS)

RESERVED_OPTIMIZER_ARGS = {"params": "the server passes the model's tensors itself"}
RESERVED_SCHEDULER_ARGS = {
    "optimizer": "the server passes its optimizer itself",
    "last_epoch": "the server restores the scheduler's position from the job's state",
}

_OPTIMIZER_RANGES: dict[str, Callable[[str, Any], Any]] = {
    "lr": _check_positive,
    "momentum": _check_decay,
    "beta1": _check_decay,
    "betas": _check_betas,
    "tau": _check_positive,
}
"""Ranges torch leaves open or checks with a message that does not say which argument."""

_SCHEDULER_RANGES: dict[str, Callable[[str, Any], Any]] = {
    "step_size": lambda name, value: check_int(name, value, low=1),
    "T_max": lambda name, value: check_int(name, value, low=1),
    "T_0": lambda name, value: check_int(name, value, low=1),
    "gamma": _check_positive,
}
"""Scheduler arguments torch does not check, and fails on only when it steps (StepLR's
``step_size=0`` is a division by zero in a later round)."""


# --------------------------------------------------------------------------------------------
# Checking {"path": ..., "args": {...}}
# --------------------------------------------------------------------------------------------


def _resolve(
    field: str,
    spec: Any,
    allowed: Mapping[str, type],
    aliases: Mapping[str, str],
    prefix: str,
    refused: Mapping[str, str],
) -> tuple[str, dict[str, Any]]:
    """The canonical path and the JSON arguments of a ``{"path", "args"}`` mapping: a lookup
    in ``allowed`` (through ``aliases``), never an import. ``refused`` names classes of
    ``prefix`` that exist but cannot run here, with the reason."""
    if not isinstance(spec, Mapping):
        raise FieldError(
            field, f'must be an object like {{"path": ..., "args": {{...}}}}, got {shown(spec)}'
        )
    unknown = sorted(
        str(key) for key in spec if key not in ("path", "class_path", "args", "config_type")
    )
    if unknown:
        raise FieldError(field, f"unknown key {unknown[0]!r}; it takes: path, args")
    # NVFlare's configs mark these mappings "config_type": "dict" and accept "class_path".
    if spec.get("config_type", "dict") != "dict":
        raise FieldError(field, f'config_type must be "dict", got {shown(spec["config_type"])}')
    paths = [spec[key] for key in ("path", "class_path") if key in spec]
    if not paths:
        raise FieldError(field, 'needs a "path" (NVFlare\'s "class_path" is read too)')
    if len(paths) == 2 and paths[0] != paths[1]:
        raise FieldError(
            field, f'"path" and "class_path" differ: {shown(paths[0])}, {shown(paths[1])}'
        )
    path = paths[0]
    canonical = aliases.get(path) if isinstance(path, str) else None
    if canonical is None:
        for name, reason in refused.items():
            if path in (name, f"{prefix}.{name}"):
                raise FieldError(field, f"{path} cannot run on the server: {reason}")
        listed = ", ".join(sorted(allowed))
        raise FieldError(
            field,
            f"{shown(path)} is not a class the server may run; allowed (or the class name "
            f"alone): {listed}",
        )
    args = spec.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, Mapping) or not all(isinstance(key, str) for key in args):
        raise FieldError(field, f"args of {canonical} must be an object, got {shown(args)}")
    plain: dict[str, Any] = {}
    for name, value in args.items():
        # JSON in, JSON out: the job spec stores these, and a tensor or NaN must fail here.
        try:
            plain[name] = _json_form(value)
        except (TypeError, ValueError) as exc:
            raise FieldError(
                field, f"args.{name} of {canonical} must be a plain JSON value: {exc}"
            ) from None
    return canonical, plain


def _check_args(
    field: str,
    path: str,
    cls: type,
    args: Mapping[str, Any],
    reserved: Mapping[str, str],
    skip: int,
    ranges: Mapping[str, Callable[[str, Any], Any]],
) -> None:
    """Names, types (from each default's type) and ranges, before torch sees the arguments.

    ``skip`` is how many leading parameters the server fills itself (``params``,
    ``optimizer``).
    """
    parameters = list(inspect.signature(cls).parameters.values())[skip:]
    by_name = {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    for name in sorted(args):
        if name in reserved:
            raise FieldError(field, f"args.{name} cannot be set: {reserved[name]}")
        if name not in by_name and not takes_any:
            listed = ", ".join(n for n in by_name if n not in reserved)
            raise FieldError(field, f"{path} has no argument {name!r}; it takes: {listed}")
    for name, parameter in by_name.items():
        if parameter.default is parameter.empty and name not in args:
            raise FieldError(field, f"{path} needs args.{name}")
    for name, value in args.items():
        declared = by_name.get(name)
        if declared is not None and declared.default is not declared.empty:
            _check_like_default(field, f"args.{name} of {path}", value, declared.default)
        if name in ranges:
            try:
                ranges[name](name, value)
            except FieldError as exc:
                raise FieldError(field, f"args.{name} of {path} {exc.reason}") from None


def _check_like_default(field: str, what: str, value: Any, default: Any) -> None:
    """``value`` has the kind of type ``default`` has: a bool for a bool, a number for a
    number, a list as long as a tuple; a default of None says nothing."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise FieldError(field, f"{what} must be true or false, got {shown(value)}")
    elif is_number(default):
        if not is_number(value) or not math.isfinite(value):
            raise FieldError(field, f"{what} must be a finite number, got {shown(value)}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise FieldError(field, f"{what} must be a string, got {shown(value)}")
    elif isinstance(default, tuple):
        if not isinstance(value, list) or len(value) != len(default):
            raise FieldError(field, f"{what} must be a list of {len(default)}, got {shown(value)}")
        for index, (item, item_default) in enumerate(zip(value, default, strict=True)):
            _check_like_default(field, f"{what}[{index}]", item, item_default)


def _as_call_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """JSON arguments as torch expects them: a JSON list stands for a tuple (``betas``)."""
    return {
        name: tuple(value) if isinstance(value, list) else value for name, value in args.items()
    }


def _json_form(value: Any) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


def _restored_like(fresh: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (read back from JSON) in the Python types of a freshly built ``fresh``.

    JSON has no tuples and only string keys: a value the arguments fixed and that has not
    changed (MultiStepLR's ``milestones``, a Counter keyed by round) is kept as built; a
    changed one takes the saved value, as a tuple where the fresh one is a tuple (``betas``).
    """
    restored = dict(saved)
    for key, saved_value in saved.items():
        if key not in fresh:
            continue
        fresh_value = fresh[key]
        if _json_form(fresh_value) == saved_value:
            restored[key] = fresh_value
        elif isinstance(fresh_value, tuple) and isinstance(saved_value, list):
            restored[key] = tuple(saved_value)
        elif isinstance(fresh_value, Mapping) and not all(isinstance(k, str) for k in fresh_value):
            raise FieldError("state_data", f"cannot restore {key!r}: its keys are not strings")
    return restored


# --------------------------------------------------------------------------------------------
# The server optimizer
# --------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating-point tensor of ``dtype`` is optimized in: float64 stays, the rest
    (float16, bfloat16, float32) work in float32 and are cast back."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ServerOptimizer:
    """A server optimizer and an optional learning-rate scheduler, named as NVFlare's FedOpt
    names them: ``{"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}`` and
    ``{"path": "torch.optim.lr_scheduler.StepLR", "args": {"step_size": 10}}``.

    The constructor checks both against the allowed classes and their signatures, then builds
    them on a one-element tensor and steps them once, so that every error is a
    :class:`FieldError` naming ``optimizer_args`` or ``lr_scheduler_args`` before a round runs.
    The scheduler steps once a round, after the optimizer.
    """

    def __init__(
        self, optimizer_args: Mapping[str, Any], lr_scheduler_args: Mapping[str, Any] | None = None
    ) -> None:
        self.optimizer_path, self.optimizer_kwargs = _resolve(
            OPTIMIZER_FIELD,
            optimizer_args,
            ALLOWED_OPTIMIZERS,
            _OPTIMIZER_ALIASES,
            "torch.optim",
            REFUSED_OPTIMIZERS,
        )
        self.optimizer_class = ALLOWED_OPTIMIZERS[self.optimizer_path]
        _check_args(
            OPTIMIZER_FIELD,
            self.optimizer_path,
            self.optimizer_class,
            self.optimizer_kwargs,
            RESERVED_OPTIMIZER_ARGS,
            1,
            _OPTIMIZER_RANGES,
        )
        self.scheduler_path: str | None = None
        self.scheduler_kwargs: dict[str, Any] | None = None
        self.scheduler_class: type[LRScheduler] | None = None
        if lr_scheduler_args is not None:
            self.scheduler_path, self.scheduler_kwargs = _resolve(
                SCHEDULER_FIELD,
                lr_scheduler_args,
                ALLOWED_SCHEDULERS,
                _SCHEDULER_ALIASES,
                "torch.optim.lr_scheduler",
                REFUSED_SCHEDULERS,
            )
            self.scheduler_class = ALLOWED_SCHEDULERS[self.scheduler_path]
            _check_args(
                SCHEDULER_FIELD,
                self.scheduler_path,
                self.scheduler_class,
                self.scheduler_kwargs,
                RESERVED_SCHEDULER_ARGS,
                1,
                _SCHEDULER_RANGES,
            )
        self._try_on_one_element()

    @classmethod
    def from_args(
        cls, optimizer_args: Mapping[str, Any], lr_scheduler_args: Mapping[str, Any] | None = None
    ) -> ServerOptimizer:
        return cls(optimizer_args, lr_scheduler_args)

    def to_args(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(optimizer_args, lr_scheduler_args)`` as JSON, with canonical dotted paths."""
        optimizer = {"path": self.optimizer_path, "args": _json_form(self.optimizer_kwargs)}
        if self.scheduler_path is None:
            return optimizer, None
        return optimizer, {"path": self.scheduler_path, "args": _json_form(self.scheduler_kwargs)}

    # -- building ------------------------------------------------------------------------

    def _build(self, params: Sequence[torch.Tensor]) -> tuple[Optimizer, LRScheduler | None]:
        optimizer = self.optimizer_class(list(params), **_as_call_args(self.optimizer_kwargs))
        return optimizer, self._scheduler_for(optimizer)

    def _scheduler_for(self, optimizer: Optimizer) -> LRScheduler | None:
        if self.scheduler_class is None:
            return None
        return self.scheduler_class(optimizer, **_as_call_args(self.scheduler_kwargs or {}))

    def _try_on_one_element(self) -> None:
        """Build, step and save on a dummy tensor: torch's own checks, and those that only
        fail when a step runs or its state is stored, fire now."""
        field = OPTIMIZER_FIELD
        try:
            param = torch.zeros(1)
            optimizer = self.optimizer_class([param], **_as_call_args(self.optimizer_kwargs))
            field = SCHEDULER_FIELD
            scheduler = self._scheduler_for(optimizer)
            field = OPTIMIZER_FIELD
            param.grad = torch.ones(1)
            optimizer.step()
            field = SCHEDULER_FIELD
            if scheduler is not None:
                scheduler.step()
            field = OPTIMIZER_FIELD if scheduler is None else SCHEDULER_FIELD
            self._save(optimizer, scheduler, ["dummy"], 1)
        except FieldError:
            raise
        except Exception as exc:  # torch's own refusals are TypeError, ValueError, KeyError…
            path = self.optimizer_path if field == OPTIMIZER_FIELD else self.scheduler_path
            raise FieldError(field, f"{path} refused its arguments: {exc}") from None

    # -- a round -------------------------------------------------------------------------

    def step(
        self,
        global_params: Mapping[str, torch.Tensor],
        aggregate: Mapping[str, torch.Tensor],
        state_tensors: Mapping[str, torch.Tensor],
        state_data: Mapping[str, Any],
        *,
        buffers: Collection[str] = (),
    ) -> tuple[dict[str, torch.Tensor], StateTensors, StateData]:
        """One server step from ``global_params`` toward ``aggregate`` (the round's weighted
        mean, a full model with the same names, shapes and dtypes), on the CPU.

        Floating-point tensors are optimized with ``grad = global - aggregate`` (in
        :func:`compute_dtype`, cast back); the others (BatchNorm's ``num_batches_tracked``)
        and those named in ``buffers`` take the aggregate's value. ``buffers`` is for a
        module's float buffers (BatchNorm's running mean and variance), which NVFlare's FedOpt
        averages rather than optimizes: an adaptive step moves every coordinate by about
        ``lr`` and can make a small running variance negative. ``state_tensors``/
        ``state_data`` are what the previous step returned (both empty in the first round);
        the new ones come back with the new model, and nothing passed in is changed.
        """
        _check_same_layout(global_params, aggregate)
        unknown = sorted(set(buffers) - set(global_params))
        if unknown:
            raise FieldError("buffers", f"names tensors the model does not have: {unknown}")
        # Sorted: the optimizer's state is indexed by position, and a model read back from a
        # file need not list its tensors in the order they were written.
        names = sorted(
            name
            for name, tensor in global_params.items()
            if tensor.dtype.is_floating_point and name not in buffers
        )
        if not names:
            raise FieldError("global_params", "has no floating-point tensor to optimize")
        working = {
            name: global_params[name]
            .detach()
            .to(device="cpu", dtype=compute_dtype(global_params[name].dtype), copy=True)
            for name in names
        }
        optimizer, scheduler = self._build([working[name] for name in names])
        rounds = 0
        if state_data:
            rounds = self._restore(optimizer, scheduler, names, state_tensors, state_data)
        elif state_tensors:
            raise FieldError("state_data", "is empty while state_tensors is not")
        for name in names:
            param = working[name]
            param.grad = param - aggregate[name].detach().to(device="cpu", dtype=param.dtype)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        new_tensors, new_data = self._save(optimizer, scheduler, names, rounds + 1)
        new_params: dict[str, torch.Tensor] = {}
        for name, tensor in global_params.items():
            if name in working:
                new_params[name] = working[name].to(tensor.dtype)
            else:
                new_params[name] = aggregate[name].detach().to("cpu", copy=True)
        return new_params, new_tensors, new_data

    # -- state ---------------------------------------------------------------------------

    def _save(
        self, optimizer: Optimizer, scheduler: LRScheduler | None, names: Sequence[str], rounds: int
    ) -> tuple[StateTensors, StateData]:
        saved = optimizer.state_dict()
        tensors: StateTensors = {}
        values: dict[str, dict[str, Any]] = {}
        for index, stats in saved["state"].items():
            name = names[index]
            for stat, value in stats.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{name}/{stat}"] = value.detach().contiguous()
                else:  # SGD without momentum keeps momentum_buffer None
                    values.setdefault(name, {})[stat] = value
        data = {
            "format": STATE_FORMAT,
            "optimizer": self.optimizer_path,
            "lr_scheduler": self.scheduler_path,
            "rounds": rounds,
            "param_names": list(names),
            "tensor_names": sorted(tensors),
            "param_groups": _param_groups(optimizer),
            "optimizer_values": values,
            "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        }
        # Returned as a store would give it back, so a resumed job reads the same values.
        return tensors, _json_form(data)

    def _restore(
        self,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        names: Sequence[str],
        state_tensors: Mapping[str, torch.Tensor],
        state_data: Mapping[str, Any],
    ) -> int:
        """Load the previous step's state into a freshly built optimizer and scheduler; the
        number of rounds stepped so far."""
        if state_data.get("format") != STATE_FORMAT:
            raise FieldError("state_data", f"unknown format {shown(state_data.get('format'))}")
        for key, mine in (
            ("optimizer", self.optimizer_path),
            ("lr_scheduler", self.scheduler_path),
        ):
            if state_data.get(key) != mine:
                raise FieldError(
                    "state_data", f"was saved by {key} {shown(state_data.get(key))}, not {mine!r}"
                )
        if state_data.get("param_names") != list(names):
            raise FieldError(
                "state_data",
                "was saved for other tensors than the model's floating-point ones "
                f"({shown(state_data.get('param_names'))} vs {shown(list(names))})",
            )
        # A tensor lost on the way would restart its statistics silently: refuse instead.
        if sorted(state_tensors) != state_data.get("tensor_names"):
            listed = set(state_data.get("tensor_names") or ())
            raise FieldError(
                "state_tensors",
                f"missing {sorted(listed - set(state_tensors))}, "
                f"unexpected {sorted(set(state_tensors) - listed)}",
            )
        index_of = {name: index for index, name in enumerate(names)}
        stats: dict[int, dict[str, Any]] = {}
        for name, values in state_data["optimizer_values"].items():
            if name not in index_of:
                raise FieldError("state_data", f"has values for an unknown tensor {shown(name)}")
            stats.setdefault(index_of[name], {}).update(values)
        for key, tensor in state_tensors.items():
            prefix, _, stat = key.rpartition("/")
            name = prefix.removeprefix("optimizer/")
            if not prefix.startswith("optimizer/") or name not in index_of:
                raise FieldError("state_tensors", f"unexpected tensor {shown(key)}")
            # A copy: the optimizer steps its state in place, and the caller's must not change.
            stats.setdefault(index_of[name], {})[stat] = tensor.detach().to("cpu", copy=True)
        fresh_groups = optimizer.state_dict()["param_groups"]
        saved_groups = state_data["param_groups"]
        if len(saved_groups) != len(fresh_groups):
            raise FieldError("state_data", "has another number of parameter groups")
        groups = [
            {**_restored_like(fresh, saved), "params": fresh["params"]}
            for fresh, saved in zip(fresh_groups, saved_groups, strict=True)
        ]
        optimizer.load_state_dict({"state": stats, "param_groups": groups})
        # load_state_dict casts every state tensor but "step" to its parameter's dtype, where
        # a live optimizer keeps some scalars in float32 (NAdam's mu_product next to a float64
        # parameter): put the saved tensors back as they were, or the next step differs.
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for index, values in stats.items():
            optimizer.state[params[index]].update(values)
        if scheduler is not None:
            scheduler.load_state_dict(
                _restored_like(scheduler.state_dict(), state_data["scheduler_state"])
            )
        return int(state_data["rounds"])


def _param_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The optimizer's hyperparameters (lr as the scheduler left it), without its tensors."""
    return [
        {key: value for key, value in group.items() if key != "params"}
        for group in optimizer.state_dict()["param_groups"]
    ]


def _check_same_layout(
    global_params: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
) -> None:
    if set(global_params) != set(aggregate):
        missing = sorted(set(global_params) - set(aggregate))
        extra = sorted(set(aggregate) - set(global_params))
        raise FieldError(
            "aggregate",
            f"has other tensors than the global model (missing {missing}, extra {extra})",
        )
    for name, tensor in global_params.items():
        other = aggregate[name]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise FieldError(
                "aggregate",
                f"{name!r} is {other.dtype} {tuple(other.shape)}, the global model's is "
                f"{tensor.dtype} {tuple(tensor.shape)}",
            )


__all__ = [
    "ALLOWED_OPTIMIZERS",
    "ALLOWED_SCHEDULERS",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "ServerOptimizer",
    "compute_dtype",
]
