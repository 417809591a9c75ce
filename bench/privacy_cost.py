"""The agent's cost of enforcing a site's privacy policy on one round's update: 25M parameters.

The model is float32 with the layer shapes of an MLP with BatchNorm (three 2048×4096 linear
layers with their biases, a BatchNorm over 2048 features with its running statistics and its
integer ``num_batches_tracked``, a 4096-wide head): 25,188,353 parameters, 100.8 MB. The
script's result moves every weight (FULL params), far over the clip, as a script that does not
clip would.

For each clip scope (``model``: one norm over the whole update; ``layer``: each tensor to
``C/√L``), the bench times:

* ``privatize``, the enforcement itself (Δ = local − global, its norm, the clipping, the
  Gaussian noise from CSPRNG-seeded generators, back to FULL), with and without noise: the
  median and the best of the runs (the target is ≤ 0.2 s for clipping + noise);
* ``enforce_file``, what the agent runs on a round's result: read the script's file and the
  global model, ``privatize``, write the file that may leave; the file time is its total less
  its ``privatize`` time.

Each run works on fresh copies of the tensors (copied outside the timed span). After each
clip-only run the bench checks that the released update's norm is within the clip, so a
figure always comes from an enforcement that did its work.

Drawing the noise is most of the cost (about 7 ns an element on one core of this machine, and
the agent draws on every core), so the figures depend on how busy the cores are: the load
average is printed before and after.

    .venv/bin/python bench/privacy_cost.py            # about a minute
    .venv/bin/python bench/privacy_cost.py --quick    # a 250k-parameter model, for the tests
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import benchlib
import torch
from benchlib import md_table, median

from client_agent.fl_model import FLModel, ParamsType
from client_agent.privacy.enforce import enforce_file, privatize
from client_agent.privacy.policy import CLIP_SCOPES, PrivacyPolicy
from client_agent.wire import read_model_file, save_state_dict, write_model_file

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.1
TARGET_SECONDS = 0.2
HEADERS = [
    "clip scope",
    "step",
    "runs",
    "median s",
    "best s",
    "‖Δ‖ sent / C",
]


@dataclass(frozen=True)
class Row:
    scope: str
    step: str
    seconds: list[float]
    released_norm: float | None
    """‖released − global‖ / C of the last run (clip-only runs; None with noise)."""

    @property
    def median(self) -> float:
        return median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def row(self) -> list[str]:
        return [
            self.scope,
            self.step,
            str(len(self.seconds)),
            f"{self.median:.3f}",
            f"{self.best:.3f}",
            "—" if self.released_norm is None else f"{self.released_norm:.6f}",
        ]


def model(width: int) -> dict[str, torch.Tensor]:
    """A global model of ``6·width² + 11·width`` float32 parameters and one integer (25M for
    width 2048): width → 2·width → width (BatchNorm) → 2·width → 1."""
    generator = torch.Generator().manual_seed(0)

    def weights(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    return {
        "fc1.weight": weights(2 * width, width),
        "fc1.bias": weights(2 * width),
        "fc2.weight": weights(width, 2 * width),
        "fc2.bias": weights(width),
        "bn.weight": torch.ones(width),
        "bn.bias": torch.zeros(width),
        "bn.running_mean": weights(width),
        "bn.running_var": torch.ones(width),
        "bn.num_batches_tracked": torch.tensor(120, dtype=torch.int64),
        "fc3.weight": weights(2 * width, width),
        "fc3.bias": weights(2 * width),
        "head.weight": weights(1, 2 * width),
    }


def script_result(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a script that does not clip sends: every weight moved, ‖Δ‖ ≫ C."""
    generator = torch.Generator().manual_seed(1)
    return {
        name: tensor + torch.randn(tensor.shape, generator=generator) * 0.01
        if tensor.dtype.is_floating_point
        else tensor + 10
        for name, tensor in base.items()
    }


def released_norm(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """‖released − global‖₂ / C over the float tensors, in float64."""
    squares = [
        float(torch.sum((params[n].double() - base[n].double()) ** 2))
        for n, t in base.items()
        if t.dtype.is_floating_point
    ]
    return math.sqrt(math.fsum(squares)) / CLIP_NORM


def time_privatize(
    base: dict[str, torch.Tensor],
    local: dict[str, torch.Tensor],
    policy: PrivacyPolicy,
    runs: int,
) -> tuple[list[float], float | None]:
    """Seconds of each ``privatize`` run, and the clip check of a run without noise."""
    seconds, norm = [], None
    for _ in range(runs):
        params = {n: t.clone() for n, t in local.items()}
        started = time.perf_counter()
        privatize(params, base, params_type=ParamsType.FULL, policy=policy)
        seconds.append(time.perf_counter() - started)
        if not policy.adds_noise:
            norm = released_norm(params, base)
            if norm > 1.0:
                raise SystemExit(f"the released update's norm is {norm:.9f} C, over the clip")
    return seconds, norm


def time_enforce_file(
    folder: Path, global_path: Path, result_path: Path, policy: PrivacyPolicy, runs: int
) -> tuple[list[float], list[float]]:
    """Seconds of each ``enforce_file`` run in all, and of its reading and writing alone."""
    total, files = [], []
    out = folder / "released.safetensors"
    for _ in range(runs):
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        enforcement = enforce_file(result_path, global_path, out, policy=policy, report={})
        spent = time.perf_counter() - started
        total.append(spent)
        files.append(spent - enforcement.seconds)
    if not read_model_file(out).params:
        raise SystemExit("enforce_file wrote no params")
    return total, files


def measure(width: int, runs: int, folder: Path) -> list[Row]:
    base = model(width)
    local = script_result(base)
    count = sum(t.numel() for t in base.values())
    print(
        f"model: {count:,} parameters in {len(base)} tensors, "
        f"{sum(t.numel() * t.element_size() for t in base.values()) / 1e6:.1f} MB; "
        f"C = {CLIP_NORM:g}, σ = {NOISE_MULTIPLIER:g}; "
        f"script's ‖Δ‖ = {released_norm(local, base):.1f} C\n",
        flush=True,
    )
    global_path = save_state_dict(folder / "global.safetensors", base)
    result_path = write_model_file(
        folder / "result.safetensors", FLModel(params=local, params_type=ParamsType.FULL)
    )
    rows: list[Row] = []
    for scope in CLIP_SCOPES:
        clip = PrivacyPolicy(clip_norm=CLIP_NORM, clip_scope=scope)
        noisy = PrivacyPolicy(
            clip_norm=CLIP_NORM, clip_scope=scope, noise_multiplier=NOISE_MULTIPLIER
        )
        seconds, norm = time_privatize(base, local, clip, runs)
        rows.append(Row(scope, "privatize: clipping", seconds, norm))
        seconds, _ = time_privatize(base, local, noisy, runs)
        rows.append(Row(scope, "privatize: clipping + noise", seconds, None))
        total, files = time_enforce_file(folder, global_path, result_path, noisy, runs)
        rows.append(Row(scope, "enforce_file: in all", total, None))
        rows.append(Row(scope, "enforce_file: reading + writing", files, None))
        for row in rows[-4:]:
            print(" | ".join(row.row()), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 250k-parameter model, 2 runs")
    parser.add_argument("--runs", type=int, default=7, help="runs of each step (default 7)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    benchlib.print_header(
        "Cost of site-enforced privacy at the agent",
        "clipping + Gaussian noise (privatize) and the whole enforce_file of one round's "
        "FULL update, clip scope model and layer",
    )
    width, runs = (200, 2) if args.quick else (2048, args.runs)
    print(f"load average before: {benchlib.load_average()}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedportal-privacy-cost-") as tmp:
        rows = measure(width, runs, Path(tmp))
    print(f"\nload average after: {benchlib.load_average()}")
    print()
    print(md_table(HEADERS, [r.row() for r in rows]))
    if not args.quick:
        worst = max(r.median for r in rows if r.step == "privatize: clipping + noise")
        verdict = "within" if worst <= TARGET_SECONDS else "OVER"
        print(
            f"\nclipping + noise, slowest scope: median {worst:.3f} s, {verdict} the "
            f"{TARGET_SECONDS:g} s target"
        )
    return rows


if __name__ == "__main__":
    main()
