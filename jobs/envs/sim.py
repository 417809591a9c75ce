"""Where a recipe runs. ``recipe.execute(env)`` is the same call in every env.

``SimEnv`` runs the job on this machine: one real process per site running the client
script, the workflow driven in this process. It exports the recipe to a bundle first and runs
that bundle, exactly what would be uploaded to a portal.

Workspace layout (``Run.workspace``)::

    bundle/                         the exported job bundle
    models/initial.safetensors      the global model that round 1 starts from
    models/round-001.safetensors    the global model after round 1, …
    models/best.safetensors         the global model with the best key metric
    metrics.jsonl                   every metric: per site, aggregated, and flare.log points
    rounds.jsonl                    per round: accepted sites, rejected sites with reasons
    sites/site-1/log.txt            site-1's stdout and stderr
    sites/site-1/round-001.safetensors  site-1's update for round 1 (kept if rejected, or
                                        with keep_updates=True); under a privacy policy
                                        that rewrites updates, round-001.enforced.safetensors
                                        instead (what would leave the site)
    sites/site-1/privacy-ledger.json    site-1's privacy spending (with privacy_policy)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client_agent import forkserver
from client_agent.privacy.enforce import PrivacyRefusal
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.release import release_result, round_refusal
from client_agent.runtime import ScriptFailed, ScriptProcess, Task
from client_agent.secagg.local import protection_record, run_local
from client_agent.secagg.session import ProtocolError
from client_agent.secagg.vector import WeightedUpdate
from client_agent.wire import WireFormatError, load_state_dict
from common.validators import is_number
from jobs.aggregation import UpdateRejected
from jobs.aggregation.sources import FileTensorSource, TensorSource, write_source
from jobs.bundle import JobBundle
from jobs.envs.base import (
    MetricPoint,
    PolicyArg,
    RoundRecord,
    Run,
    RunFailed,
    RunStatus,
    _Progress,
    check_count,
    check_workspace_alias,
    model_file_name,
    new_job_id,
    site_names,
    site_policies,
    site_threads_env,
)
from jobs.workflows import (
    EvalResult,
    PlannedTask,
    QuorumNotMet,
    RoundOutcome,
    RoundPlan,
    ServerState,
    TaskResult,
    best_score_after,
    close_result,
    fill_withheld,
    result_from_file,
    round_close_decision,
)
from jobs.workflows.base import checkpoint_file_stem, next_global_model, write_global_model
from jobs.workflows.evaluation import SITE_MODEL_PREFIX
from jobs.workflows.results import train_updates
from jobs.workflows.secure import close_from_sum, layout_of, protection_of, site_vector
from jobs.workflows.training_options import stop_reason

if TYPE_CHECKING:
    from jobs.recipes import Recipe

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` torch threads inside the block, then the caller's number again."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gpu_groups(gpu_config: str | None, device_count: int) -> list[str]:
    """NVFlare's ``gpu_config`` as the ``CUDA_VISIBLE_DEVICES`` of each group of sites.

    ``"0,1"`` is two groups (GPU 0, GPU 1); ``"[0,1],[2]"`` is two groups (GPUs 0 and 1, GPU 2).
    The sites take the groups in turn. A malformed string, or a GPU this machine does not have
    (``device_count`` of them), is a ValueError naming ``gpu_config``: a job meant for a GPU
    must not quietly train on the CPU instead.
    """
    if gpu_config is None:
        return []
    text = gpu_config.replace(" ", "")
    if "[" in text:
        parts = re.findall(r"\[([^\[\]]*)\]", text)
        if ",".join(f"[{p}]" for p in parts) != text:
            raise ValueError(f"gpu_config: expected like '0,1' or '[0,1],[2]', got {gpu_config!r}")
    else:
        parts = text.split(",")
    groups: list[str] = []
    for part in parts:
        ids = part.split(",")
        if not all(i.isdigit() for i in ids):
            raise ValueError(f"gpu_config: expected like '0,1' or '[0,1],[2]', got {gpu_config!r}")
        missing = [int(i) for i in ids if int(i) >= device_count]
        if missing:
            raise ValueError(
                f"gpu_config: GPU {missing[0]} asked for, but this machine has {device_count} "
                f"CUDA GPU(s)"
            )
        groups.append(",".join(str(int(i)) for i in ids))
    return groups


class SimEnv:
    """Simulate a federation on this machine: one process per site, in-process workflow.

    The arguments are NVFlare's (``nvflare.recipe.SimEnv``), with the same meanings:

    - ``num_clients`` sites named ``site-1`` … ``site-N``, unless ``clients`` names them
      (``num_clients=0``, the default, then takes the number from ``clients``).
    - ``num_threads`` sites train at once (default: all). Each site process gets
      ``OMP_NUM_THREADS = cores / num_threads`` (at least 1) unless the caller set it, so the
      sites do not fight over the cores.
    - ``gpu_config``: the GPUs the sites use, ``"0,1"`` or ``"[0,1],[2]"``; the sites take the
      groups in turn as their ``CUDA_VISIBLE_DEVICES``. A GPU this machine lacks is a
      ValueError. Without it the sites see whatever GPUs the caller's environment shows.
    - ``log_config``: accepted and kept; it changes nothing here: each site's output goes to
      ``sites/<site>/log.txt`` and the progress to the terminal whatever it says.
    - ``workspace_root`` (or our name ``workspace``; not both): the runs go to
      ``<workspace_root>/<job id>``; default ``<tmp>/fedportal-simulation``.
    - ``extra``: accepted and kept (``self.extra``); it changes nothing.

    Ours besides: site updates are deleted once aggregated unless ``keep_updates=True``
    (rejected ones are kept); ``task_timeout`` bounds one task; ``show_progress``; ``python``.

    ``privacy_policy``: each site's own privacy policy, enforced on its results exactly as the
    site agent enforces it (the same functions: clipping, noise, excluded tensors, size, the
    budget). One :class:`~client_agent.privacy.policy.PrivacyPolicy` (or the path of a
    ``privacy.toml``) for every site, or a dict ``{site name: policy or path}`` for some (an
    unknown site name is a ValueError naming it). Each site keeps its ledger in
    ``sites/<site>/privacy-ledger.json``, fresh for each run. A round a site declines for its
    budget is recorded as that site's rejection with the reason ("privacy budget exhausted:
    …"); the round closes on the others if quorum permits. A simulation has no project or
    submitter: the policy's ``[jobs]`` rule is not applied here.
    A site whose script crashes fails the run: in simulation every site runs the same script,
    so a crash is a bug to see at once. A failed run raises :class:`RunFailed` (a RuntimeError,
    as NVFlare's SimEnv raises), which carries the :class:`Run`.
    """

    def __init__(
        self,
        num_clients: int | None = 0,
        num_threads: int | None = None,
        workspace: str | Path | None = None,
        clients: Sequence[str] | None = None,
        *,
        gpu_config: str | None = None,
        log_config: str | None = None,
        workspace_root: str | Path | None = None,
        extra: dict[str, Any] | None = None,
        show_progress: bool = True,
        task_timeout: float | None = None,
        keep_updates: bool = False,
        python: str = sys.executable,
        privacy_policy: PolicyArg | dict[str, PolicyArg] | None = None,
    ) -> None:
        # NVFlare's num_clients=0 means "as many as clients names".
        if clients is not None and num_clients == 0 and num_clients is not False:
            num_clients = None
        self.clients = site_names(num_clients, clients)
        self.num_clients = len(self.clients)
        if num_threads is not None:
            check_count("num_threads", num_threads)
        self.num_threads = min(num_threads or self.num_clients, self.num_clients)
        if gpu_config is not None and not isinstance(gpu_config, str):
            raise ValueError(f"gpu_config: expected a string like '0,1', got {gpu_config!r}")
        self.gpu_config = gpu_config
        self.gpu_groups = gpu_groups(
            gpu_config, torch.cuda.device_count() if gpu_config is not None else 0
        )
        if log_config is not None and not isinstance(log_config, str):
            raise ValueError(f"log_config: expected a string, got {log_config!r}")
        self.log_config = log_config
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"extra: expected a dict, got {extra!r}")
        self.extra = dict(extra or {})
        root = check_workspace_alias(workspace, workspace_root)
        # Absolute: the sites run with their own working folders.
        self.workspace = Path(root).resolve() if root is not None else None
        self.show_progress = show_progress
        self.task_timeout = task_timeout
        self.keep_updates = keep_updates
        self.python = python
        self.privacy_policies = site_policies(privacy_policy, self.clients)
        if python == sys.executable:
            # Start the fork server now: it imports torch on the other core while the caller
            # goes on to export the recipe, so the sites start the moment the run begins.
            forkserver.get_server()

    @property
    def workspace_root(self) -> Path | None:
        """NVFlare's name for ``workspace``."""
        return self.workspace

    def site_env(self, index: int) -> dict[str, str]:
        """What the ``index``-th site's process gets in its environment besides the caller's."""
        env = site_threads_env(self.num_threads)
        if self.gpu_groups:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_groups[index % len(self.gpu_groups)]
        return env

    # -- entry point ------------------------------------------------------------------------

    def run(self, recipe: Recipe) -> Run:
        """Run ``recipe``; its :class:`Run` when it completed, else :class:`RunFailed`."""
        if recipe.min_clients > self.num_clients:
            raise ValueError(
                f"min_clients: the recipe needs {recipe.min_clients} sites but SimEnv has "
                f"num_clients={self.num_clients}"
            )
        job_id = new_job_id(recipe.name)
        workspace = (
            self.workspace or Path(tempfile.gettempdir()) / "fedportal-simulation"
        ) / job_id
        workspace.mkdir(parents=True)
        bundle = JobBundle.load(
            recipe.export(workspace / "bundle", exclude=[self.workspace or workspace])
        )
        if self.python == sys.executable:
            # From the exported app, not the script's own folder: files the recipe adds
            # (add_client_file) are the script's modules there, not third-party packages.
            forkserver.get_server().preload(forkserver.third_party_imports(bundle.script_path))
        unknown = sorted(set(bundle.site_args) - set(self.clients))
        if unknown:
            raise ValueError(
                f"per_site_config: no site {', '.join(unknown)} in this SimEnv "
                f"(its sites: {', '.join(self.clients)})"
            )
        run = _Simulation(self, bundle, job_id, workspace).run()
        if run.status == RunStatus.FAILED:
            raise RunFailed(run)
        run.model_file_names = recipe.model_file_names
        run.write_named_model_files()
        return run


def nvflare_cross_val_results(
    matrix: dict[str, dict[str, dict[str, float]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """The matrix as NVFlare's ``cross_val_results.json`` holds it: ``{evaluating site:
    {model owner: metrics}}``, a site's model by the site's name, the server's as
    ``SRV_<name>`` (the final global model: ``SRV_FL_global_model.pt``, NVFlare's file)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, cells in matrix.items():
        if model.startswith(SITE_MODEL_PREFIX):
            owner = model.removeprefix(SITE_MODEL_PREFIX)
        else:
            owner = "SRV_FL_global_model.pt" if model == "global" else f"SRV_{model}"
        for site, metrics in cells.items():
            out.setdefault(site, {})[owner] = metrics
    return out


class _Simulation:
    """One SimEnv run: owns the site processes and the files of ``workspace``."""

    def __init__(self, env: SimEnv, bundle: JobBundle, job_id: str, workspace: Path) -> None:
        self.env = env
        self.bundle = bundle
        self.workflow = bundle.workflow
        self.job_id = job_id
        self.ws = workspace
        self.models = workspace / "models"
        self.models.mkdir()
        self.metrics_file = open(workspace / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.metrics_lock = threading.Lock()
        self.run_record = Run(job_id=job_id, status=RunStatus.RUNNING, workspace=workspace)
        self.progress = _Progress(env.show_progress, self.workflow.total_rounds(list(env.clients)))
        self.sites: dict[str, ScriptProcess] = {}
        # Each site's ledger, in its folder, fresh for this run (the workspace is new).
        self.ledgers = {
            site: PrivacyLedger.in_folder(workspace / "sites" / site)
            for site in env.privacy_policies
        }
        self.tracking = None
        if bundle.experiment_tracking:
            # Imported only when asked for: TensorBoard and MLflow are heavy imports.
            from jobs.tracking import open_tracking

            self.tracking = open_tracking(
                bundle.experiment_tracking,
                workspace=workspace,
                job_name=bundle.name,
                job_id=job_id,
                sites=list(env.clients),
            )

    def record(self, point: MetricPoint) -> None:
        with self.metrics_lock:
            self.run_record.metrics.points.append(point)
            self.metrics_file.write(json.dumps({**point.__dict__, "time": time.time()}) + "\n")

    def run(self) -> Run:
        run = self.run_record
        started = time.perf_counter()
        self.progress.say(
            f"{self.job_id}: {self.workflow.name}, {self.workflow.num_rounds} rounds, "
            f"{len(self.env.clients)} sites; workspace {self.ws}"
        )
        try:
            self._start_sites()
            self._run_rounds()
            run.status = RunStatus.COMPLETED
        except KeyboardInterrupt:
            run.status = RunStatus.ABORTED
            run.error = "interrupted"
            self._stop_sites(grace=0)
            raise
        except (ScriptFailed, QuorumNotMet, WireFormatError, ProtocolError) as exc:
            run.status = RunStatus.FAILED
            run.error = str(exc)
        finally:
            self._stop_sites(grace=10 if run.status == RunStatus.COMPLETED else 0)
            self.metrics_file.close()
            if self.tracking is not None:
                self.tracking.close()
        elapsed = time.perf_counter() - started
        if run.status == RunStatus.COMPLETED:
            best = ""
            if run.best_round is not None:
                which = f"after round {run.best_round}" if run.best_round else "initial"
                best = f"; best {self.workflow_key()} {run.best_score:.4g} ({which} global model)"
            self.progress.say(f"{self.job_id}: COMPLETED in {elapsed:.1f} s{best}")
        else:
            self.progress.say(f"{self.job_id}: {run.status.value}: {run.error}")
        return run

    def workflow_key(self) -> str:
        return str(getattr(self.workflow, "key_metric", "") or "")

    def _start_sites(self) -> None:
        for index, site in enumerate(self.env.clients):
            site_dir = self.ws / "sites" / site
            proc = ScriptProcess(
                script=self.bundle.script_path,
                args=shlex.split(self.bundle.train_args_for(site)),
                client_config=self.bundle.client_config,
                site_name=site,
                job_id=self.job_id,
                workdir=site_dir,
                log_path=site_dir / "log.txt",
                env=self.env.site_env(index),
                python=self.env.python,
            )
            proc.start()
            self.sites[site] = proc

    def _stop_sites(self, grace: float) -> None:
        procs, self.sites = list(self.sites.values()), {}
        if not procs:
            return
        with ThreadPoolExecutor(max_workers=len(procs)) as pool:
            list(pool.map(lambda p: p.stop(grace=grace), procs))

    def _run_rounds(self) -> None:
        """Drive the workflow through its protocol (``jobs.workflows.base``): plan, run the
        tasks, decide with the shared round-close policy, close, store the outcome."""
        run = self.run_record
        workflow = self.workflow
        sites = list(self.env.clients)
        state = workflow.initial_state(sites)
        global_path = self.models / model_file_name(0)
        write_global_model(global_path, workflow, state, load_state_dict(self.bundle.model_path))
        global_specs = FileTensorSource(global_path).specs()
        best_path = self.models / "best.safetensors"
        checkpoints: dict[str, Path] = {}
        rnd = -1
        while (rnd := rnd + 1) < workflow.total_rounds_given(sites, state):
            round_started = time.perf_counter()
            self.progress.round = rnd
            plan = workflow.plan(rnd, sites, state)
            record = RoundRecord(round=rnd, label=plan.label)
            with _torch_threads(1):
                # The result checks run while sites still train and write: one torch thread
                # each, or their idle threads spin against the sites for the cores.
                results = self._collect(rnd, plan, global_path, global_specs, record, checkpoints)
            try:
                decision = round_close_decision(
                    plan, {t.site: record.rejected.get(t.site) for t in plan.tasks}
                )
                if not decision.closes:
                    raise QuorumNotMet(decision.failure)
                global_params = load_state_dict(global_path)
                if protection_of(workflow):
                    outcome = self._close_protected(
                        rnd, plan, global_params, results, state, record
                    )
                else:
                    fill_withheld(results, global_params)
                    outcome = workflow.close(rnd, plan, global_params, results, state)
                del global_params
                for name, source in outcome.checkpoints.items():
                    checkpoints[name] = self._keep_checkpoint(name, source)
            finally:
                self._discard(results)
            stopped = stop_reason(state.data, outcome.state.data)
            if stopped:
                record.label += f"; {stopped}"
                self.progress.num_rounds = workflow.total_rounds_given(sites, outcome.state)
            state = outcome.state
            record.accepted = list(outcome.sites)
            record.metrics = outcome.metrics
            record.site_metrics = outcome.site_metrics
            for key, value in outcome.metrics.items():
                self.record(
                    MetricPoint(round=rnd, site=None, key=key, value=value, source="aggregate")
                )
            if self.tracking is not None and outcome.metrics:
                self.tracking.aggregate(rnd, outcome.metrics)
            for cell in outcome.evaluations:
                run.evaluations.append(asdict(cell))
            best = best_score_after(workflow, outcome, run.best_score)
            if best is not None:
                # The metrics of round rnd score the model that round started from.
                run.best_score, run.best_round = best, rnd
                shutil.copyfile(global_path, best_path)
            next_path = self.models / model_file_name(rnd + 1)
            params = next_global_model(
                workflow, outcome, functools.partial(load_state_dict, global_path)
            )
            if params is None:
                os.link(global_path, next_path)  # unchanged: the same file, no copy
            else:
                write_global_model(next_path, workflow, state, params)
            global_path = next_path
            state.save(self.models / f"state-{rnd + 1:03d}.safetensors")
            del outcome  # one global model in memory at a time, not last round's as well
            record.seconds = time.perf_counter() - round_started
            run.rounds.append(record)
            with open(self.ws / "rounds.jsonl", "a") as fh:
                fh.write(json.dumps(record.__dict__) + "\n")
            self._say_round(record)
        if run.evaluations:
            with open(self.ws / "cross_site.json", "w") as fh:
                json.dump(run.cross_site_matrix, fh, indent=1)
            # Where NVFlare's SimEnv writes it, in its layout: the NVFlare scripts that print
            # this path find the file.
            nvflare_path = self.ws / "server" / "simulate_job" / "cross_site_val"
            nvflare_path.mkdir(parents=True, exist_ok=True)
            with open(nvflare_path / "cross_val_results.json", "w") as fh:
                json.dump(nvflare_cross_val_results(run.cross_site_matrix), fh, indent=1)

    def _close_protected(
        self,
        rnd: int,
        plan: RoundPlan,
        global_params: dict[str, torch.Tensor],
        results: list[TaskResult],
        state: ServerState,
        record: RoundRecord,
    ) -> RoundOutcome:
        """Close a round under secure aggregation: every planned site runs the protocol in
        this process, each with its own secrets (``client_agent.secagg.local``); a site whose
        result was not accepted took part in the keys and shares and then dropped out, so its
        masks are removed with the survivors' shares, as on a portal. The workflow closes
        from the sum alone (``jobs.workflows.secure``)."""
        workflow = self.workflow
        kind = protection_of(workflow)
        assert kind is not None
        layout = layout_of(
            workflow, {n: (t.dtype, tuple(t.shape)) for n, t in global_params.items()}
        )
        updates = train_updates(results)
        vectors: dict[str, np.ndarray | WeightedUpdate] = {
            u.site: site_vector(layout, u, global_params) for u in updates
        }
        dropped = [t.site for t in plan.tasks if t.site not in vectors]
        for site in dropped:  # it never uploads: its vector is never read
            vectors[site] = np.zeros(layout.length)
        local = run_local(
            kind,
            vectors,
            job=self.job_id,
            round_number=rnd,
            min_sites=workflow.min_clients,
            drop_after_shares=dropped,
        )
        record.protection = protection_record(kind, local, plain_bytes=4 * layout.length)
        return close_from_sum(
            workflow, rnd, plan, global_params, layout, local.total, updates, state
        )

    def _keep_checkpoint(self, name: str, source: TensorSource) -> Path:
        """A model the workflow keeps by name (a site's submitted model), as a file."""
        path = self.models / "checkpoints" / f"{checkpoint_file_stem(name)}.safetensors"
        path.parent.mkdir(exist_ok=True)
        return write_source(source, path)

    def _discard(self, results: list[TaskResult]) -> None:
        """Close the results' files and, unless kept, delete them: a 100 MB model with 4 sites
        would otherwise add 400 MB to the workspace every round. Rejected updates stay on disk
        for inspection."""
        for result in results:
            close_result(result)
            if self.env.keep_updates or isinstance(result, EvalResult):
                continue
            source = result.update.source
            if isinstance(source, FileTensorSource):
                source.path.unlink(missing_ok=True)

    def _say_round(self, record: RoundRecord) -> None:
        key = self.workflow_key()
        metric = f"  {key}={record.metrics[key]:.4f}" if key in record.metrics else ""
        rejected = "".join(
            f"\n    {s} not counted: {why}" for s, why in sorted(record.rejected.items())
        )
        self.progress.say(
            f"{record.label}: {len(record.accepted)} site(s) in {record.seconds:.2f} s"
            f"{metric}{rejected}"
        )

    def _collect(
        self,
        rnd: int,
        plan: RoundPlan,
        global_path: Path,
        global_specs: dict[str, Any],
        record: RoundRecord,
        checkpoints: dict[str, Path],
    ) -> list[TaskResult]:
        """Give each planned site its task; return the checked results, record the rest."""

        def one(planned: PlannedTask) -> TaskResult:
            site = planned.site
            proc = self.sites[site]
            site_dir = self.ws / "sites" / site
            spec = planned.spec
            model_path = global_path if planned.model.is_global else checkpoints[str(planned.model)]
            task = Task(
                task_id=f"{self.job_id}:{rnd}:{site}",
                task_name=spec.task_name,
                model_path=str(model_path),
                result_path=str(site_dir / f"round-{rnd:03d}.safetensors"),
                current_round=spec.current_round,
                total_rounds=spec.total_rounds,
                start_round=spec.start_round,
                meta=dict(spec.meta),
            )
            policy = self.env.privacy_policies.get(site)
            if policy is not None:
                declined = round_refusal(
                    policy, self.ledgers[site], job=self.job_id, task_name=spec.task_name
                )
                if declined:
                    raise PrivacyRefusal(declined)
            self.progress.site(site, spec.task_name)

            def on_log(message: dict[str, Any]) -> None:
                if self.tracking is not None:
                    self.tracking.site_record(site, message)
                for key, value in message["points"]:
                    self.record(
                        MetricPoint(
                            round=message.get("round"),
                            site=site,
                            key=key,
                            value=value,
                            step=message.get("step"),
                            source="log",
                        )
                    )

            path = proc.run_task(task, on_log=on_log, timeout=self.env.task_timeout)
            if policy is not None:
                # What the site's agent would upload: the same release, file for file.
                path = release_result(
                    path,
                    model_path,
                    policy=policy,
                    ledger=self.ledgers[site],
                    job=self.job_id,
                    round=rnd,
                ).path
            result = result_from_file(planned, path, global_specs)
            self.progress.site(site, "done")
            return result

        results: list[TaskResult] = []
        with ThreadPoolExecutor(max_workers=self.env.num_threads) as pool:
            futures = {pool.submit(one, task): task.site for task in plan.tasks}
            for future in as_completed(futures):
                site = futures[future]
                try:
                    result = future.result()
                except (UpdateRejected, WireFormatError, PrivacyRefusal) as exc:
                    reason = str(exc) if isinstance(exc, WireFormatError) else exc.reason
                    record.rejected[site] = reason
                    self.progress.site(site, "rejected")
                    log.warning("job %s %s: %s rejected: %s", self.job_id, plan.label, site, reason)
                    continue
                except ScriptFailed:
                    # Stop every site now, so the other sites' waits end at once instead of
                    # when their training would have.
                    for other in futures:
                        other.cancel()
                    self._stop_sites(grace=0)
                    for done in results:
                        close_result(done)
                    raise
                for key, value in result.metrics.items():
                    if is_number(value):
                        self.record(MetricPoint(round=rnd, site=site, key=key, value=float(value)))
                results.append(result)
        results.sort(key=lambda r: r.site)
        return results


__all__ = ["SimEnv", "gpu_groups"]
