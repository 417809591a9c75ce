"""The site's policy applied to a result before it leaves (``client_agent.privacy.enforce``):
the released update never exceeds the clip, the noise has the policy's standard deviation and
cannot be predicted, excluded tensors are not in the file, integer buffers leave unchanged.

How far the measured norm of a release may pass ``C``: the agent clips in float32 to
``C·(1 − CLIP_MARGIN)``, adds the noise in float32, then adds the global model (FULL) and casts
to the tensor's dtype. The last two steps each round every element ``x`` by at most
``u·|x|`` (``u``: the dtype's unit roundoff, 2⁻²⁴ for float32, 2⁻¹¹ for float16, 2⁻⁸ for
bfloat16), or by half the smallest subnormal near zero. So the measured
``‖released − global‖`` may pass ``C`` by ``(u₃₂ + u)·‖x‖ + η·√n``, where ``x`` is what was
rounded: the clipped update (DIFF) or the released weights (FULL). That rounding happens after
the noise, so it is post-processing and costs no privacy; a FULL file cannot state the update
more precisely than its weights' own precision.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel, ParamsType
from client_agent.privacy import enforce
from client_agent.privacy.enforce import PrivacyRefusal, enforce_file, privatize
from client_agent.privacy.policy import PrivacyPolicy
from client_agent.wire import read_model_file, save_state_dict, write_model_file

FULL = ParamsType.FULL
DIFF = ParamsType.DIFF
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_SUBNORMAL = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
LARGEST = {torch.float32: 1e6, torch.float16: 1e4, torch.bfloat16: 1e6}
"""The largest magnitude drawn per dtype: float16 ends at 65504."""


def distance(released: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """‖released − global‖₂ over the float tensors, measured in float64."""
    squares = [
        float(torch.sum((released[n].double() - base[n].double()) ** 2))
        for n in released
        if base[n].dtype.is_floating_point
    ]
    return math.sqrt(math.fsum(squares))


def rounding_allowance(released: dict[str, torch.Tensor]) -> float:
    """How far rounding to each tensor's dtype may move the measured norm (module docstring):
    ``released`` holds what was rounded, the weights of a FULL file or the Δ of a DIFF one."""
    total = 0.0
    for tensor in released.values():
        dtype = tensor.dtype
        if not dtype.is_floating_point:
            continue
        relative = UNIT_ROUNDOFF[torch.float32] + UNIT_ROUNDOFF[dtype]
        total += relative * float(torch.linalg.vector_norm(tensor.double()))
        total += 2 * HALF_SUBNORMAL[dtype] * math.sqrt(tensor.numel())
    return total


def reference(base: dict[str, torch.Tensor], params_type: ParamsType) -> dict[str, torch.Tensor]:
    """What a released tensor is measured against: the global model (FULL) or zero (DIFF)."""
    if params_type == FULL:
        return base
    return {n: torch.zeros_like(t) for n, t in base.items()}


@st.composite
def models(
    draw: st.DrawFn,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ParamsType]:
    """A global model of 1–6 tensors (float32/float16/bfloat16, maybe an integer buffer) and
    a script's result against it: FULL or DIFF, the update's scale between 1e-6 and 1e6."""
    count = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    params_type = draw(st.sampled_from([FULL, DIFF]))
    generator = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    local: dict[str, torch.Tensor] = {}
    for index in range(count):
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
        if draw(st.integers(0, 5)) == 0:
            base[f"t{index}.num_batches_tracked"] = torch.randint(
                0, 100, shape, generator=generator
            )
            sent = torch.randint(0, 100, shape, generator=generator)
            local[f"t{index}.num_batches_tracked"] = sent
            continue
        dtype = draw(st.sampled_from(FLOATS))
        largest = LARGEST[dtype]
        weights_scale = draw(st.floats(1e-6, largest))
        update_scale = draw(st.floats(1e-6, largest))
        weights = torch.randn(shape, generator=generator, dtype=torch.float64) * weights_scale
        change = torch.randn(shape, generator=generator, dtype=torch.float64) * update_scale
        name = f"t{index}.weight"
        base[name] = weights.clamp(-largest, largest).to(dtype)
        if params_type == FULL:
            local[name] = (weights + change).clamp(-2 * largest, 2 * largest).to(dtype)
        else:
            local[name] = change.to(dtype)
    return base, local, params_type


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=models(),
    clip=st.floats(1e-3, 1e3),
    scope=st.sampled_from(["model", "layer"]),
)
def test_the_released_update_never_exceeds_the_clip(
    model: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ParamsType],
    clip: float,
    scope: str,
) -> None:
    base, local, params_type = model
    params = dict(local)
    dtypes = {n: t.dtype for n, t in params.items()}

    privatize(
        params,
        base,
        params_type=params_type,
        policy=PrivacyPolicy(clip_norm=clip, clip_scope=scope),
    )

    assert {n: t.dtype for n, t in params.items()} == dtypes
    assert {n: t.shape for n, t in params.items()} == {n: t.shape for n, t in base.items()}
    against = reference(base, params_type)
    assert distance(params, against) <= clip + rounding_allowance(params)
    floats = [n for n, t in base.items() if t.dtype.is_floating_point]
    if scope == "layer" and floats:
        per_tensor = clip / math.sqrt(len(floats))
        for name in floats:
            one = {name: params[name]}
            assert distance(one, against) <= per_tensor + rounding_allowance(one), name
    for name, tensor in base.items():
        if not tensor.dtype.is_floating_point:
            # an integer buffer cannot be clipped or noised: no change leaves
            assert torch.equal(params[name], against[name]), name


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_a_large_tensor_is_clipped_to_the_clip_not_to_a_float32_norm(scope: str) -> None:
    # a float32 norm of 8M elements summed as one is off by ~3e-4: the clip would not hold
    generator = torch.Generator().manual_seed(11)
    base = {"w": torch.zeros(1 << 23)}
    params = {"w": torch.randn(1 << 23, generator=generator) * 2e-4 + 1e-5}

    privatize(params, base, params_type=DIFF, policy=PrivacyPolicy(clip_norm=0.5, clip_scope=scope))

    assert distance(params, base) <= 0.5 + rounding_allowance(params)
    assert distance(params, base) == pytest.approx(0.5, rel=2e-5)


def test_an_update_within_the_clip_leaves_unchanged() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    params = {"w": torch.tensor([1.3, 2.4]), "b": torch.tensor([0.5])}  # ‖Δ‖ = 0.5

    report = privatize(params, base, params_type=FULL, policy=PrivacyPolicy(clip_norm=1.0), seed=1)

    assert not report.clipped
    assert report.norm == pytest.approx(0.5, rel=1e-6)
    assert torch.equal(params["w"], torch.tensor([1.3, 2.4]))
    assert torch.equal(params["b"], torch.tensor([0.5]))


def test_model_scope_scales_the_whole_update_to_the_clip() -> None:
    # Δ = [3, 4] and [0, 12]: ‖Δ‖ = 13, so every coordinate is scaled by 2/13
    base = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0, 0.0])}
    params = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 12.0])}

    report = privatize(params, base, params_type=DIFF, policy=PrivacyPolicy(clip_norm=2.0))

    assert report.clipped and report.norm == pytest.approx(13.0)
    scale = 2.0 * (1 - enforce.CLIP_MARGIN) / 13.0
    assert torch.allclose(params["a"], torch.tensor([3.0, 4.0]) * scale, rtol=1e-6)
    assert torch.allclose(params["b"], torch.tensor([0.0, 12.0]) * scale, rtol=1e-6)


def test_layer_scope_clips_each_tensor_on_its_own() -> None:
    # two tensors: each to 2/√2; "small" is within that and keeps its Δ
    base = {"big": torch.zeros(2), "small": torch.zeros(2)}
    params = {"big": torch.tensor([30.0, 40.0]), "small": torch.tensor([0.3, 0.4])}

    privatize(
        params, base, params_type=DIFF, policy=PrivacyPolicy(clip_norm=2.0, clip_scope="layer")
    )

    per_tensor = 2.0 / math.sqrt(2) * (1 - enforce.CLIP_MARGIN)
    assert torch.allclose(params["big"], torch.tensor([0.6, 0.8]) * per_tensor, rtol=1e-6)
    assert torch.equal(params["small"], torch.tensor([0.3, 0.4]))


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------

NOISY = PrivacyPolicy(clip_norm=0.5, noise_multiplier=1.2)


@pytest.mark.parametrize("params_type", [FULL, DIFF])
def test_the_noise_has_std_sigma_times_clip_on_a_seeded_run(params_type: ParamsType) -> None:
    base = {"w": torch.full((1000, 1000), 3.0)}
    params = {"w": base["w"].clone() if params_type == FULL else torch.zeros(1000, 1000)}

    report = privatize(params, base, params_type=params_type, policy=NOISY, seed=20261129)

    noise = params["w"].double() - (3.0 if params_type == FULL else 0.0)
    expected = 1.2 * 0.5
    assert report.noise_std == expected
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    # the mean of 1e6 draws is within 5 standard errors of 0
    assert abs(float(noise.mean())) < 5 * expected / 1000


def test_every_slice_of_every_tensor_gets_its_own_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enforce, "NOISE_CHUNK_ELEMENTS", 1 << 14)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    base = {"a": torch.zeros(1 << 16), "b": torch.zeros(3, 1 << 14), "c": torch.zeros(7)}
    params = {n: t.clone() for n, t in base.items()}

    privatize(params, base, params_type=DIFF, policy=NOISY, seed=5)

    for name in ("a", "b"):
        slices = params[name].view(-1).split(1 << 14)
        for piece in slices:
            assert float(piece.std()) == pytest.approx(0.6, rel=0.05), name
        # generators seeded alike would draw the same slices
        first, second = slices[0].double(), slices[1].double()
        assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.05
    assert bool((params["c"] != 0).all())


def test_a_seeded_run_repeats_and_unseeded_runs_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enforce, "NOISE_CHUNK_ELEMENTS", 1 << 12)
    base = {"w": torch.zeros(5, 4000), "v": torch.zeros(100)}

    def release(seed: int | None) -> dict[str, torch.Tensor]:
        params = {n: t.clone() for n, t in base.items()}
        privatize(params, base, params_type=DIFF, policy=NOISY, seed=seed)
        return params

    one, again, other = release(7), release(7), release(8)
    assert all(torch.equal(one[n], again[n]) for n in base)
    assert not torch.equal(one["w"], other["w"])
    first, second = release(None), release(None)
    assert not torch.equal(first["w"], second["w"])
    assert not torch.equal(first["v"], second["v"])


def test_unseeded_generators_are_seeded_from_the_os_csprng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn: list[int] = []

    def randbits(bits: int) -> int:
        drawn.append(bits)
        return 1234 + len(drawn)

    monkeypatch.setattr(secrets, "randbits", randbits)

    generators = enforce.new_generators(3)

    assert drawn == [63, 63, 63]
    assert [g.initial_seed() for g in generators] == [1235, 1236, 1237]


def test_noise_lands_after_clipping_on_the_update_only() -> None:
    # integer buffers take no noise, the float tensors all do
    base = {"w": torch.zeros(50_000), "steps": torch.tensor(3)}
    params = {"w": torch.full((50_000,), 100.0), "steps": torch.tensor(9)}

    privatize(params, base, params_type=FULL, policy=NOISY, seed=3)

    assert torch.equal(params["steps"], torch.tensor(3))
    # the clipped update spreads 0.5 over 50,000 coordinates: what is left is the noise
    assert float(params["w"].std()) == pytest.approx(0.6, rel=0.02)
    assert abs(float(params["w"].mean())) < 0.02


# --------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------

GLOBAL = {
    "conv.weight": torch.full((4, 3), 0.25),
    "conv.bias": torch.full((4,), -1.0),
    "head.weight": torch.full((2, 4), 0.5),
    "bn.num_batches_tracked": torch.tensor(7),
}
EXCLUDING = PrivacyPolicy(clip_norm=1.0, exclude_tensors=("*.bias", "head.*"))
# A value a float32 tensor of the model never holds, to look for in the written bytes.
SECRET = 123456.789


def global_file(folder: Path) -> Path:
    return save_state_dict(folder / "global.safetensors", GLOBAL)


def result_file(folder: Path, *, scale: float = 50.0, **model: object) -> Path:
    """A script's answer that moved every weight by ``scale`` (far over any clip)."""
    fields: dict[str, object] = {
        "params": {
            "conv.weight": GLOBAL["conv.weight"] + scale,
            "conv.bias": torch.full((4,), SECRET),
            "head.weight": torch.full((2, 4), SECRET),
            "bn.num_batches_tracked": torch.tensor(9),
        },
        "params_type": FULL,
        "metrics": {"loss": 0.5},
        "current_round": 2,
        "total_rounds": 5,
        "meta": {"NUM_STEPS_CURRENT_ROUND": 40},
        **model,
    }
    return write_model_file(folder / "result.safetensors", FLModel(**fields))  # type: ignore[arg-type]


def test_excluded_tensors_are_not_in_the_written_file(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    report = {"epsilon": 1.5, "releases": 1}

    enforcement = enforce_file(
        result_file(tmp_path), global_file(tmp_path), out, policy=EXCLUDING, report=report
    )

    released = read_model_file(out)
    assert set(released.params or {}) == {"conv.weight", "bn.num_batches_tracked"}
    assert enforcement.excluded == ["conv.bias", "head.weight"]
    assert released.meta[PRIVACY_META_KEY] == {
        "epsilon": 1.5,
        "releases": 1,
        "excluded": ["conv.bias", "head.weight"],
    }
    # the kept values are nowhere in the file's bytes
    assert torch.tensor([SECRET]).numpy().tobytes() not in out.read_bytes()
    # the rest of the result is as the script wrote it
    assert released.metrics == {"loss": 0.5}
    assert (released.current_round, released.total_rounds) == (2, 5)
    assert released.meta["NUM_STEPS_CURRENT_ROUND"] == 40
    assert released.params_type == FULL


def test_a_script_s_unclipped_update_still_leaves_clipped(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"

    enforcement = enforce_file(result_file(tmp_path), global_file(tmp_path), out, policy=EXCLUDING)

    params = dict(read_model_file(out).params or {})
    assert enforcement.clipped
    assert enforcement.norm == pytest.approx(50.0 * math.sqrt(12))
    change = params["conv.weight"].double() - GLOBAL["conv.weight"].double()
    assert float(torch.linalg.vector_norm(change)) <= 1.0
    assert float(torch.linalg.vector_norm(change)) == pytest.approx(1.0, rel=1e-4)


def test_integer_tensors_leave_as_the_global_s_values(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"

    enforce_file(result_file(tmp_path), global_file(tmp_path), out, policy=EXCLUDING)

    count = dict(read_model_file(out).params or {})["bn.num_batches_tracked"]
    assert count.dtype == torch.int64 and int(count) == 7


def test_a_diff_result_leaves_as_a_clipped_diff(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    diff = {"conv.weight": torch.full((4, 3), 9.0), "bn.num_batches_tracked": torch.tensor(2)}
    result = write_model_file(tmp_path / "diff.safetensors", FLModel(params=diff, params_type=DIFF))

    enforce_file(result, global_file(tmp_path), out, policy=PrivacyPolicy(clip_norm=1.0))

    released = read_model_file(out)
    params = dict(released.params or {})
    assert released.params_type == DIFF
    assert float(torch.linalg.vector_norm(params["conv.weight"].double())) <= 1.0
    assert int(params["bn.num_batches_tracked"]) == 0


def test_a_validate_result_passes_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = write_model_file(
        tmp_path / "validate.safetensors",
        FLModel(metrics={"accuracy": 0.91, "loss": 0.2}, current_round=3),
    )

    enforcement = enforce_file(
        result, tmp_path / "absent.safetensors", out, policy=EXCLUDING, report={"epsilon": 2.0}
    )

    released = read_model_file(out)
    assert not released.params
    assert released.metrics == {"accuracy": 0.91, "loss": 0.2}
    assert released.current_round == 3
    assert released.meta[PRIVACY_META_KEY] == {"epsilon": 2.0, "excluded": []}
    assert enforcement.excluded == [] and not enforcement.clipped


def test_meta_tensors_under_clipping_are_refused(tmp_path: Path) -> None:
    result = result_file(tmp_path, meta={"scaffold_c_diff": {"conv.weight": torch.ones(4, 3)}})

    with pytest.raises(PrivacyRefusal) as info:
        enforce_file(result, global_file(tmp_path), tmp_path / "out.safetensors", policy=EXCLUDING)

    assert "scaffold_c_diff" in info.value.reason and "unclipped" in info.value.reason
    assert not (tmp_path / "out.safetensors").exists()


def test_meta_tensors_without_clipping_leave_without_the_excluded_names(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    control = {"conv.weight": torch.ones(4, 3), "conv.bias": torch.full((4,), SECRET)}
    result = result_file(tmp_path, meta={"scaffold_c_diff": control})

    enforce_file(
        result,
        global_file(tmp_path),
        out,
        policy=PrivacyPolicy(exclude_tensors=EXCLUDING.exclude_tensors),
    )

    released = read_model_file(out)
    assert set(released.meta["scaffold_c_diff"]) == {"conv.weight"}
    assert "conv.bias" not in (released.params or {})
    assert torch.tensor([SECRET]).numpy().tobytes() not in out.read_bytes()


def test_a_tensor_the_global_model_lacks_is_refused() -> None:
    params = {"w": torch.ones(2), "extra": torch.ones(2)}

    with pytest.raises(PrivacyRefusal, match=r"\['extra'\] are not in the model"):
        privatize(
            params, {"w": torch.zeros(2)}, params_type=FULL, policy=PrivacyPolicy(clip_norm=1.0)
        )


def test_a_tensor_of_another_shape_is_refused() -> None:
    with pytest.raises(PrivacyRefusal, match=r"'w' has shape \[3\], the model's is \[2\]"):
        privatize(
            {"w": torch.ones(3)},
            {"w": torch.zeros(2)},
            params_type=FULL,
            policy=PrivacyPolicy(clip_norm=1.0),
        )


def test_without_clipping_only_the_excluded_tensors_change() -> None:
    params = {"w": torch.full((3,), 50.0), "b": torch.ones(2)}

    report = privatize(params, {}, params_type=FULL, policy=PrivacyPolicy(exclude_tensors=("b",)))

    assert report.excluded == ["b"] and not report.clipped
    assert set(params) == {"w"} and torch.equal(params["w"], torch.full((3,), 50.0))
