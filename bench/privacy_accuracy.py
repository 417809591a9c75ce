"""Accuracy under site-enforced differential privacy at ε = 1, 4, 8 and ∞ (clipping only).

Two workloads, FedAvg in ``SimEnv``, each site enforcing the same ``privacy.toml`` on its
updates exactly as its agent would (``SimEnv(privacy_policy=…)``):

* hello-pt (``examples/hello-pt``): 3 sites, 5 rounds × 2 local epochs, scored on its 261-image
  test split;
* the non-IID digits experiment (``examples/workflows``, FedAvg): 5 sites each holding mostly
  two digits, 50 rounds × 2 local epochs, scored on the 360 held-out digits no site holds.

For each target ε the policy is ``clip_norm = C``, ``noise_multiplier = σ``, ``delta = 1e-5``,
``max_epsilon = ε``, with σ the smallest noise that keeps the job's rounds within ε
(``client_agent.privacy.accounting.noise_for_epsilon``: one release a round, sample rate 1, as
the site's ledger counts them). C is the median L2 norm of the sites' updates (local − global)
over every round of a run without a policy, measured first with the agent's own measurement
(``privatize``) and printed: it clips about half of the updates and barely scales the rest.
ε = ∞ is that clipping without noise. The ε each site's ledger says it spent is printed
beside the target.

For comparison, record-level DP-SGD inside the script (``examples/hello-dp``: Opacus, each
training example's gradient clipped to 1.0, the noise Opacus chooses for the target over all
rounds) on hello-pt's data and rounds, with hello-pt's optimizer and with one tuned for it
(``OPTIMIZERS``).

A job whose sites' training blows up under the noise (their updates hold NaN, every one is
rejected, the job fails) is a result of its setting: its row says so and scores the last
global model the job stored.

    .venv/bin/python bench/privacy_accuracy.py            # a few minutes
    .venv/bin/python bench/privacy_accuracy.py --quick    # one round of each, for the tests
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import benchlib
import torch
from benchlib import md_table, median
from torch import nn

from client_agent.privacy.accounting import noise_for_epsilon
from client_agent.privacy.enforce import privatize
from client_agent.privacy.ledger import PrivacyLedger
from client_agent.privacy.policy import PrivacyPolicy
from client_agent.wire import load_state_dict, read_model_file
from jobs.envs import Run, RunStatus, SimEnv
from jobs.envs.base import RunFailed, model_file_name
from jobs.recipes import FedAvgRecipe

EXAMPLES = benchlib.REPO_ROOT / "examples"
DELTA = 1e-5
TARGETS = (math.inf, 8.0, 4.0, 1.0)
RECORD_TARGETS = (8.0, 1.0)
EPSILON_KEY = "privacy/record_epsilon"  # examples/hello-dp/client.py's
NOISE_KEY = "privacy/record_noise_multiplier"


@functools.cache
def _module(path: Path, name: str) -> ModuleType:
    """An example's module, loaded by path under its own name: the examples each have a
    ``model`` or ``data`` module, and one process runs several of them."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    digits_net = _module(EXAMPLES / "workflows" / "digits_net.py", "workflows_digits_net")
    return float(digits_net.accuracy(model, x, y))


@dataclass(frozen=True)
class Workload:
    label: str
    folder: Path
    sites: int
    rounds: int
    train_args: str
    model: Callable[[], nn.Module]
    test_data: Callable[[], tuple[torch.Tensor, torch.Tensor]]


def hello_pt(rounds: int, epochs: int) -> Workload:
    folder = EXAMPLES / "hello-pt"

    def model() -> nn.Module:
        net: nn.Module = _module(folder / "model.py", "hello_pt_model").Net()
        return net

    def test_data() -> tuple[torch.Tensor, torch.Tensor]:
        *_, x, y = _module(folder / "data.py", "hello_pt_data").load_data("site-1")
        return x, y

    return Workload("hello-pt", folder, 3, rounds, f"--epochs {epochs}", model, test_data)


def non_iid_digits(rounds: int, epochs: int) -> Workload:
    folder = EXAMPLES / "workflows"

    def model() -> nn.Module:
        net: nn.Module = _module(folder / "digits_net.py", "workflows_digits_net").DigitsNet()
        return net

    def test_data() -> tuple[torch.Tensor, torch.Tensor]:
        data = _module(folder / "skewed_digits.py", "workflows_skewed_digits")
        x, y = data.load_test_data()
        return x, y

    # The experiment's settings (examples/workflows/experiment.py): SGD lr 0.1, batch 32.
    args = f"--num-sites 5 --epochs {epochs} --lr 0.1"
    return Workload("non-IID digits", folder, 5, rounds, args, model, test_data)


@dataclass
class Result:
    workload: str
    dp: str
    target: float | None
    spent: float | None
    noise_multiplier: float | None
    clip_norm: float | None
    accuracy: float
    seconds: float
    note: str = ""

    def row(self) -> list[str]:
        def number(value: float | None, spec: str) -> str:
            if value is None:
                return "—"
            return "∞" if math.isinf(value) else format(value, spec)

        return [
            self.workload,
            self.dp,
            number(self.target, "g"),
            number(self.spent, ".3f"),
            number(self.noise_multiplier, ".3f"),
            number(self.clip_norm, ".3g"),
            f"{self.accuracy:.3f}" + (f" ({self.note})" if self.note else ""),
            f"{self.seconds:.1f}",
        ]


HEADERS = ["workload", "DP", "target ε", "ε spent", "σ", "C", "final accuracy", "s"]


@dataclass
class Outcome:
    run: Run
    accuracy: float
    """Of the final global model; of the last one stored when the job failed."""
    seconds: float
    failed: str = ""
    """Why the job failed, in a few words; empty when it completed."""


def run_job(
    workload: Workload,
    workspace: Path,
    *,
    policy: PrivacyPolicy | None = None,
    keep_updates: bool = False,
) -> Outcome:
    """One FedAvg job of ``workload`` under ``policy``, scored on the workload's test split.

    Noise large enough can blow the sites' training up: their updates then hold NaN, every
    site's is rejected and the job fails. That is a result of the setting, not of the bench,
    so it is reported with the accuracy of the last global model the job stored.
    """
    torch.manual_seed(0)  # the same initial model for every setting
    recipe = FedAvgRecipe(
        name="privacy-accuracy",
        min_clients=workload.sites,
        num_rounds=workload.rounds,
        model=workload.model(),
        train_script=workload.folder / "client.py",
        train_args=workload.train_args,
    )
    env = SimEnv(
        num_clients=workload.sites,
        workspace=workspace,
        show_progress=False,
        keep_updates=keep_updates,
        privacy_policy=policy,
    )
    started = time.perf_counter()
    try:
        run = recipe.run(env)
    except RunFailed as exc:
        run = exc.run
    seconds = time.perf_counter() - started
    if run.status == RunStatus.COMPLETED and run.global_model is not None:
        return Outcome(run, final_accuracy(workload, run.global_model), seconds)
    if "NaN" not in (run.error or ""):
        raise SystemExit(f"{workload.label}: {run.status.value}: {run.error}")
    stored = sorted((run.workspace / "models").glob("round-*.safetensors"))
    last = stored[-1] if stored else run.workspace / "models" / model_file_name(0)
    accuracy = final_accuracy(workload, load_state_dict(last))
    return Outcome(run, accuracy, seconds, f"diverged: NaN in round {len(stored) + 1}")


def final_accuracy(workload: Workload, params: dict[str, torch.Tensor]) -> float:
    model = workload.model()
    model.load_state_dict(params)
    return _accuracy(model, *workload.test_data())


def update_norms(run: Run, sites: int, rounds: int) -> list[float]:
    """The L2 norm of every site's update (local − the global model it received) in every
    round of a run kept with ``keep_updates=True``, measured as the agent measures it."""
    measure = PrivacyPolicy(clip_norm=sys.float_info.max)  # clips nothing
    norms = []
    for rnd in range(rounds):
        base = load_state_dict(run.workspace / "models" / model_file_name(rnd))
        for site in range(1, sites + 1):
            update = read_model_file(
                run.workspace / "sites" / f"site-{site}" / f"round-{rnd:03d}.safetensors"
            )
            assert update.params is not None and update.params_type is not None
            params = dict(update.params)
            norms.append(
                privatize(params, base, params_type=update.params_type, policy=measure).norm
            )
    return norms


def spent_epsilon(run: Run, sites: int, policy: PrivacyPolicy) -> float:
    """The most any site's ledger says the job spent there."""
    return max(
        float(
            PrivacyLedger.in_folder(run.workspace / "sites" / f"site-{site}").report(
                run.job_id, policy
            )["epsilon"]
        )
        for site in range(1, sites + 1)
    )


def site_enforced(workload: Workload, targets: Sequence[float], tmp: Path) -> list[Result]:
    baseline = run_job(workload, tmp / "baseline", keep_updates=True)
    if baseline.failed:
        raise SystemExit(f"{workload.label} without a policy: {baseline.failed}")
    accuracy, seconds = baseline.accuracy, baseline.seconds
    norms = update_norms(baseline.run, workload.sites, workload.rounds)
    clip = median(norms)
    print(
        f"{workload.label}: no policy: accuracy {accuracy:.3f} in {seconds:.1f} s; update norms "
        f"min {min(norms):.3g}, median {clip:.3g}, max {max(norms):.3g} over "
        f"{len(norms)} updates: C = {clip:.3g}",
        flush=True,
    )
    results = [Result(workload.label, "none", None, None, None, None, accuracy, seconds)]
    for target in targets:
        if math.isinf(target):
            policy = PrivacyPolicy(clip_norm=clip, delta=DELTA)
        else:
            sigma = noise_for_epsilon(target, workload.rounds, DELTA)
            policy = PrivacyPolicy(
                clip_norm=clip, noise_multiplier=sigma, delta=DELTA, max_epsilon=target
            )
        outcome = run_job(workload, tmp / f"eps-{target:g}", policy=policy)
        spent = spent_epsilon(outcome.run, workload.sites, policy)
        declined = [
            reason
            for r in outcome.run.rounds
            for reason in r.rejected.values()
            if "privacy" in reason
        ]
        if declined:  # the budget was sized for every round: a decline is a bench bug
            raise SystemExit(f"{workload.label} at ε = {target:g}: declined: {declined[0]}")
        result = Result(
            workload.label,
            "site-enforced",
            target,
            spent,
            policy.noise_multiplier,
            clip,
            outcome.accuracy,
            outcome.seconds,
            outcome.failed,
        )
        print(" | ".join(result.row()), flush=True)
        results.append(result)
    return results


# hello-dp's sites' optimizer: hello-pt's (its default), and the best of four settings tried
# at ε = 8 (lr 0.05, 0.2, 0.5 without momentum; lr 0.1 with momentum 0.5), chosen on the test
# split it is scored on: an optimistic figure, shown as such.
OPTIMIZERS = {
    "SGD lr 0.05, momentum 0.9 (hello-pt's)": ["--lr", "0.05", "--momentum", "0.9"],
    "SGD lr 0.2, no momentum (tuned on the test split)": ["--lr", "0.2", "--momentum", "0"],
}


def record_level(
    targets: Sequence[float],
    rounds: int,
    epochs: int,
    samples: int | None,
    tmp: Path,
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
) -> list[Result]:
    """hello-dp (DP-SGD in the script) at each target ε and optimizer, on hello-pt's data."""
    job = _module(EXAMPLES / "hello-dp" / "job.py", "hello_dp_job")
    results: list[Result] = []
    for optimizer, target in ((o, t) for o in optimizers for t in targets):
        argv = ["--rounds", str(rounds), "--epochs", str(epochs), "--target-epsilon", str(target)]
        argv += [*OPTIMIZERS[optimizer], "--quiet"]
        argv += ["--workspace", str(tmp / f"record-{len(results)}")]
        if samples is not None:
            argv += ["--samples", str(samples)]
        started = time.perf_counter()
        run: Run = job.main(argv)
        seconds = time.perf_counter() - started
        if run.status != RunStatus.COMPLETED or run.global_model is None:
            raise SystemExit(f"hello-dp at ε = {target:g}: {run.status.value}: {run.error}")
        spent = max(p.value for p in run.metrics.logged(EPSILON_KEY))
        noise = max(p.value for p in run.metrics.logged(NOISE_KEY))
        result = Result(
            "hello-pt (hello-dp)",
            f"record-level, in the script; {optimizer}",
            target,
            spent,
            noise,
            1.0,
            float(job.test_accuracy(run.global_model)),
            seconds,
        )
        print(" | ".join(result.row()), flush=True)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of each, ε 8 and ∞ only")
    parser.add_argument("--digits-rounds", type=int, default=50, help="non-IID digits rounds")
    parser.add_argument("--no-record-level", action="store_true", help="skip hello-dp")
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        metavar="EPSILON",
        help=f"site-enforced targets instead of {' '.join(f'{t:g}' for t in TARGETS)} (inf: ∞)",
    )
    parser.add_argument(
        "--only", choices=["hello-pt", "non-IID digits"], help="site-enforced: one workload"
    )
    args = parser.parse_args(argv)
    benchlib.print_header(
        "Accuracy under site-enforced differential privacy",
        "FedAvg in SimEnv with every site enforcing clip_norm C and noise σ·C on its updates, "
        f"σ sized so the job's rounds fit the target ε at δ = {DELTA}",
    )
    if args.quick:
        workloads = [hello_pt(rounds=1, epochs=1), non_iid_digits(rounds=1, epochs=1)]
        targets: Sequence[float] = (math.inf, 8.0)
        record: Sequence[float] = (8.0,)
        record_rounds, record_epochs, samples = 1, 1, 64
    else:
        workloads = [hello_pt(rounds=5, epochs=2), non_iid_digits(args.digits_rounds, 2)]
        targets, record = TARGETS, RECORD_TARGETS
        record_rounds, record_epochs, samples = 5, 2, None
    if args.targets:
        targets = args.targets
    workloads = [w for w in workloads if args.only in (None, w.label)]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fedportal-privacy-accuracy-") as tmp:
        for workload in workloads:
            results += site_enforced(workload, targets, Path(tmp) / workload.folder.name)
        if not args.no_record_level:
            results += record_level(
                record,
                record_rounds,
                record_epochs,
                samples,
                Path(tmp) / "hello-dp",
                optimizers=list(OPTIMIZERS)[:1] if args.quick else list(OPTIMIZERS),
            )
    print()
    print(md_table(HEADERS, [r.row() for r in results]))
    return results


if __name__ == "__main__":
    main()
