"""Experiment tracking with NVFlare's names: ``SummaryWriter`` (TensorBoard's calls) over
``flare.log``.

An NVFlare script's ``from nvflare.client.tracking import SummaryWriter`` becomes
``from client_agent.tracking import SummaryWriter``; what it writes reaches the run's metrics
(``run.metrics.logged(key, site)``) and the portal's charts, tagged with the round, as
``flare.log`` points do. Only scalars are carried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from client_agent import api


class SummaryWriter:
    """TensorBoard's ``SummaryWriter`` calls that NVFlare's tracking module offers:
    ``add_scalar`` and ``add_scalars``. Call it after ``flare.init()``."""

    def add_scalar(
        self, tag: str, scalar: Any, global_step: int | None = None, **kwargs: Any
    ) -> None:
        """One scalar ``tag`` at ``global_step``."""
        api.log(tag, scalar, step=global_step)

    def add_scalars(
        self,
        tag: str,
        tag_scalar_dict: Mapping[str, Any],
        global_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Several scalars under ``tag``: each as ``<tag>/<name>``, TensorBoard's layout."""
        if not isinstance(tag_scalar_dict, Mapping):
            raise TypeError(
                "SummaryWriter.add_scalars(): tag_scalar_dict must map names to numbers, got "
                f"{type(tag_scalar_dict).__name__}"
            )
        for name, scalar in tag_scalar_dict.items():
            api.log(f"{tag}/{name}", scalar, step=global_step)

    def flush(self) -> None:
        """Points are sent as they are logged: nothing to flush (TensorBoard has it)."""

    def close(self) -> None:
        """Nothing to release (TensorBoard has it)."""
