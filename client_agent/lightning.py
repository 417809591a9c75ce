"""PyTorch Lightning adapter: ``patch(trainer)`` makes a Lightning script a federated client.

Used as ``import client_agent.lightning as flare``; a script written for NVFlare's
``nvflare.client.lightning`` runs after changing only that import::

    flare.patch(trainer)
    while flare.is_running():
        trainer.validate(model, datamodule=dm)   # scores the received global model
        trainer.fit(model, datamodule=dm)        # trains it; the result is sent

``patch`` adds a Lightning ``Callback`` to the trainer (first in its list, so that the other
callbacks already see the global model) and, on global rank 0, calls ``init()``. The callback
is built from the package the trainer belongs to, ``lightning.pytorch`` or
``pytorch_lightning``: they are different packages whose classes do not mix.

What happens in a round (one task of the runtime, one pass of the loop above):

- **Receive.** The first ``validate()`` or ``fit()`` of the round receives the task and loads
  its global model into the LightningModule (``on_validation_start`` of an explicit
  ``validate()``, else ``on_fit_start``, which runs before the sanity check). Tensor names and
  shapes are checked first and a mismatch raises :class:`GlobalModelMismatch` naming every
  key at fault. With ``load_state_dict_strict=False``, keys the module does not have are
  dropped and keys the global model lacks keep their local values, each with a warning; a
  shape mismatch is an error in both modes.
- **Score.** The metrics of an explicit ``trainer.validate()`` run before ``fit()`` in the
  round (``trainer.callback_metrics`` at ``on_validation_end``, scalars only) score the
  received model and go back with the update as ``FLModel.metrics``. The sanity check and
  the validation inside ``fit()`` do not count.
- **Send.** At ``on_fit_end`` the trained weights go back as FULL params on the CPU, with
  ``meta["NUM_STEPS_CURRENT_ROUND"]`` = the change in ``trainer.global_step`` during that fit
  (the optimizer steps really taken, FedAvg's weight).
- **Carry state over** (``restore_state=True``). Lightning makes new optimizers on every
  ``fit()``. The state dicts of the optimizers, LR schedulers and the AMP grad scaler are kept
  at ``on_fit_end`` and loaded into the new ones at the next ``on_fit_start``.
- **Grow the fit loop** (``update_fit_loop=True``). A second ``fit()`` on the same trainer
  would stop at once (``max_epochs`` reached), so each ``fit()`` sets ``max_epochs`` to
  ``current_epoch`` + the configured value, and ``max_steps`` (when set) to ``global_step`` +
  the configured value: round 1 runs ``max_epochs`` as configured, round 2 to twice that, …
- **Evaluate and submit-model tasks.** For an evaluate task (``is_evaluate()``) the
  ``validate()`` sends its metrics only, no params. For a submit-model task it sends the local
  weights with its metrics. Once a round's result is sent, ``fit()`` trains nothing until the
  next ``is_running()``, so the loop above costs no training on an evaluate task. A ``fit()``
  on an evaluate task with no ``validate()`` before it answers with no metrics and a warning.
- **Metrics** logged with ``self.log`` reach the run's metrics with no extra code, by two
  paths: the explicit ``validate()``'s metrics as ``FLModel.metrics`` of the result
  (``run.metrics.site(site, key)`` at the round, and the round's weighted mean in
  ``run.metrics.aggregated(key)``, which also picks ``run.best_model``), and, at the end of
  every training epoch, every scalar in ``trainer.callback_metrics`` (training and in-fit
  validation metrics) through ``log(key, value, step=trainer.global_step)``
  (``run.metrics.logged(key, site)``, tagged with the round).
- **Several processes** (DDP and the like). Only global rank 0 talks to the runtime. The
  other ranks get the task and its model, and ``is_running()``'s answer, from rank 0 through
  ``trainer.strategy.broadcast``; they load the model, grow the fit loop and keep their own
  optimizer state the same way, and send nothing. ``is_running()`` and ``receive()`` of this
  module work on every rank; the other functions are the Client API's and belong to rank 0
  (``trainer.is_global_zero``). So that they can broadcast from the first call, ``patch``
  starts the other processes and the process group itself (Lightning would at the first
  ``validate()``/``fit()``). Strategies that train in processes they spawn (``ddp_spawn``,
  ``ddp_notebook``) are refused: their rank 0 is not the process the runtime started.

After the job is over (``is_running()`` False), ``validate()`` and ``fit()`` are plain local
Lightning again and nothing is sent.

Differences from NVFlare's adapter, as far as a user can see them:

- the global model is loaded at ``on_fit_start`` (before the sanity check) and the result
  sent at ``on_fit_end``, not at the train-loop hooks;
- ``NUM_STEPS_CURRENT_ROUND`` is the measured change in ``trainer.global_step``, never an
  estimate;
- ``max_epochs``/``max_steps`` grow from where the last fit stopped (``current_epoch`` +
  configured), so an early-stopped round does not make the next one longer;
- the callback goes first in ``trainer.callbacks``, so user callbacks see the global model
  in their own ``on_fit_start``;
- training-epoch metrics are forwarded with ``log()`` automatically;
- after an evaluate task's result is sent, the ``fit()`` of the same loop pass trains nothing;
- params always go back FULL; optimizer state never leaves the site;
- the callback works for ``lightning.pytorch`` and ``pytorch_lightning`` trainers alike;
- use this module's ``is_running()`` (it marks the round boundary) rather than
  ``client_agent.api``'s in a patched script.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from client_agent import api
from client_agent.api import (
    ClientAPIError,
    FLMetaKey,
    FLModel,
    ParamsType,
    get_config,
    get_job_id,
    get_site_name,
    init,
    is_evaluate,
    is_submit_model,
    is_train,
    log,
    send,
    shutdown,
    system_info,
)
from client_agent.fl_model import TASK_NAME_META_KEY, AlgorithmConstants
from client_agent.pt import PTScaffoldHelper, get_fedprox_mu, get_lr_values
from client_agent.runtime import TASK_SUBMIT_MODEL, TASK_TRAIN, TASK_VALIDATE
from common.validators import is_int, is_number

__all__ = [
    "ClientAPIError",
    "FLCallback",
    "FLMetaKey",
    "FLModel",
    "GlobalModelMismatch",
    "ParamsType",
    "get_config",
    "get_job_id",
    "get_site_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "shutdown",
    "system_info",
]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


class GlobalModelMismatch(ValueError):
    """The received global model's tensor names or shapes do not fit the LightningModule."""


class _Round:
    """This process's view of the current task: the same on every rank (rank 0 broadcasts).

    ``fetched`` turns True at the first ``validate()``/``fit()`` of a loop pass and back to
    False in ``is_running()`` once the result is sent: that call is the round boundary.
    """

    def __init__(self) -> None:
        self.fetched = False
        self.model: FLModel | None = None  # None after fetching: the job is over
        self.answered = False
        self.metrics: dict[str, float] | None = None

    @property
    def task_name(self) -> str | None:
        if self.model is None:
            return None
        return str(self.model.meta.get(TASK_NAME_META_KEY) or TASK_TRAIN)

    @property
    def open(self) -> bool:
        """A task is current and not yet answered."""
        return self.model is not None and not self.answered


_round = _Round()
_trainer: Any = None  # the patched trainer: its strategy broadcasts between ranks


def _lightning_package(trainer: Any) -> str:
    """The package whose ``Trainer`` ``trainer`` is (a subclass's module may be the user's)."""
    for cls in type(trainer).__mro__:
        for package in _PACKAGES:
            if cls.__module__ == package or cls.__module__.startswith(package + "."):
                return package
    raise TypeError(
        "flare.patch() expects a lightning.pytorch.Trainer or a pytorch_lightning.Trainer, "
        f"got {type(trainer).__module__}.{type(trainer).__qualname__}"
    )


def _world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def _is_rank_zero(trainer: Any) -> bool:
    return int(getattr(trainer, "global_rank", 0) or 0) == 0


def _broadcast(trainer: Any, obj: Any) -> Any:
    if _world_size(trainer) == 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The single-number entries of ``trainer.callback_metrics`` as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if not is_number(value):
            continue
        out[str(key)] = float(value)
    return out


def _cpu_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def _load_global_model(module: torch.nn.Module, params: Mapping[str, Any], *, strict: bool) -> None:
    """Load ``params`` into ``module`` after checking names and shapes; see the module doc."""
    local = module.state_dict()
    unexpected = sorted(k for k in params if k not in local)
    missing = sorted(k for k in local if k not in params)
    bad_shapes = [
        f"{k!r} has shape {list(params[k].shape)} in the global model but "
        f"{list(local[k].shape)} in the module"
        for k in params
        if k in local and tuple(params[k].shape) != tuple(local[k].shape)
    ]
    problems = list(bad_shapes)
    if strict:
        problems += [f"unexpected key {k!r} (not in the module)" for k in unexpected]
        problems += [f"missing key {k!r} (the module has it, the global model does not)"
                     for k in missing]  # fmt: skip
    if problems:
        raise GlobalModelMismatch(
            f"the global model does not fit {type(module).__name__} "
            f"(load_state_dict_strict={strict}): " + "; ".join(problems)
        )
    if unexpected:
        warnings.warn(
            "flare.patch(load_state_dict_strict=False): dropped key(s) of the global model that "
            f"{type(module).__name__} does not have: {', '.join(map(repr, unexpected))}",
            stacklevel=2,
        )
    if missing:
        warnings.warn(
            "flare.patch(load_state_dict_strict=False): the global model lacks "
            f"{', '.join(map(repr, missing))}; keeping the local value(s)",
            stacklevel=2,
        )
    module.load_state_dict({k: v for k, v in params.items() if k in local}, strict=strict)


class _FLCallbackHooks:
    """The hooks of the callback ``patch`` adds; mixed into the trainer's own ``Callback``."""

    def __init__(
        self, *, restore_state: bool, load_state_dict_strict: bool, update_fit_loop: bool
    ) -> None:
        super().__init__()
        self.restore_state = restore_state
        self.load_state_dict_strict = load_state_dict_strict
        self.update_fit_loop = update_fit_loop
        self.max_epochs: int | None = None  # one round's worth, read at patch time
        self.max_steps: int = -1
        self.saved_state: dict[str, Any] | None = None
        self.training_fit = False  # this fit trains (it was not skipped)
        self.sending_fit = False  # … and answers a train task at its end
        self.steps_at_start = 0
        # The algorithms a train task's meta asks for (NVFlare's patch applies them too):
        # FedProx's mu, SCAFFOLD's helper (kept across rounds: c_i is the site's own), and
        # the received weights both need.
        self.fedprox_mu: float | None = None
        self.scaffold: PTScaffoldHelper | None = None
        self.scaffold_controls: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = (
            None
        )
        self.global_weights: dict[str, torch.Tensor] | None = None
        self.steps_corrected = 0

    # -- helpers --------------------------------------------------------------------------

    def remember_limits(self, trainer: Any) -> None:
        max_epochs = trainer.fit_loop.max_epochs
        self.max_epochs = max_epochs if is_int(max_epochs) and max_epochs >= 0 else None
        self.max_steps = int(trainer.fit_loop.epoch_loop.max_steps)

    def begin_round(self, trainer: Any, pl_module: Any) -> None:
        """Fetch the task (rank 0), share it, load its model: once per loop pass."""
        if _round.fetched:
            return
        model = api.receive() if _is_rank_zero(trainer) else None
        model = _broadcast(trainer, model)
        _round.fetched = True
        _round.model = model
        _round.answered = False
        _round.metrics = None
        if model is not None and model.params:
            _load_global_model(pl_module, model.params, strict=self.load_state_dict_strict)

    def answer(self, trainer: Any, result: FLModel) -> None:
        """Send this round's result (rank 0 only); every rank marks the round answered."""
        _round.answered = True
        if _is_rank_zero(trainer):
            send(result)

    def grow_fit_loop(self, trainer: Any) -> None:
        if self.max_epochs is not None:
            trainer.fit_loop.max_epochs = trainer.current_epoch + self.max_epochs
        if self.max_steps >= 0:
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + self.max_steps

    def save_training_state(self, trainer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_state = scaler.state_dict() if scaler is not None else None
        self.saved_state = {
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "lr_schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
            "scaler": scaler_state or None,  # a disabled scaler's state is {}
        }

    def load_training_state(self, trainer: Any) -> None:
        state = self.saved_state
        if state is None:
            return
        optimizers = trainer.optimizers
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        if len(optimizers) != len(state["optimizers"]) or len(schedulers) != len(
            state["lr_schedulers"]
        ):
            warnings.warn(
                "flare.patch(restore_state=True): configure_optimizers() now returns "
                f"{len(optimizers)} optimizer(s) and {len(schedulers)} LR scheduler(s), last "
                f"round {len(state['optimizers'])} and {len(state['lr_schedulers'])}; "
                "starting them afresh",
                stacklevel=2,
            )
            return
        for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(schedulers, state["lr_schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])

    # -- Lightning hooks ------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.begin_round(trainer, pl_module)
        self.training_fit = self.sending_fit = False
        if _round.model is not None and _round.answered:
            trainer.should_stop = True  # this pass's result is sent: nothing to train for
            return
        task = _round.task_name
        if task == TASK_VALIDATE:
            warnings.warn(
                "flare: an evaluate task reached fit() with no validate() before it; answering "
                "with no metrics. Call trainer.validate() before trainer.fit().",
                stacklevel=2,
            )
            self.answer(trainer, FLModel(metrics={}))
            trainer.should_stop = True
            return
        if task == TASK_SUBMIT_MODEL:
            self.answer(trainer, FLModel(params=_cpu_params(pl_module), metrics=_round.metrics))
            trainer.should_stop = True
            return
        if self.update_fit_loop:
            self.grow_fit_loop(trainer)
        if self.restore_state:
            self.load_training_state(trainer)
        self.steps_at_start = int(trainer.global_step)
        self.training_fit = True
        self.sending_fit = task == TASK_TRAIN  # not after the job is over: local training
        self.start_algorithms(trainer, pl_module)

    def start_algorithms(self, trainer: Any, pl_module: Any) -> None:
        """FedProx when the train task carries a positive ``fedprox_mu``, SCAFFOLD when it
        carries the server's controls: applied around Lightning's optimizer steps, as
        NVFlare's ``patch`` does, never silently skipped."""
        self.fedprox_mu = None
        self.scaffold_controls = None
        self.global_weights = None
        meta = _round.model.meta if self.sending_fit and _round.model is not None else {}
        mu = meta.get(AlgorithmConstants.FEDPROX_MU)
        wants_fedprox = mu is not None and mu != 0  # mu 0 is FedAvg, as FedProxRecipe says
        controls = meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        if not wants_fedprox and controls is None:
            return
        asked = " and ".join(
            name for name, on in (("FedProx", wants_fedprox), ("SCAFFOLD", controls)) if on
        )
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            raise ClientAPIError(
                f"flare.patch(): this job uses {asked}, which the adapter applies to one "
                "optimizer under automatic optimization; this module has "
                f"{len(trainer.optimizers)} optimizer(s), automatic_optimization="
                f"{pl_module.automatic_optimization}. Use flare.receive()/send() with "
                "client_agent.pt's PTFedProxLoss or PTScaffoldHelper instead."
            )
        self.global_weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        if wants_fedprox:
            assert _round.model is not None
            self.fedprox_mu = get_fedprox_mu(_round.model)
        if controls is not None:
            if self.scaffold is None:
                self.scaffold = PTScaffoldHelper()
                self.scaffold.init(pl_module)
            self.scaffold.load_global_controls(controls)
            self.scaffold_controls = self.scaffold.get_params()
            self.steps_corrected = int(trainer.global_step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """FedProx: add the proximal term's gradient mu·(w − w_global) to every trainable
        parameter's gradient (after accumulation and unscaling, before the step)."""
        if self.fedprox_mu is None or self.global_weights is None:
            return
        with torch.no_grad():
            for name, parameter in pl_module.named_parameters():
                if parameter.requires_grad and parameter.grad is not None:
                    parameter.grad.add_(
                        parameter.detach() - self.global_weights[name], alpha=self.fedprox_mu
                    )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """SCAFFOLD: correct each optimizer step just taken (a batch that only accumulated
        gradients took none)."""
        if self.scaffold is None or self.scaffold_controls is None:
            return
        if int(trainer.global_step) == self.steps_corrected:
            return
        self.steps_corrected = int(trainer.global_step)
        lr = get_lr_values(trainer.optimizers[0])[0]
        self.scaffold.model_update(pl_module, lr, *self.scaffold_controls)

    def algorithm_meta(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """What the round's algorithms send: SCAFFOLD's change of the site's control."""
        if self.scaffold is None or self.scaffold_controls is None:
            return {}
        assert self.global_weights is not None
        lr = get_lr_values(trainer.optimizers[0])[0]
        self.scaffold.terms_update(pl_module, lr, *self.scaffold_controls, self.global_weights)
        self.scaffold_controls = None
        return {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: self.scaffold.get_delta_controls()}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if _round.open and _is_rank_zero(trainer):
            step = int(trainer.global_step)
            for key, value in _scalar_metrics(trainer.callback_metrics).items():
                log(key, value, step=step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.training_fit:
            return  # a skipped fit: nothing trained, nothing to keep
        self.training_fit = False
        if self.restore_state:
            self.save_training_state(trainer)
        if not self.sending_fit:
            return
        self.sending_fit = False
        steps = int(trainer.global_step) - self.steps_at_start
        self.answer(
            trainer,
            FLModel(
                params_type=ParamsType.FULL,
                params=_cpu_params(pl_module),
                metrics=_round.metrics,
                meta=result_meta(pl_module, self.algorithm_meta(trainer, pl_module), steps),
            ),
        )

    @staticmethod
    def _explicit_validate(trainer: Any) -> bool:
        return trainer.state.fn == "validate" and not trainer.sanity_checking

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._explicit_validate(trainer):
            self.begin_round(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._explicit_validate(trainer) or not _round.open:
            return
        metrics = _scalar_metrics(trainer.callback_metrics)
        task = _round.task_name
        if task == TASK_VALIDATE:
            self.answer(trainer, FLModel(metrics=metrics))
        elif task == TASK_SUBMIT_MODEL:
            self.answer(trainer, FLModel(params=_cpu_params(pl_module), metrics=metrics))
        elif _round.metrics is None:
            _round.metrics = metrics  # the first validate() of the round scores the global model


FL_META_ATTRIBUTE = "__fl_meta__"


def result_meta(pl_module: Any, algorithm: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """A train result's meta: the module's ``__fl_meta__`` (NVFlare's way for a script to
    send more), the algorithms' own keys (a clash with ``__fl_meta__`` is refused, naming the
    keys), and ``NUM_STEPS_CURRENT_ROUND`` unless ``__fl_meta__`` sets it."""
    user = getattr(pl_module, FL_META_ATTRIBUTE, None) or {}
    if not isinstance(user, Mapping):
        raise ClientAPIError(
            f"the module's {FL_META_ATTRIBUTE} must be a dict, got {type(user).__name__}"
        )
    clash = sorted(set(user) & set(algorithm))
    if clash:
        raise ClientAPIError(
            f"the module's {FL_META_ATTRIBUTE} sets {clash}, which the job's algorithm sends: "
            "remove them"
        )
    meta = {**user, **algorithm}
    meta.setdefault(FLMetaKey.NUM_STEPS_CURRENT_ROUND, steps)
    return meta


_callback_classes: dict[str, type] = {}


def _callback_class(package: str) -> type:
    """``FLCallback`` for ``package``: our hooks on that package's ``Callback`` base class."""
    if package not in _callback_classes:
        base = importlib.import_module(package).Callback
        _callback_classes[package] = type(
            "FLCallback", (_FLCallbackHooks, base), {"__module__": __name__}
        )
    return _callback_classes[package]


def FLCallback(
    rank: int = 0,
    load_state_dict_strict: bool = True,
    update_fit_loop: bool = True,
    *,
    restore_state: bool = True,
    package: str | None = None,
) -> Any:
    """NVFlare's ``FLCallback`` for a ``Trainer(callbacks=[...])``: the callback ``patch``
    adds, for the Lightning package installed (``lightning.pytorch`` first). ``rank`` is
    NVFlare's argument: the trainer tells each process its rank here. Prefer ``patch``, which
    also starts the Client API."""
    for name in (package,) if package else _PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return _callback_class(name)(
            restore_state=restore_state,
            load_state_dict_strict=load_state_dict_strict,
            update_fit_loop=update_fit_loop,
        )
    raise ClientAPIError("FLCallback needs lightning or pytorch_lightning installed")


def patch(
    trainer: Any,
    restore_state: bool = True,
    load_state_dict_strict: bool = True,
    update_fit_loop: bool = True,
) -> None:
    """Make ``trainer`` take part in the federated job; see the module docstring.

    Call it once, after making the trainer and before the ``is_running()`` loop. Patching the
    same trainer again does nothing; patching another trainer moves the job to it.
    """
    global _trainer
    package = _lightning_package(trainer)
    if any(isinstance(cb, _FLCallbackHooks) for cb in trainer.callbacks):
        return
    callback = _callback_class(package)(
        restore_state=restore_state,
        load_state_dict_strict=load_state_dict_strict,
        update_fit_loop=update_fit_loop,
    )
    callback.remember_limits(trainer)
    trainer.callbacks.insert(0, callback)
    _trainer = trainer
    _start_process_group(trainer)
    if _is_rank_zero(trainer):
        init()


def _start_process_group(trainer: Any) -> None:
    """Start a multi-process trainer's other processes and its process group now rather than
    at its first ``validate()``/``fit()``, so that ``is_running()`` and ``receive()`` can
    broadcast from their first call. Lightning finds both already there later and goes on."""
    if _world_size(trainer) == 1 or (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if launcher is None:  # started by torchrun, SLURM, …: the processes exist already
        strategy.setup_environment()
    elif type(launcher).__name__ == "_SubprocessScriptLauncher":  # strategy="ddp" and kin
        launcher.launch(strategy.setup_environment, trainer=trainer)
    else:
        raise ClientAPIError(
            f"flare.patch(): {type(strategy).__name__} with {type(launcher).__name__} runs "
            "training in processes it spawns, which cannot reach the FedPortal runtime; use "
            "strategy='ddp' (one script per process) or start the script with torchrun"
        )


def is_running() -> bool:
    """True while the job has work for this site; blocks until the next task arrives.

    On every rank: rank 0 asks the runtime and broadcasts the answer. It is also the round
    boundary: once a round's result is sent, the next ``validate()``/``fit()`` belongs to the
    next task.
    """
    trainer = _trainer
    if _round.fetched and (_round.answered or _round.model is None):
        _round.fetched = False  # the next validate()/fit() fetches the next task
    if trainer is None:
        return api.is_running()
    running = api.is_running() if _is_rank_zero(trainer) else True
    return bool(_broadcast(trainer, running))


def receive(timeout: float | None = None) -> FLModel | None:
    """The current task's global model on every rank (rank 0 receives and broadcasts it)."""
    trainer = _trainer
    if trainer is None or _world_size(trainer) == 1:
        return api.receive(timeout)
    model = api.receive(timeout) if _is_rank_zero(trainer) else None
    return _broadcast(trainer, model)  # type: ignore[no-any-return]
