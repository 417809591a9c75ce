"""Secure aggregation against plain FedAvg: one round's time and the bytes each site sends.

Models: hello-pt's CNN (62,006 float32 parameters) and a 25,000,000-parameter one-block
transformer (``benchlib.TRANSFORMER_25M_SHAPES``), with 3, 10 and 50 sites; protections:
masking (SecAgg+, :mod:`client_agent.secagg.session`) and homomorphic encryption (CKKS,
:mod:`client_agent.secagg.he_session`), each against a plain FedAvg round measured in the same
run, the same way.

What a round is, like for like. Sites work in parallel, each on its own machine, so a round
takes the *slowest site's* work *plus the server's* work. Both sides count the same kinds of
steps, for plain and protected rounds alike: what a site does to turn its trained weights into
the file it sends, and what the server does from the files it received to the next global
model's file. Every file goes through a temporary folder on disk, as on the portal's storage.

* site, plain: writing its update file (``client_agent.wire.write_model_file`` of an
  ``FLModel`` with its float32 weights and ``NUM_STEPS_CURRENT_ROUND``): what it sends.
* site, masking or HE: its weighted update (``Layout.update_vector``, as the agent makes it:
  the checked tensors and their weight), the session's phases (keys: fresh key pairs and the
  advert; shares: sealing Shamir shares, or the key holder's CKKS context; protect: adding the
  quantized weighted tensors to the masks, or encrypting; finish: revealing shares, or, for
  the site asked, reading and decrypting the encrypted sum) and writing the protected file
  (``client_agent.secagg.upload.write_protected``). A masking site draws its masks
  (``MaskingSite.prepare``: opening its neighbours' shares, agreeing the pairwise seeds and
  drawing its 1 + degree masks) as soon as the upload phase's setup is in, which the agent
  does while its script trains: that is timed in its own column (``site s while training``)
  and not counted in the round; the verdict also gives the round with it counted.
* server, plain: each file's update check (``jobs.workflows.result_from_file``, the portal's
  and SimEnv's check), FedAvg over the files (``workflow.close`` of a ``FedAvg`` workflow over
  ``SiteUpdate.from_file`` results, as the portal's close reads them; the ``fedavg`` folding),
  writing the new global model (``jobs.workflows.base.write_global_model``).
* server, masking or HE: checking the adverts and shares, each upload's check (as the portal's
  ``protected_upload_check``: the file's header, weight and metrics, then the session's
  ``check_upload`` over the protected bytes, ``read_protected(path).open(path)``), for HE the
  sum (the session's ``total`` over the files' streams, into a file, for the site that
  decrypts it), the finish (checking the answers and ``result`` over memory maps of the
  files: masking recovers the shares and sums the uploads while it removes the masks, in one
  pass on every core; HE reads the decrypted sum), the close from the sum
  (``jobs.workflows.secure.close_from_sum`` with the same FedAvg workflow) and writing the
  new global model like plain.

Training, the network, the database and the portal's queueing are left out of both. Also
left out: the agent reading the released update file back before protecting it (the plain
path sends that file as it is), which favours protection by a read of the float32 file.
A site's bytes are what it sends in the round: plain, its update file (float32, about 4 B a
parameter); masking, its keys, shares, protected file (ring elements of Z/2**64, 8 B a
parameter) and answer; HE, the same with a ~330 KB CKKS ciphertext per 4096 values (about
81 B a parameter) and, for the site asked, the decrypted sum (float64).

How it is timed. Each path (plain, masking, HE) runs one untimed warm-up round per model
first; then a row is the best of N rounds (the lowest slowest-site + server time, with the
median of the N beside it): N = 7 at 62k, 3 at 25M (``how`` says N; "1 run" where a round is
too long to repeat). Sites run one after another in this process, so "slowest site" is the
largest of the sites' own times in that round. Site updates are ``0.02·N(0, 1)`` float32
weights with weights 1–4; with more sites than distinct parameter sets held in memory (25M:
ten, 1 GB), sites share a set but not a weight.

What is measured for real and what is modelled (the ``how`` column says which, per row):

* ``measured``: whole rounds as above, every site a separate session with its own secrets,
  the server removing real masks (or adding real ciphertexts). Each protected round's sum is
  checked against the exact float64 weighted sum of the same updates (``check`` column: the
  largest deviation of the mean over its bound, the worst of the row's rounds:
  :func:`client_agent.secagg.session.error_bound` for masking, ``client_agent.he.PRECISION``
  over the total weight for HE; ≤ 1 passes). A plain row's ``how`` gives the largest
  deviation of the written global model from the exact mean (float32 rounding).
* ``1 dropped``: the same with the last site dropping out after sending its shares (the case
  the Shamir shares exist for): the server also recovers its mask key and regenerates the
  masks it shared with its surviving neighbours.
* ``modelled`` (masking, 25M × 50: fifty 200 MB uploads would be 10 GB and fifty sites'
  masking minutes of one core): the protocol runs for all 50 sessions through keys and
  shares, then one site (with the real roster's degree) draws its masks and does its vector,
  protect, write and finish for real; the server checks 50 upload files, the first site's
  and hard links to the ten real uploads of the 25M × 10 round (the sum of those is not a
  masked sum of these sites, so it is not checked), and sums them while it removes the 50
  sites' real self masks (``masking.unmask_sum`` with each session's self seed, taken from
  the sessions rather than recovered from shares: Lagrange interpolation of 50 seeds takes
  milliseconds, measured inside the 62k × 50 round); then the close from that sum and the
  global model's write.
* ``extrapolated`` (HE, 25M: about 6,100 ciphertexts of 330 KB, 2 GB, per site and minutes of
  encryption): a real 3-site HE round as above over the first 1,048,576 values (a one-tensor
  model), scaled linearly: the steps over the values (vector, protect, write, finish; the
  server's checks, sum, finish, close and write) by the number of ciphertexts, the server's
  per-site steps (keys and shares, checks, sum) by sites / 3 as well; the keys and the key
  holder's context are not scaled (the 3-site figure stands for all: the context's sealed
  copies add about 0.05 s at 50 sites in the 62k rounds); bytes from the measured file size
  and the key holder's sealed contexts.

The target for masking is a round at most 2× plain FedAvg's at 25M × 10 sites; the verdict
is printed with where each round's time goes. Timings depend on how busy the machine's
cores are: the load average is printed before and after.

    .venv/bin/python bench/secure_aggregation.py           # about 2 minutes on 2 cores
    .venv/bin/python bench/secure_aggregation.py --quick   # 2k/9k parameters, for the tests
                                                            # (its verdict is at 2k × 5)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch
from benchlib import md_table, median
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from client_agent import he
from client_agent.fl_model import FLMetaKey, FLModel, ParamsType
from client_agent.secagg import masking, prg, ring
from client_agent.secagg.he_session import batches_in
from client_agent.secagg.local import sessions_for
from client_agent.secagg.session import (
    HOMOMORPHIC,
    MASKING,
    MaskingServer,
    MaskingSite,
    SumsBeforeFinish,
    b64,
    error_bound,
    round_context,
)
from client_agent.secagg.upload import (
    protected_arrays,
    read_protected,
    sum_uploads,
    write_protected,
)
from client_agent.secagg.vector import Layout
from client_agent.wire import load_state_dict, write_model_file
from jobs.aggregation import FileTensorSource, MemoryTensorSource, SiteUpdate
from jobs.numbers import check_result_metrics, check_update_weight
from jobs.workflows import (
    FedAvg,
    TaskResult,
    TrainResult,
    close_result,
    fill_withheld,
    result_from_file,
)
from jobs.workflows.base import write_global_model
from jobs.workflows.secure import close_from_sum, layout_of

JOB = "bench-secagg"
ROUND = 1
PLAIN = "plain FedAvg"
TARGET_RATIO = 2.0
TARGET = ("25M", 10)
"""The target: masking's round ≤ 2× plain FedAvg's at this model and site count."""
QUICK_TARGET = ("2k", 5)
"""``--quick`` states its verdict here, so the tests run the verdict's code too."""
MAX_PARAM_SETS_ELEMENTS = 250_000_000
"""Distinct float32 parameter sets kept in memory at most (1 GB); more sites share them."""
WEIGHT_KEY = FLMetaKey.NUM_STEPS_CURRENT_ROUND

HELLO_PT_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (6, 3, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}
"""hello-pt's CIFAR-10 CNN (NVFlare's ``SimpleNetwork``): 62,006 parameters."""

HEADERS = [
    "model",
    "sites",
    "protection",
    "how",
    "slowest site s",
    "server s",
    "site s while training",
    "round s",
    "median round s",
    "× plain",
    "sent/site MB",
    "upload B/param",
    "check",
]


@dataclass(frozen=True)
class ModelCase:
    """One model and how each protection is measured on it."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    sites: tuple[int, ...]
    masking_real_up_to: int
    """Masked rounds with more sites are modelled (one site's work, reused uploads)."""
    drop_at: int | None
    """The site count of the round with one site dropped, if any."""
    he_slice: int | None
    """None: HE rounds are measured whole; else extrapolated from a round over this many
    values."""
    plain_runs: int
    masking_runs: int
    he_runs: int
    drop_runs: int

    @property
    def numel(self) -> int:
        return benchlib.numel(self.shapes)


# --------------------------------------------------------------------------------------------
# One round's clock
# --------------------------------------------------------------------------------------------


class Clock:
    """Seconds per step: each site's own (the sites run in parallel on their own machines) and
    the server's."""

    def __init__(self) -> None:
        self.site_steps: dict[str, dict[str, float]] = {}
        self.server_steps: dict[str, float] = {}
        self.training_steps: dict[str, dict[str, float]] = {}
        """Each site's work done while its script trains (masking draws its masks once the
        upload phase's setup is in): timed, but not on the round's critical path."""

    @contextmanager
    def site(self, site: str, step: str, *, while_training: bool = False) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            into = self.training_steps if while_training else self.site_steps
            steps = into.setdefault(site, {})
            steps[step] = steps.get(step, 0.0) + time.perf_counter() - started

    @contextmanager
    def server(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.server_steps[step] = self.server_steps.get(step, 0.0) + (
                time.perf_counter() - started
            )

    @property
    def slowest(self) -> dict[str, float]:
        """The steps of the site whose work took longest."""
        return max(self.site_steps.values(), key=lambda steps: sum(steps.values()))

    @property
    def site_s(self) -> float:
        return sum(self.slowest.values())

    @property
    def while_training_s(self) -> float:
        """The most any site worked while its script trained."""
        return max((sum(steps.values()) for steps in self.training_steps.values()), default=0.0)

    @property
    def server_s(self) -> float:
        return sum(self.server_steps.values())

    @property
    def round_s(self) -> float:
        return self.site_s + self.server_s


@dataclass
class RoundRun:
    """What one round gave: its clock, the bytes a site sent on average, the upload's size
    (median over sites) and its check (None: not checked)."""

    clock: Clock
    sent_per_site: float
    upload_bytes: float
    check: float | None
    degree: int | None = None


@dataclass
class Row:
    model: str
    params: int
    sites: int
    protection: str
    how: str
    site_s: float
    server_s: float
    median_s: float | None
    """The median round time of the row's rounds (None: one round)."""
    sent_per_site: float
    upload_bytes: float
    deviation: float | None
    """Largest deviation of the mean from the exact one, over its bound (None: not checked)."""
    site_steps: dict[str, float] = field(default_factory=dict)
    """The slowest site's steps in the best round."""
    server_steps: dict[str, float] = field(default_factory=dict)
    while_training_s: float = 0.0
    """The most a site worked while its script trained (masking: drawing its masks)."""
    plain_s: float = float("nan")

    @property
    def round_s(self) -> float:
        return self.site_s + self.server_s

    @property
    def ratio(self) -> float:
        return self.round_s / self.plain_s

    def row(self) -> list[str]:
        return [
            self.model,
            str(self.sites),
            self.protection,
            self.how,
            f"{self.site_s:.3f}",
            f"{self.server_s:.3f}",
            f"{self.while_training_s:.3f}",
            f"{self.round_s:.3f}",
            "—" if self.median_s is None else f"{self.median_s:.3f}",
            f"{self.ratio:.1f}×",
            f"{self.sent_per_site / 1e6:.2f}",
            f"{self.upload_bytes / self.params:.1f}",
            "—" if self.deviation is None else f"{self.deviation:.2f}",
        ]


def row_of(case: ModelCase, sites: int, protection: str, how: str, runs: Sequence[RoundRun]) -> Row:
    """The row of ``runs`` (one or more rounds of the same kind): the best round's times, the
    median round time, the worst check."""
    best = min(runs, key=lambda r: r.clock.round_s)
    checks = [r.check for r in runs if r.check is not None]
    if len(runs) > 1:
        how += f", best of {len(runs)}"
    elif not how.startswith(("modelled", "extrapolated")):
        how += ", 1 run"
    return Row(
        case.name,
        case.numel,
        sites,
        protection,
        how,
        best.clock.site_s,
        best.clock.server_s,
        median([r.clock.round_s for r in runs]) if len(runs) > 1 else None,
        best.sent_per_site,
        best.upload_bytes,
        max(checks) if checks else None,
        site_steps=dict(best.clock.slowest),
        server_steps=dict(best.clock.server_steps),
        while_training_s=best.clock.while_training_s,
    )


# --------------------------------------------------------------------------------------------
# The sites' updates
# --------------------------------------------------------------------------------------------


@dataclass
class Updates:
    """The sites' updates of one model: float32 parameter sets (shared round-robin when there
    are more sites than sets) and each site's weight."""

    shapes: dict[str, tuple[int, ...]]
    global_params: dict[str, torch.Tensor]
    param_sets: list[dict[str, torch.Tensor]]
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout.of(self.shapes)

    @staticmethod
    def name(index: int) -> str:
        return f"site-{index + 1:02d}"

    @staticmethod
    def weight(index: int) -> float:
        return float(1 + index % 4)

    def params(self, index: int) -> dict[str, torch.Tensor]:
        return self.param_sets[index % len(self.param_sets)]

    def exact_sum(self, sites: Sequence[int]) -> tuple[np.ndarray, float]:
        """The float64 weighted sum of the sites' updates, and their total weight (the
        sites that share a parameter set summed as one, with their weights added)."""
        per_set: dict[int, float] = {}
        for i in sites:
            per_set[i % len(self.param_sets)] = per_set.get(i % len(self.param_sets), 0.0) + (
                self.weight(i)
            )
        total = np.zeros(self.layout.length)
        for index, weight in per_set.items():
            total += self.layout.flatten(self.param_sets[index], weight=weight)
        return total, math.fsum(self.weight(i) for i in sites)


def make_updates(case: ModelCase) -> Updates:
    count = max(1, min(max(case.sites), MAX_PARAM_SETS_ELEMENTS // case.numel))
    sets = []
    for seed in range(count):
        params = benchlib.random_params(case.shapes, seed=seed + 1)
        sets.append({n: t.mul_(0.02) for n, t in params.items()})
    return Updates(case.shapes, benchlib.random_params(case.shapes, seed=0), sets)


def slice_updates(updates: Updates, length: int, count: int) -> Updates:
    """A one-tensor model of the first ``length`` values of the first ``count`` parameter
    sets (the model HE's 25M rows are extrapolated from)."""
    shapes: dict[str, tuple[int, ...]] = {"slice": (length,)}
    sets = [
        {"slice": torch.from_numpy(updates.layout.flatten(p)[:length].astype(np.float32))}
        for p in updates.param_sets[:count]
    ]
    return Updates(shapes, {"slice": torch.zeros(length)}, sets)


def json_size(message: Mapping[str, Any]) -> int:
    return len(json.dumps(message).encode())


def deviation(total: np.ndarray, exact: np.ndarray, *, weight: float, bound: float) -> float:
    """max |total − exact| / weight (the deviation of the mean), over ``bound``."""
    worst = 0.0
    for start in range(0, len(total), 1 << 22):
        stop = start + (1 << 22)
        worst = max(worst, float(np.max(np.abs(total[start:stop] - exact[start:stop]))))
    return worst / weight / bound


def fedavg_workflow(kind: str | None = None) -> FedAvg:
    return FedAvg(min_clients=2, num_rounds=2, key_metric=None, secure_aggregation=kind)


# --------------------------------------------------------------------------------------------
# The rounds
# --------------------------------------------------------------------------------------------


def plain_round(updates: Updates, sites: int, folder: Path, global_path: Path) -> RoundRun:
    """A plain FedAvg round through files: each site writes its update file; the server
    checks each, folds them and writes the next global model. Checked against the exact mean
    (the largest deviation of the written float32 model, in ``check``)."""
    clock = Clock()
    names = [updates.name(i) for i in range(sites)]
    workflow = fedavg_workflow()
    state = workflow.initial_state(names)
    plan = workflow.plan(ROUND, names, state)
    paths = {}
    for i, name in enumerate(names):
        paths[name] = folder / f"{name}.safetensors"
        with clock.site(name, "write"):
            model = FLModel(
                params_type=ParamsType.FULL,
                params=updates.params(i),
                meta={WEIGHT_KEY: updates.weight(i)},
            )
            write_model_file(paths[name], model)
    global_source = FileTensorSource(global_path)
    results: list[TaskResult] = []
    try:
        specs = global_source.specs()  # once per job on the portal and in SimEnv
        for name in names:
            task = plan.task_for(name)
            assert task is not None
            with clock.server("check"):
                close_result(result_from_file(task, paths[name], specs))
        with clock.server("FedAvg"):
            for name in names:
                results.append(TrainResult(name, SiteUpdate.from_file(name, paths[name])))
            fill_withheld(results, global_source)
            outcome = workflow.close(ROUND, plan, global_source, results, state)
    finally:
        for result in results:
            close_result(result)
        global_source.close()
    next_path = folder / "global-next.safetensors"
    assert outcome.global_params is not None
    with clock.server("write"):
        write_global_model(next_path, workflow, outcome.state, outcome.global_params)
    del outcome
    exact, weight = updates.exact_sum(range(sites))
    written = updates.layout.flatten(load_state_dict(next_path))
    check = float(np.max(np.abs(written - exact / weight)))
    sizes = [p.stat().st_size for p in paths.values()]
    return RoundRun(clock, sum(sizes) / len(sizes), median(sizes), check)


def protected_round(
    kind: str, updates: Updates, sites: int, folder: Path, global_path: Path, *, drop: bool = False
) -> RoundRun:
    """A whole protected round through files (see the module's docstring for the steps);
    with ``drop``, the last site drops out after sending its shares. ``check``: the sum's
    largest deviation from the exact one, over its bound."""
    site_cls, server_cls = sessions_for(kind)
    clock = Clock()
    names = [updates.name(i) for i in range(sites)]
    dropped = {names[-1]} if drop else set()
    context = round_context(JOB, ROUND)
    layout = updates.layout
    server = server_cls(job=JOB, round_number=ROUND, length=layout.length, min_sites=0)
    sent = dict.fromkeys(names, 0)
    sessions = {}
    adverts = {}
    for name in names:
        with clock.site(name, "keys"):
            sessions[name] = site_cls(name, context=context, round_number=ROUND)
            message = sessions[name].advertise()
        sent[name] += json_size(message)
        with clock.server("keys and shares"):
            adverts[name] = server.check_advert(name, message)
    with clock.server("keys and shares"):
        roster = server.roster(adverts)
        roster_json = roster.to_json()
    shares = {}
    for name in roster.sites:
        with clock.site(name, "shares"):
            message = sessions[name].share(roster_json)
        sent[name] += json_size(message)
        with clock.server("keys and shares"):
            shares[name] = server.check_shares(roster, name, message)
    with clock.server("keys and shares"):
        setups = server.setups(roster, shares)
    paths: dict[str, Path] = {}
    checked: dict[str, tuple[float, dict[str, float]]] = {}
    model_names = set(layout.names)
    for i, name in enumerate(names):
        if name in dropped:
            continue
        path = folder / f"{name}.protected.safetensors"
        # What the agent does once the setup is in, while its script trains (here, site by
        # site: one site's masks in memory at a time, as on the sites' own machines).
        with clock.site(name, "prepare", while_training=True):
            sessions[name].prepare(setups[name])
        with clock.site(name, "vector"):
            vector = layout.update_vector(
                updates.params(i), weight=updates.weight(i), model_names=model_names
            )
        with clock.site(name, "protect"):
            data = sessions[name].protect(vector, setups[name])
        del vector
        with clock.site(name, "write"):
            write_protected(
                path,
                data,
                params_type=str(ParamsType.FULL),
                metrics={},
                meta={WEIGHT_KEY: updates.weight(i)},
            )
        del data
        paths[name] = path
        sent[name] += path.stat().st_size
        with clock.server("check"):
            # The portal's protected_upload_check, less its database.
            upload = read_protected(path)
            fields = FLModel(**upload.fields)
            weight = check_update_weight(fields.weight)
            metrics = check_result_metrics(fields.metrics or {})
            with upload.open(path) as stream:
                server.check_upload(roster, name, stream, shares)
        checked[name] = (weight, metrics)
    survivors = sorted(checked)
    shared = list(setups)
    total_path = folder / "total.bin"
    if isinstance(server, SumsBeforeFinish):  # HE: the site asked decrypts the stored sum
        with clock.server("sum"):
            sum_uploads(server, roster, [(n, paths[n]) for n in survivors], shares, total_path)
    with clock.server("finish"):
        requests = server.finish_requests(roster, shared, survivors)
    answers = {}
    for name, request in requests.items():
        with clock.site(name, "finish"):
            total = total_path.read_bytes() if request.get("total") else b""
            answer, data = sessions[name].finish(request, total)
            del total
        sent[name] += json_size(answer) + len(data)
        with clock.server("finish"):
            server.check_finish(roster, name, request, answer, data)
        answers[name] = (answer, data)
    with clock.server("finish"):
        # Masking sums the uploads and removes the masks here, in one pass (as the portal's
        # protected_sum, which maps the files for it alone).
        uploads = (
            {}
            if isinstance(server, SumsBeforeFinish)
            else protected_arrays({n: paths[n] for n in survivors})
        )
        summed = server.result(roster, shared, survivors, answers, uploads)
    del answers, uploads
    workflow = fedavg_workflow(kind)
    state = workflow.initial_state(names)
    plan = workflow.plan(ROUND, names, state)
    outcome = close_and_write(
        clock, workflow, plan, state, global_path, folder, summed, paths, checked
    )
    del outcome
    indices = [i for i, n in enumerate(names) if n not in dropped]
    exact, weight = updates.exact_sum(indices)
    bound = error_bound(len(indices), weight) if kind == MASKING else he.PRECISION / weight
    check = deviation(summed, exact, weight=weight, bound=bound)
    sizes = [p.stat().st_size for p in paths.values()]
    return RoundRun(
        clock, sum(sent.values()) / len(sent), median(sizes), check, degree=roster.degree
    )


def close_and_write(
    clock: Clock,
    workflow: FedAvg,
    plan: Any,
    state: Any,
    global_path: Path,
    folder: Path,
    summed: np.ndarray,
    paths: Mapping[str, Path],
    checked: Mapping[str, tuple[float, dict[str, float]]],
) -> Any:
    """The server's close from the sum (the portal's ``_round_close_protected``) and the next
    global model's write, timed."""
    with clock.server("close"):
        survivors = [
            SiteUpdate(
                site=name,
                source=MemoryTensorSource({}),
                weight=weight,
                params_type=ParamsType(
                    read_protected(paths[name]).fields["params_type"] or ParamsType.FULL
                ),
                metrics=metrics,
            )
            for name, (weight, metrics) in sorted(checked.items())
        ]
        global_source = FileTensorSource(global_path)
        try:
            layout = layout_of(workflow, global_source.specs())
            outcome = close_from_sum(
                workflow, ROUND, plan, global_source, layout, summed, survivors, state
            )
        finally:
            global_source.close()
    assert outcome.global_params is not None
    with clock.server("write"):
        write_global_model(
            folder / "global-next.safetensors", workflow, outcome.state, outcome.global_params
        )
    return outcome


def modelled_masking(
    case: ModelCase,
    updates: Updates,
    sites: int,
    reuse: Sequence[Path],
    folder: Path,
    global_path: Path,
) -> RoundRun:
    """One real site's work at ``sites`` sites; the server's checks and sum over that site's
    file and ``reuse`` (hard links), its unmasking of ``sites`` real self masks, the close and
    the write (see the module's docstring)."""
    clock = Clock()
    context = round_context(JOB, ROUND)
    layout = updates.layout
    names = [updates.name(i) for i in range(sites)]
    me = names[0]
    server = MaskingServer(job=JOB, round_number=ROUND, length=layout.length, min_sites=0)
    sessions: dict[str, MaskingSite] = {}
    sent = 0
    adverts = {}
    for name in names:
        with clock.site(name, "keys"):
            sessions[name] = MaskingSite(name, context=context, round_number=ROUND)
            message = sessions[name].advertise()
        sent += json_size(message) if name == me else 0
        with clock.server("keys and shares"):
            adverts[name] = server.check_advert(name, message)
    with clock.server("keys and shares"):
        roster = server.roster(adverts)
        roster_json = roster.to_json()
    shares = {}
    for name in names:
        with clock.site(name, "shares"):
            message = sessions[name].share(roster_json)
        sent += json_size(message) if name == me else 0
        with clock.server("keys and shares"):
            shares[name] = server.check_shares(roster, name, message)
    with clock.server("keys and shares"):
        setups = server.setups(roster, shares)
    with clock.site(me, "prepare", while_training=True):
        sessions[me].prepare(setups[me])
    mine = folder / f"{me}.protected.safetensors"
    with clock.site(me, "vector"):
        vector = layout.update_vector(
            updates.params(0), weight=updates.weight(0), model_names=set(layout.names)
        )
    with clock.site(me, "protect"):
        data = sessions[me].protect(vector, setups[me])
    del vector
    with clock.site(me, "write"):
        write_protected(
            mine,
            data,
            params_type=str(ParamsType.FULL),
            metrics={},
            meta={WEIGHT_KEY: updates.weight(0)},
        )
    del data
    sent += mine.stat().st_size
    paths = {me: mine}
    for i, name in enumerate(names[1:]):
        paths[name] = folder / f"{name}.protected.safetensors"
        os.link(reuse[i % len(reuse)], paths[name])
    checked = {}
    for name in names:
        with clock.server("check"):
            upload = read_protected(paths[name])
            fields = FLModel(**upload.fields)
            weight = check_update_weight(fields.weight)
            metrics = check_result_metrics(fields.metrics or {})
            with upload.open(paths[name]) as stream:
                server.check_upload(roster, name, stream, shares)
        checked[name] = (weight, metrics)
    with clock.server("finish"):
        requests = server.finish_requests(roster, names, names)
    with clock.site(me, "finish"):
        answer, data = sessions[me].finish(requests[me])
    sent += json_size(answer) + len(data)
    index = {n: i for i, n in enumerate(roster.sites)}
    with clock.server("finish"):
        server.check_finish(roster, me, requests[me], answer, data)
        uploads = protected_arrays({n: paths[n] for n in names})
        summed = ring.dequantize(
            masking.unmask_sum(
                [uploads[n].view("<u8") for n in names],
                survivors=range(sites),
                graph=roster.graph,
                self_seeds={index[n]: sessions[n].self_seed for n in names},
                dropped_keys={},
                public_keys={},
                context=context,
                nonce=prg.round_nonce(ROUND),
            ),
            in_place=True,
        )
    del uploads
    workflow = fedavg_workflow(MASKING)
    state = workflow.initial_state(names)
    plan = workflow.plan(ROUND, names, state)
    close_and_write(clock, workflow, plan, state, global_path, folder, summed, paths, checked)
    # Only the real site's work counts as "the slowest site": the others did keys and shares.
    clock.site_steps = {me: clock.site_steps[me]}
    return RoundRun(clock, sent, 8 * layout.length, None, degree=roster.degree)


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


class Runner:
    """Rounds in fresh folders under one temporary folder (removed after each round, unless
    kept for reuse), with one untimed warm-up round per path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.warm: set[tuple[str, str]] = set()

    def folder(self) -> Path:
        self.count += 1
        path = self.root / f"round-{self.count:03d}"
        path.mkdir()
        return path

    def rounds(
        self, runs: int, once: Callable[[Path], RoundRun], *, keep_last: bool = False
    ) -> tuple[list[RoundRun], Path | None]:
        done, kept = [], None
        for n in range(runs):
            folder = self.folder()
            done.append(once(folder))
            if keep_last and n == runs - 1:
                kept = folder
            else:
                shutil.rmtree(folder)
        return done, kept

    def warm_up(self, key: tuple[str, str], once: Callable[[Path], RoundRun]) -> None:
        if key not in self.warm:
            self.warm.add(key)
            self.rounds(1, once)


def he_extrapolated(case: ModelCase, updates: Updates, slice_len: int, runner: Runner) -> list[Row]:
    """HE rows for every site count, scaled from a real 3-site round over ``slice_len``
    values."""
    small = slice_updates(updates, slice_len, 3)
    global_path = runner.root / "global-slice.safetensors"
    write_model_file(global_path, FLModel(params_type=ParamsType.FULL, params=small.global_params))
    tiny = slice_updates(updates, he.POLY_MODULUS_DEGREE // 2, 3)
    tiny_global = runner.root / "global-tiny.safetensors"
    write_model_file(tiny_global, FLModel(params_type=ParamsType.FULL, params=tiny.global_params))
    runner.warm_up(
        (case.name, HOMOMORPHIC),
        lambda folder: protected_round(HOMOMORPHIC, tiny, 3, folder, tiny_global),
    )
    (run,), _ = runner.rounds(
        1, lambda folder: protected_round(HOMOMORPHIC, small, 3, folder, global_path)
    )
    scale = batches_in(updates.layout.length) / batches_in(slice_len)
    upload = run.upload_bytes * scale
    context = he.HEContext.create()
    public = len(b64(context.public_bytes()))
    secret = len(b64(context.secret_bytes()))  # each sealed box holds one, base64
    # What grows with the values (ciphertexts) and what with the sites: the keys and the
    # context do not depend on the model's size.
    per_value = {"vector", "protect", "write", "finish", "check", "sum", "close"}
    per_site = {"check", "sum", "keys and shares"}
    rows = []
    for sites in case.sites:
        clock = Clock()
        clock.site_steps = {
            "site": {k: v * (scale if k in per_value else 1) for k, v in run.clock.slowest.items()}
        }
        clock.server_steps = {
            k: v * (scale if k in per_value else 1) * (sites / 3 if k in per_site else 1)
            for k, v in run.clock.server_steps.items()
        }
        sent = upload + (public + (sites - 1) * secret) / sites
        how = f"extrapolated ×{scale:.1f} from a {slice_len:,}-value 3-site round"
        scaled = RoundRun(clock, sent, upload, run.check)
        rows.append(row_of(case, sites, HOMOMORPHIC, how, [scaled]))
    return rows


def measure(case: ModelCase, emit: Callable[[Row], None]) -> list[Row]:
    started = time.perf_counter()
    updates = make_updates(case)
    print(
        f"### {case.name}: {case.numel:,} float32 parameters, {len(updates.param_sets)} "
        f"distinct parameter sets ({time.perf_counter() - started:.1f} s to make)\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as root:
        runner = Runner(Path(root))
        global_path = runner.root / "global.safetensors"
        write_global_model(global_path, fedavg_workflow(), fedavg_workflow().initial_state([]),
                           updates.global_params)  # fmt: skip
        rows = measure_in(case, updates, runner, global_path, emit)
    print(flush=True)
    return rows


def measure_in(
    case: ModelCase,
    updates: Updates,
    runner: Runner,
    global_path: Path,
    emit: Callable[[Row], None],
) -> list[Row]:
    rows: list[Row] = []

    def add(row: Row) -> None:
        row.plain_s = plain[row.sites]
        rows.append(row)
        emit(row)

    first = case.sites[0]
    plain: dict[int, float] = {}
    runner.warm_up(
        (case.name, PLAIN), lambda folder: plain_round(updates, first, folder, global_path)
    )
    for sites in case.sites:
        runs, _ = runner.rounds(
            case.plain_runs,
            partial(plain_round, updates, sites, global_path=global_path),
        )
        row = row_of(case, sites, PLAIN, "measured", runs)
        row.how += f" (float32 vs exact: {max(r.check or 0.0 for r in runs):.1e})"
        row.deviation = None
        plain[sites] = row.round_s
        add(row)

    def masked(sites: int, *, drop: bool = False) -> Callable[[Path], RoundRun]:
        return lambda folder: protected_round(
            MASKING, updates, sites, folder, global_path, drop=drop
        )

    runner.warm_up((case.name, MASKING), masked(first))
    reuse: Path | None = None
    largest_real = max(s for s in case.sites if s <= case.masking_real_up_to)
    for sites in case.sites:
        if sites <= case.masking_real_up_to:
            runs, kept = runner.rounds(
                case.masking_runs, masked(sites), keep_last=sites == largest_real
            )
            reuse = kept or reuse
            add(row_of(case, sites, MASKING, "measured", runs))
        else:
            assert reuse is not None
            uploads = sorted(reuse.glob("*.protected.safetensors"))
            (run,), _ = runner.rounds(
                1,
                partial(modelled_masking, case, updates, sites, uploads, global_path=global_path),
            )
            how = (
                f"modelled: 1 site (degree {run.degree}) + server over {len(uploads)} real "
                "uploads reused"
            )
            add(row_of(case, sites, MASKING, how, [run]))
        if sites == case.drop_at:
            runs, _ = runner.rounds(case.drop_runs, masked(sites, drop=True))
            add(row_of(case, sites, MASKING, "measured, 1 dropped after shares", runs))
    if reuse is not None:
        shutil.rmtree(reuse)
    if case.he_slice is None:
        runner.warm_up(
            (case.name, HOMOMORPHIC),
            lambda folder: protected_round(HOMOMORPHIC, updates, first, folder, global_path),
        )
        for sites in case.sites:
            runs, _ = runner.rounds(
                case.he_runs,
                partial(protected_round, HOMOMORPHIC, updates, sites, global_path=global_path),
            )
            add(row_of(case, sites, HOMOMORPHIC, "measured", runs))
    else:
        for row in he_extrapolated(case, updates, case.he_slice, runner):
            add(row)
    return rows


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


def best_seconds(call: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def cipher_seconds(length: int) -> float:
    """Best of 3: the masks' AES-256-CTR key stream for ``length`` ring elements, written into
    buffers made
    once, the cipher's own cost."""
    zeros = bytes(8 * length)
    out = bytearray(8 * length + 64)

    def stream() -> None:
        cipher = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor()
        cipher.update_into(zeros, out)

    return best_seconds(stream)


def steps_text(steps: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in steps.items())


def verdict(rows: Sequence[Row], target: tuple[str, int], numel: int) -> None:
    model, sites = target
    found = [
        r
        for r in rows
        if (r.model, r.sites, r.protection) == (model, sites, MASKING)
        and r.how.startswith("measured,")
        and "dropped" not in r.how
    ]
    plains = [r for r in rows if (r.model, r.sites, r.protection) == (model, sites, PLAIN)]
    if not found or not plains:
        return
    row, plain = found[0], plains[0]
    met = row.ratio <= TARGET_RATIO
    budget = TARGET_RATIO * row.plain_s
    if met:
        outcome = f"MET, {budget - row.round_s:.2f} s to spare ({row.ratio:.2f}× of the 2×)"
    else:
        outcome = (
            f"NOT MET, {row.round_s - budget:.2f} s over ({row.ratio / TARGET_RATIO:.2f}× the "
            "target)"
        )
    print(
        f"\ntarget: masking at {model} × {sites} sites within {TARGET_RATIO:g}× plain FedAvg's "
        f"round: round {row.round_s:.2f} s (slowest site {row.site_s:.2f} s + server "
        f"{row.server_s:.2f} s) against plain {plain.round_s:.2f} s (slowest site "
        f"{plain.site_s:.2f} s + server {plain.server_s:.2f} s) = {row.ratio:.2f}×: {outcome}"
    )
    print(
        f"where the time goes (best rounds, seconds): plain: site: {steps_text(plain.site_steps)}; "
        f"server: {steps_text(plain.server_steps)}. masking: site: {steps_text(row.site_steps)}; "
        f"server: {steps_text(row.server_steps)}."
    )
    every = [(f"site {k}", v) for k, v in row.site_steps.items()] + [
        (f"server {k}", v) for k, v in row.server_steps.items()
    ]
    every.sort(key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v:.2f} s ({v / row.round_s:.0%})" for k, v in every[:3])
    degree = masking.default_degree(sites)
    zeros = np.zeros(numel, dtype=np.uint64)
    seeds = [(bytes([i]) * prg.SEED_BYTES, False) for i in range(1 + degree)]
    masks = best_seconds(partial(prg.add_masks, zeros, seeds))
    cipher = cipher_seconds(numel) * (1 + degree)
    vector = np.random.default_rng(0).standard_normal(numel) * 0.02
    quantize = best_seconds(partial(ring.add_quantized, zeros, [vector], sites=sites))
    del vector, zeros
    drawn_after = row.round_s + row.while_training_s
    print(
        f"what dominates: the masked round's largest steps are {top}. Against plain, the "
        f"slowest site takes {row.site_s - plain.site_s:+.2f} s and the server "
        f"{row.server_s - plain.server_s:+.2f} s. A site draws its 1 + {degree} masks while "
        f"its script trains (`MaskingSite.prepare`: {row.while_training_s:.2f} s in the best "
        f"round; `prg.add_masks` alone {masks:.2f} s on {prg.workers()} thread(s), the "
        f"AES-CTR key streams {cipher:.2f} s of one core); after training it adds its "
        f"quantized update to them (`ring.add_quantized`, {quantize:.2f} s for {numel:,} "
        f"values). The server's finish sums the {sites} masked files and removes their self "
        "masks in one pass (`masking.unmask_sum`). Were the masks drawn after training, the "
        f"round would take {drawn_after:.2f} s ({drawn_after / row.plain_s:.2f}× plain). "
        "The protected file holds 8 B a value against plain's 4, so its write and the sum's "
        "read move twice plain's bytes; its check reads only the header and the size, where "
        "plain's reads every value (finite, the right dtype)."
    )
    drops = [r for r in rows if (r.model, r.sites) == target and "dropped" in r.how]
    if drops:
        drop = drops[0]
        print(
            f"recovery: with 1 site dropped the server takes {drop.server_s:.2f} s "
            f"({drop.server_s - row.server_s:+.2f} s against the round without a drop: "
            f"{steps_text(drop.server_steps)}) and the round {drop.round_s:.2f} s; "
            + (
                "that row is one run, so the difference holds this machine's noise too."
                if drop.median_s is None
                else "best rounds of each."
            )
        )


NVFLARE_NOTE = (
    "NVFlare's own HE overhead: no figure found in NVFlare's docs or repository through the "
    "search tool. The nearest published NVIDIA figure is for Clara Train 4.0, NVFlare's "
    "predecessor (developer.nvidia.com/blog/federated-learning-with-homomorphic-encryption/, "
    "which NVFlare's cifar10-real-world example links for HE): about 20 % more total training "
    "time and messages of 19 MB → 283 MB (≈ 15×), as summarised at "
    "engineering.fyi/article/federated-learning-with-homomorphic-encryption (the figures were "
    "not read on NVIDIA's page itself). It counts whole training rounds, GPU training "
    "included, so it does not compare with the protocol-only times above; the size ratio does "
    "(ours: upload B/param 81 against 4)."
)


def cases(quick: bool) -> list[ModelCase]:
    if quick:
        return [
            ModelCase(
                "2k", {"fc.weight": (40, 50), "fc.bias": (40,)}, (3, 5), 5, 5, None, 2, 2, 1, 1
            ),
            ModelCase(
                "9k", {"fc.weight": (90, 100), "fc.bias": (90,)}, (3, 5), 3, None, 4096, 2, 1, 1, 1
            ),
        ]
    return [
        ModelCase("62k", HELLO_PT_SHAPES, (3, 10, 50), 50, 10, None, 7, 7, 3, 3),
        ModelCase("25M", benchlib.TRANSFORMER_25M_SHAPES, (3, 10, 50), 10, 10, 1 << 20, 3, 3, 1, 1),
    ]


HEADER_TEXT = (
    "round = slowest site's work + the server's, each side counting the same kinds of steps, "
    "every file on disk ({fs}). site: plain writes its update file (write_model_file); "
    "masking/HE make the weighted update (update_vector), run keys, shares, protect (quantize "
    "into the masks, or encrypt) and finish (reveal shares, or decrypt the sum), and write the "
    "protected file (write_protected); a masking site draws its masks while its script "
    "trains (prepare: its own column, not in the round). server: plain checks each file "
    "(result_from_file), folds them (FedAvg workflow.close over the files) and writes the "
    "next global model; masking/HE check adverts, shares and each upload (check_upload on "
    "the file), HE sums the files (total) for the site that decrypts, finish (masking: sum "
    "the files and remove the masks in one pass; HE: take the decrypted sum), close from the "
    "sum (close_from_sum) and write the next global model. One untimed warm-up round per path; "
    "a row is the best of N rounds (N in `how`: 7 at 62k, 3 at 25M), the median beside it. "
    "Training, network and database left out. See the docstring for what is modelled."
)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2k and 9k parameters, 3 and 5 sites, in seconds"
    )
    args = parser.parse_args(argv)
    benchlib.print_header(
        "Secure aggregation against plain FedAvg: round time and bytes per site",
        HEADER_TEXT.format(fs=benchlib.filesystem(tempfile.gettempdir())),
    )
    print(f"load average before: {benchlib.load_average()}\n", flush=True)

    def emit(row: Row) -> None:
        print(" | ".join(row.row()), flush=True)

    started = time.perf_counter()
    rows: list[Row] = []
    all_cases = cases(args.quick)
    for case in all_cases:
        rows.extend(measure(case, emit))
    print(f"load average after: {benchlib.load_average()}\n")
    print(f"wall time of the whole run: {time.perf_counter() - started:.0f} s\n")
    print(md_table(HEADERS, [r.row() for r in rows]))
    target = QUICK_TARGET if args.quick else TARGET
    numel = next(c.numel for c in all_cases if c.name == target[0])
    verdict(rows, target, numel)
    print("\n" + NVFLARE_NOTE)
    return rows


if __name__ == "__main__":
    main()
