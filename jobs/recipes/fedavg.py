"""FedAvg and FedProx, with NVFlare's ``FedAvgRecipe`` arguments (names and defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.validators import FieldError
from jobs.recipes.base import Recipe, set_per_site_config
from jobs.recipes.nvflare_args import (
    DEFAULT_BEST_MODEL_FILENAME,
    DEFAULT_SAVE_FILENAME,
    aggregator_name,
    check_server_expected_format,
    initial_model,
    model_file_name,
    params_transfer_type_of,
    refuse_unsupported,
)
from jobs.workflows.dp import ServerDP
from jobs.workflows.fedavg import FedAvg, FedProx
from jobs.workflows.training_options import key_metric_mode_for


def _required(name: str, value: Any) -> Any:
    # Defaults of None keep our positional order (name, min_clients, num_rounds, model,
    # train_script) while NVFlare's own defaults sit on name and num_rounds.
    if value is None:
        raise FieldError(name, "is required")
    return value


class FedAvgRecipe(Recipe):
    """FedAvg over ``num_rounds`` rounds, with NVFlare's ``FedAvgRecipe`` arguments.

    ``model`` is a ``torch.nn.Module``, a ``state_dict``, or NVFlare's class-path dict
    ``{"class_path": "pkg.mod.Net", "args": {...}}`` (imported in this process).
    ``initial_ckpt`` (a safetensors file or a ``torch.save``'d ``state_dict``) is loaded into
    ``model`` and checked against it, or, without ``model``, is the initial model itself.

    ``key_metric`` (default ``"accuracy"``) chooses the best model; ``key_metric_mode``
    ``"max"``/``"min"``, or ``None``: the mode ``stop_cond`` implies when it names the key
    metric (``"loss <= 0.1"``: min), else ``"max"`` (NVFlare's rule).

    ``stop_cond`` (``"accuracy >= 0.95"``) ends the job after the first round whose aggregated
    metric meets it, and ``patience`` after that many rounds without improvement of its metric
    (``jobs.workflows.training_options``). ``exclude_vars`` is a regular expression: matching
    tensors never leave the sites and keep their initial values in the global model.
    ``aggregation_weights`` (``{"site-1": 2.0}``) multiplies a site's weight in the mean.
    ``per_site_config`` (``{"site-1": {"train_args": "--lr 0.1"}}``) is
    :func:`jobs.recipes.set_per_site_config`.

    ``params_transfer_type="DIFF"`` (or ``aggregator_data_kind="WEIGHT_DIFF"``) tells every
    train task, in ``meta["params_transfer_type"]``, to send the site's change rather than its
    weights: the Client API turns a FULL ``flare.send`` into ``local − received`` itself.
    ``aggregator`` combines the round's updates: ``None`` or ``"mean"`` (FedAvg's weighted
    mean, NVFlare's default),
    ``"median"``, ``"trimmed_mean"`` (``aggregator_args={"trim_fraction": 0.2}``) or
    ``"krum"`` (``{"num_malicious": 1, "num_to_keep": 1}``).

    ``dp`` (a :class:`jobs.recipes.ServerDP`, or a dict of its settings) makes the aggregate
    DP-FedAvg's (McMahan et al. 2018; Flower's server-side fixed or adaptive clipping): each
    site's update is clipped to ``clip_norm`` on the server, the clipped updates are averaged
    with equal weights over the sites the round planned, and Gaussian noise of standard
    deviation ``noise_multiplier × clip_norm / sites`` is added. Every round records the
    site-level ε spent so far (``privacy/epsilon`` at ``privacy/delta``), which
    ``run.privacy`` lists and the job page charts. It protects each site's contribution in
    what the global model reveals, not the updates on their way to the server (that is the
    sites' own privacy policy); it refuses the robust aggregators and
    ``aggregation_weights``, whose sensitivity the noise does not cover.

    ``secure_aggregation=True`` (or ``"masking"``) masks every site's weighted update so the
    portal and its workers only ever see the sum (SecAgg+: pairwise masks that cancel in the
    sum, Shamir-shared seeds to recover from sites that drop out); ``"he"`` encrypts it with
    CKKS instead (:class:`FedAvgRecipeWithHE`). Both need ``min_clients ≥ 2`` and the mean
    aggregator, and refuse ``aggregation_weights`` and ``dp`` (see ``jobs.workflows.secure``).

    ``save_filename`` and ``best_model_filename`` (NVFlare's defaults ``FL_global_model.pt``,
    ``best_FL_global_model.pt``; None: not written) name ``torch.save``d copies of the final
    and best global models in ``run.get_result()``'s ``models/``, beside our safetensors files.
    Not supported, refused with a ``FieldError`` naming them when given: ``model_persistor``
    and ``model_locator`` (server-side code).
    ``server_expected_format`` may be NUMPY (NVFlare's default) or PYTORCH: the same here.
    Accepted with no effect (the agent always runs the script as one subprocess per job):
    ``launch_external_process``, ``command``, ``launch_once``, ``launch_timeout``,
    ``shutdown_timeout``, ``server_memory_gc_rounds``, ``client_memory_gc_rounds``,
    ``cuda_empty_cache``, ``enable_tensor_disk_offload``.
    """

    _workflow_class: type[FedAvg] = FedAvg  # FedProx, FedOpt, SCAFFOLD: their own

    def __init__(
        self,
        name: str = "fedavg",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        *,
        initial_ckpt: str | Path | None = None,
        key_metric: str | None = "accuracy",
        key_metric_mode: str | None = None,
        aggregator: Any = None,
        aggregator_args: Mapping[str, Any] | None = None,
        aggregator_data_kind: Any = "WEIGHTS",
        params_transfer_type: Any = "FULL",
        server_expected_format: Any = "numpy",
        save_filename: str | None = DEFAULT_SAVE_FILENAME,
        best_model_filename: str | None = DEFAULT_BEST_MODEL_FILENAME,
        stop_cond: str | None = None,
        patience: int | None = None,
        exclude_vars: str | None = None,
        aggregation_weights: Mapping[str, float] | None = None,
        dp: ServerDP | Mapping[str, Any] | None = None,
        secure_aggregation: bool | str | None = None,
        per_site_config: Mapping[str, Any] | None = None,
        model_persistor: Any = None,
        model_locator: Any = None,
        launch_external_process: bool = False,
        command: str = "python3 -u",
        launch_once: bool = True,
        launch_timeout: float | None = None,
        shutdown_timeout: float = 0.0,
        server_memory_gc_rounds: int = 0,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        enable_tensor_disk_offload: bool = False,
        **workflow_args: Any,
    ) -> None:
        refuse_unsupported(model_persistor=model_persistor, model_locator=model_locator)
        check_server_expected_format(server_expected_format)
        super().__init__(
            name=name,
            workflow=self._workflow_class(
                min_clients=_required("min_clients", min_clients),
                num_rounds=num_rounds,
                key_metric=key_metric,
                key_metric_mode=key_metric_mode_for(key_metric, key_metric_mode, stop_cond),
                aggregator=aggregator_name(aggregator),
                aggregator_args=dict(aggregator_args or {}),
                params_transfer_type=params_transfer_type_of(
                    params_transfer_type, aggregator_data_kind
                ),
                stop_cond=stop_cond,
                patience=patience,
                exclude_vars=exclude_vars,
                aggregation_weights=dict(aggregation_weights or {}),
                dp=ServerDP.from_value(dp),
                secure_aggregation=secure_aggregation,
                **workflow_args,
            ),
            model=initial_model(model, initial_ckpt),
            train_script=_required("train_script", train_script),
            train_args=train_args,
        )
        if per_site_config is not None:
            set_per_site_config(self, per_site_config)
        self.model_file_names = (
            model_file_name("save_filename", save_filename),
            model_file_name("best_model_filename", best_model_filename),
        )


class FedProxRecipe(FedAvgRecipe):
    """FedAvg with FedProx's proximal term at the sites (Li et al. 2020), with NVFlare's
    arguments (``FedAvgRecipe``'s, plus ``fedprox_mu``): each train task hands ``fedprox_mu``
    to the script in ``model.meta["fedprox_mu"]``, and the script adds
    ``client_agent.pt.PTFedProxLoss(mu)`` of its weights and the received global weights to
    its loss. ``fedprox_mu=0`` is FedAvg."""

    _workflow_class = FedProx

    def __init__(
        self,
        name: str = "fedprox",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        *,
        fedprox_mu: float = 0.01,
        **nvflare_args: Any,
    ) -> None:
        super().__init__(
            name,
            min_clients,
            num_rounds,
            model,
            train_script,
            train_args,
            fedprox_mu=fedprox_mu,
            **nvflare_args,
        )


class FedAvgRecipeWithHE(FedAvgRecipe):
    """FedAvg whose sites encrypt their weighted updates with CKKS (TenSEAL), NVFlare's
    ``FedAvgRecipeWithHE``: the server adds ciphertexts it cannot read and one site decrypts
    the sum. Each round, the first site in name order makes a fresh context and seals its
    secret copy for the other sites through the portal, which keeps only the public copy.

    NVFlare's arguments, keyword-only as there (``name`` defaults to ``"fedavg_he"``). Every
    layer is encrypted: ``encrypt_layers`` other than None (some layers in the clear) is
    refused, and so is a custom ``aggregator``. ``server_memory_gc_rounds`` has no effect.
    Every ``FedAvgRecipe`` argument applies too.
    """

    def __init__(
        self,
        *,
        name: str = "fedavg_he",
        min_clients: int | None = None,
        num_rounds: int = 2,
        model: Any = None,
        train_script: str | Path | None = None,
        train_args: str = "",
        encrypt_layers: Any = None,
        server_memory_gc_rounds: int = 1,
        **fedavg_args: Any,
    ) -> None:
        if encrypt_layers is not None:
            raise FieldError(
                "encrypt_layers",
                f"every layer is encrypted here; encrypting only {encrypt_layers!r} (the rest "
                "in the clear) is not supported: leave it None",
            )
        if fedavg_args.get("aggregator") not in (None, "mean"):
            raise FieldError(
                "aggregator",
                "an encrypted round is summed by the server as ciphertexts; only FedAvg's "
                "weighted mean can be made from the sum",
            )
        if fedavg_args.pop("secure_aggregation", "he") not in ("he", None):
            raise FieldError("secure_aggregation", "FedAvgRecipeWithHE always encrypts ('he')")
        super().__init__(
            name,
            min_clients,
            num_rounds,
            model,
            train_script,
            train_args,
            secure_aggregation="he",
            server_memory_gc_rounds=server_memory_gc_rounds,
            **fedavg_args,
        )
