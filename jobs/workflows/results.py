"""Typed results of a round's tasks, checked the same way by every driver.

A site answers its task with one model file (``client_agent.wire``). What the file must hold
depends on the task: a train result FULL or DIFF params matching the global model, with
metrics; an evaluate (``validate``) result metrics only; a submitted model FULL params. A file
that does not fit its task raises :class:`~jobs.aggregation.UpdateRejected` (or the wire's
``WireFormatError``) naming the reason, and the driver records that site as rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client_agent.config import EXCLUDE_VARS_META_KEY
from client_agent.fl_model import ParamsType
from client_agent.runtime import TASK_SUBMIT_MODEL, TASK_TRAIN, TASK_VALIDATE
from jobs.workflows.base import GLOBAL_MODEL, ModelRef, PlannedTask
from jobs.workflows.training_options import excluded

if TYPE_CHECKING:
    import torch

    from jobs.aggregation import SiteUpdate
    from jobs.aggregation.sources import TensorSource, TensorSpec


@dataclass
class TrainResult:
    """A train task's answer: the site's params (FULL or DIFF), its weight and its metrics."""

    site: str
    update: SiteUpdate

    @property
    def metrics(self) -> dict[str, Any]:
        return self.update.metrics


@dataclass
class EvalResult:
    """An evaluate task's answer: the site's metrics of the model ``model``."""

    site: str
    model: ModelRef = GLOBAL_MODEL
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubmittedModel:
    """A submit_model task's answer: the site's own model (FULL params) and its metrics."""

    site: str
    update: SiteUpdate

    @property
    def metrics(self) -> dict[str, Any]:
        return self.update.metrics


TaskResult = TrainResult | EvalResult | SubmittedModel


def result_from_file(
    task: PlannedTask, path: str | Path, global_specs: dict[str, TensorSpec]
) -> TaskResult:
    """The checked result of ``task`` from the file its site sent.

    Raises ``UpdateRejected`` (or ``WireFormatError``) with the reason when it does not fit.
    The source of a train or submit result stays open (it is read chunk by chunk when folded);
    the caller closes it (``close_result``).
    """
    from client_agent.wire import model_fields, read_header
    from jobs.aggregation import SiteUpdate, UpdateRejected, check_update
    from jobs.numbers import NumberRejected, check_result_metrics

    if task.task_name == TASK_VALIDATE:
        _, metadata = read_header(path)
        fields = model_fields(metadata, Path(path).name)
        try:
            metrics = check_result_metrics(fields.get("metrics") or {})
        except NumberRejected as exc:
            raise UpdateRejected(task.site, str(exc)) from None
        return EvalResult(task.site, task.model, metrics)
    update = SiteUpdate.from_file(task.site, path)
    # exclude_vars: a train result holds every weight but the excluded ones, which stay at
    # the site (the Client API leaves them out); one that sends them is rejected.
    kept_at_site = excluded(task.spec.meta.get(EXCLUDE_VARS_META_KEY), global_specs)
    try:
        if task.task_name == TASK_SUBMIT_MODEL and update.params_type == ParamsType.DIFF:
            raise UpdateRejected(task.site, "a submitted model must be FULL params, not DIFF")
        sent = set(update.source.specs()) & kept_at_site
        if sent:
            raise UpdateRejected(
                task.site, f"sent tensors that exclude_vars keeps at the site: {sorted(sent)[:5]}"
            )
        check_update({n: spec for n, spec in global_specs.items() if n not in kept_at_site}, update)
        check_meta_tensors(global_specs, update)
    except BaseException:
        update.source.close()
        raise
    if task.task_name == TASK_TRAIN:
        return TrainResult(task.site, update)
    if task.task_name == TASK_SUBMIT_MODEL:
        return SubmittedModel(task.site, update)
    update.source.close()
    raise UpdateRejected(task.site, f"unknown task {task.task_name!r}")


def check_meta_tensors(global_specs: dict[str, TensorSpec], update: SiteUpdate) -> None:
    """Tensors an update carries in its meta (SCAFFOLD's control changes) name weights of the
    global model, with their shapes, and hold finite values; else ``UpdateRejected``."""
    from client_agent.wire import WireFormatError
    from jobs.aggregation import UpdateRejected

    for key in update.source.meta_tensor_keys():
        try:
            tensors = update.source.meta_tensors(key)
        except WireFormatError as exc:
            raise UpdateRejected(update.site, f"meta[{key!r}]: {exc}") from None
        for name, tensor in tensors.items():
            spec = global_specs.get(name)
            if spec is None:
                raise UpdateRejected(
                    update.site, f"meta[{key!r}] names {name!r}, not a tensor of the model"
                )
            if tuple(tensor.shape) != tuple(spec[1]):
                raise UpdateRejected(
                    update.site,
                    f"meta[{key!r}][{name!r}] has shape {list(tensor.shape)}, "
                    f"expected {list(spec[1])}",
                )


def close_result(result: TaskResult) -> None:
    """Close the file a result reads its tensors from (nothing for an evaluate result)."""
    if isinstance(result, TrainResult | SubmittedModel):
        result.update.source.close()


def fill_withheld(
    results: list[TaskResult], global_model: Mapping[str, torch.Tensor] | TensorSource
) -> None:
    """Give every result whose site withheld tensors (its privacy policy's
    ``exclude_tensors``) those tensors as no change from that site, read from
    ``global_model``, so the workflow folds it like any other. Both drivers call this just
    before ``workflow.close``; ``global_model`` must stay open until the results are closed."""
    from jobs.aggregation.sources import UnchangedFillSource, as_source

    base = as_source(global_model)
    for result in results:
        if isinstance(result, TrainResult | SubmittedModel) and result.update.withheld:
            update = result.update
            update.source = UnchangedFillSource(
                update.source, base, update.withheld, diff=update.params_type == ParamsType.DIFF
            )


def train_updates(results: list[TaskResult] | tuple[TaskResult, ...]) -> list[SiteUpdate]:
    """The updates of the train results, in site-name order (the order they are folded in)."""
    return [r.update for r in sorted(results, key=lambda r: r.site) if isinstance(r, TrainResult)]
