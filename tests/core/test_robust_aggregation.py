"""Robust aggregators (median, trimmed mean, Krum): tiny tensors, results computed by hand."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from client_agent.fl_model import FLModel
from client_agent.wire import write_model_file
from common.validators import FieldError
from jobs.aggregation import (
    AGGREGATORS,
    FileTensorSource,
    MemoryTensorSource,
    SiteUpdate,
    coordinate_median,
    fedavg,
    krum,
    make_aggregator,
    trimmed_mean,
)
from jobs.aggregation.robust import krum_scores, sorting_network
from tests.core.updates import DIFF, FULL, update


def column(site: str, values: list[float], weight: float = 1.0) -> SiteUpdate:
    return update(site, {"w": torch.tensor(values)}, weight=weight)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


# --------------------------------------------------------------------------------------------
# The sorting network every order statistic rests on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 13))
def test_the_sorting_network_sorts_every_input(n: int) -> None:
    # A comparator network that sorts every 0/1 input sorts every input (Knuth's 0-1 principle):
    # 2**n columns, one per 0/1 vector.
    columns = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n))).T.contiguous()
    rows = [row.clone() for row in columns]
    for low, high in sorting_network(n):
        rows[low], rows[high] = (
            torch.minimum(rows[low], rows[high]),
            torch.maximum(rows[low], rows[high]),
        )

    assert torch.equal(torch.stack(rows), columns.sort(dim=0).values)


# --------------------------------------------------------------------------------------------
# Median
# --------------------------------------------------------------------------------------------


def test_median_of_an_odd_number_is_the_middle_value() -> None:
    glob = {"w": torch.zeros(3)}
    updates = [
        column("a", [1.0, 5.0, -2.0], weight=100),
        column("b", [3.0, 0.0, 7.0]),
        column("c", [2.0, 9.0, 4.0]),
    ]

    # Columns sorted: [1, 2, 3], [0, 5, 9], [-2, 4, 7]; a's weight of 100 counts for nothing.
    assert_same(coordinate_median(updates, glob)["w"], torch.tensor([2.0, 5.0, 4.0]))


def test_median_of_an_even_number_is_the_mean_of_the_two_middle_values() -> None:
    glob = {"w": torch.zeros(2)}
    updates = [
        column("a", [1.0, 10.0]),
        column("b", [4.0, 0.0]),
        column("c", [2.0, 30.0]),
        column("d", [8.0, 20.0]),
    ]

    # Sorted: [1, 2, 4, 8] → (2 + 4)/2 = 3; [0, 10, 20, 30] → 15. torch.median would say 2, 10.
    assert_same(coordinate_median(updates, glob)["w"], torch.tensor([3.0, 15.0]))


def test_median_of_one_update_is_that_update() -> None:
    glob = {"w": torch.zeros(2)}

    assert_same(coordinate_median([column("a", [1.5, -2.0])], glob)["w"], torch.tensor([1.5, -2.0]))


def test_median_of_huge_values_does_not_overflow() -> None:
    big = torch.finfo(torch.float32).max
    glob = {"w": torch.zeros(1)}
    updates = [column("a", [big]), column("b", [big])]

    assert_same(coordinate_median(updates, glob)["w"], torch.tensor([big]))


def test_median_of_diff_and_full_updates_is_taken_over_full_weights() -> None:
    glob = {"w": torch.tensor([10.0, 20.0])}
    updates = [
        update("a", {"w": torch.tensor([1.0, -1.0])}, params_type=DIFF),  # [11, 19]
        update("b", {"w": torch.tensor([3.0, 5.0])}, params_type=DIFF),  # [13, 25]
        update("c", {"w": torch.tensor([-2.0, 0.0])}, params_type=DIFF),  # [8, 20]
        update("d", {"w": torch.tensor([100.0, 0.0])}, params_type=FULL),
    ]

    # [8, 11, 13, 100] → 12; [0, 19, 20, 25] → 19.5 (the diffs alone would give 2 and 0).
    assert_same(coordinate_median(updates, glob)["w"], torch.tensor([12.0, 19.5]))


def test_median_of_integer_buffers_is_rounded_back() -> None:
    glob = {"n": torch.tensor([0, 0], dtype=torch.int64)}
    updates = [
        update("a", {"n": torch.tensor([1, 2], dtype=torch.int64)}),
        update("b", {"n": torch.tensor([4, 3], dtype=torch.int64)}),
    ]

    # (1 + 4)/2 = 2.5 → 2 and (2 + 3)/2 = 2.5 → 2, half to even as fedavg rounds.
    assert_same(coordinate_median(updates, glob)["n"], torch.tensor([2, 2], dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_median_keeps_the_float_dtype(dtype: torch.dtype) -> None:
    glob = {"w": torch.zeros(2, dtype=dtype)}
    updates = [
        update(site, {"w": torch.tensor(values, dtype=dtype)})
        for site, values in (("a", [1.0, 8.0]), ("b", [2.0, 4.0]), ("c", [5.0, 6.0]))
    ]

    assert_same(coordinate_median(updates, glob)["w"], torch.tensor([2.0, 6.0], dtype=dtype))


# --------------------------------------------------------------------------------------------
# Trimmed mean
# --------------------------------------------------------------------------------------------


def test_trimmed_mean_drops_one_value_on_each_side() -> None:
    glob = {"w": torch.zeros(2)}
    values = [[1.0, -50.0], [100.0, 0.0], [3.0, 2.0], [5.0, 4.0], [2.0, 10.0], [6.0, 9.0]]
    updates = [column(f"s{i}", v) for i, v in enumerate(values)]

    result = trimmed_mean(updates, glob, trim_fraction=0.2)

    # int(0.2 * 6) = 1 per side. [1, 2, 3, 5, 6, 100] → (2 + 3 + 5 + 6)/4 = 4;
    # [-50, 0, 2, 4, 9, 10] → (0 + 2 + 4 + 9)/4 = 3.75. The plain mean would be 19.5 and -4.17.
    assert_same(result["w"], torch.tensor([4.0, 3.75]))


def test_trimmed_mean_with_nothing_to_trim_is_the_unweighted_mean() -> None:
    glob = {"w": torch.zeros(1)}
    updates = [column("a", [1.0], weight=7), column("b", [2.0]), column("c", [3.0])]
    updates.append(column("d", [6.0]))

    # int(0.2 * 4) = 0: (1 + 2 + 3 + 6)/4 = 3, weights ignored (fedavg would give 1.9).
    assert_same(trimmed_mean(updates, glob, trim_fraction=0.2)["w"], torch.tensor([3.0]))


def test_trimmed_mean_of_diff_updates_adds_the_global_model() -> None:
    glob = {"w": torch.tensor([10.0])}
    diffs = [0.0, -4.0, 2.0, 40.0]
    updates = [
        update(f"s{i}", {"w": torch.tensor([d])}, params_type=DIFF) for i, d in enumerate(diffs)
    ]

    # Full weights [10, 6, 12, 50], trim 1 per side → (10 + 12)/2 = 11.
    assert_same(trimmed_mean(updates, glob, trim_fraction=0.25)["w"], torch.tensor([11.0]))


# --------------------------------------------------------------------------------------------
# Krum
# --------------------------------------------------------------------------------------------

# Five points, each split over two tensors "x" and "y", f = 1: a score sums the n - f - 2 = 2
# smallest squared distances.
#   p0 = (0, 0)  p1 = (1, 1)  p2 = (2, 0)  p3 = (0, 3)  p4 = (9, 9)
#   d01 = 2   d02 = 4   d03 = 9    d04 = 162
#   d12 = 2   d13 = 5   d14 = 128
#   d23 = 13  d24 = 130
#   d34 = 117
#   p0: {2, 4, 9, 162} → 6      p1: {2, 2, 5, 128} → 4      p2: {4, 2, 13, 130} → 6
#   p3: {9, 5, 13, 117} → 14    p4: {162, 128, 130, 117} → 245
POINTS = {"p0": (0.0, 0.0), "p1": (1.0, 1.0), "p2": (2.0, 0.0), "p3": (0.0, 3.0), "p4": (9.0, 9.0)}
DISTANCES = [
    [0.0, 2.0, 4.0, 9.0, 162.0],
    [2.0, 0.0, 2.0, 5.0, 128.0],
    [4.0, 2.0, 0.0, 13.0, 130.0],
    [9.0, 5.0, 13.0, 0.0, 117.0],
    [162.0, 128.0, 130.0, 117.0, 0.0],
]
GLOB_XY = {"x": torch.zeros(1), "y": torch.zeros(1)}


def points(weights: dict[str, float] | None = None) -> list[SiteUpdate]:
    return [
        update(
            site,
            {"x": torch.tensor([x]), "y": torch.tensor([y])},
            weight=(weights or {}).get(site, 1),
        )
        for site, (x, y) in POINTS.items()
    ]


def xy(result: dict[str, torch.Tensor]) -> tuple[float, float]:
    return float(result["x"]), float(result["y"])


def test_krum_scores_sum_the_nearest_squared_distances() -> None:
    assert krum_scores(DISTANCES, num_malicious=1) == [6.0, 4.0, 6.0, 14.0, 245.0]


def test_krum_keeps_the_update_with_the_lowest_score() -> None:
    assert xy(krum(points(), GLOB_XY, num_malicious=1)) == (1.0, 1.0)


def test_multi_krum_averages_the_kept_updates_with_their_weights() -> None:
    updates = points({"p0": 1, "p1": 2, "p2": 1, "p3": 50, "p4": 50})

    # Kept p1 (4), p0 and p2 (6): ((0 + 2·1 + 2)/4, (0 + 2·1 + 0)/4) = (1, 0.5).
    assert xy(krum(updates, GLOB_XY, num_malicious=1, num_to_keep=3)) == (1.0, 0.5)


def test_krum_breaks_ties_by_site_name_whatever_the_order() -> None:
    # p0 and p2 tie at 6: the second place goes to p0, first by name, in either order.
    forward = krum(points(), GLOB_XY, num_malicious=1, num_to_keep=2)
    backward = krum(points()[::-1], GLOB_XY, num_malicious=1, num_to_keep=2)

    assert xy(forward) == xy(backward) == (0.5, 0.5)


def test_krum_measures_diff_updates_as_full_weights() -> None:
    glob = {"w": torch.tensor([100.0, 100.0])}
    updates = [
        # As raw numbers this poison equals b's change and would score best; as weights it is
        # 100·√2 away from the three others, which lie within 1 of [100, 100].
        update("a-poison", {"w": torch.tensor([0.0, 0.0])}, params_type=FULL),
        update("b", {"w": torch.tensor([0.0, 0.0])}, params_type=DIFF),
        update("c", {"w": torch.tensor([1.0, 0.0])}, params_type=DIFF),
        update("d", {"w": torch.tensor([0.0, 1.0])}, params_type=DIFF),
    ]

    # f = 0, 2 nearest: b = 1 + 1 = 2, c = 1 + 2 = 3, d = 3, a-poison = 20000 + 20201.
    assert_same(krum(updates, glob, num_malicious=0)["w"], torch.tensor([100.0, 100.0]))


# --------------------------------------------------------------------------------------------
# One poisoned update
# --------------------------------------------------------------------------------------------


def _poisoned_round() -> tuple[dict[str, torch.Tensor], list[SiteUpdate]]:
    """Six honest sites near 1.0 and, in the middle of the list, one that sends 1e6."""
    gen = torch.Generator().manual_seed(7)
    glob = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    honest = [
        update(
            f"site-{i}",
            {
                "w": 1 + 0.1 * torch.randn(4, 3, generator=gen),
                "b": 1 + 0.1 * torch.randn(3, generator=gen),
            },
            weight=10,
        )
        for i in range(6)
    ]
    poison = update("site-x", {"w": torch.full((4, 3), 1e6), "b": torch.full((3,), 1e6)})
    return glob, [*honest[:3], poison, *honest[3:]]


@pytest.mark.parametrize(
    "aggregate",
    [
        pytest.param(lambda u, g: coordinate_median(u, g), id="median"),
        pytest.param(lambda u, g: trimmed_mean(u, g, trim_fraction=0.2), id="trimmed_mean"),
        pytest.param(lambda u, g: krum(u, g, num_malicious=1), id="krum"),
        pytest.param(lambda u, g: krum(u, g, num_malicious=2, num_to_keep=5), id="multi_krum"),
    ],
)
def test_robust_aggregators_resist_a_poisoned_update(aggregate) -> None:
    glob, updates = _poisoned_round()

    # Plain fedavg is dragged far off (1e6 · 1/61 of the weight), the others are not.
    assert float(fedavg(updates, glob)["w"].min()) > 1e4
    result = aggregate(updates, glob)
    for name in ("w", "b"):
        assert float((result[name] - 1).abs().max()) < 0.5, result[name]


# --------------------------------------------------------------------------------------------
# Chunks, sources and order
# --------------------------------------------------------------------------------------------


def _random_round(numel: int) -> tuple[dict[str, torch.Tensor], list[SiteUpdate]]:
    """Five sites, FULL and DIFF, float32, bfloat16 and int64 tensors."""
    gen = torch.Generator().manual_seed(99)
    glob = {
        "w": torch.randn(numel, generator=gen),
        "h": torch.randn(numel, generator=gen).to(torch.bfloat16),
        "n": torch.arange(numel, dtype=torch.int64),
    }
    updates = []
    for i, params_type in enumerate((FULL, DIFF, FULL, DIFF, FULL)):
        params = {
            "w": torch.randn(numel, generator=gen),
            "h": torch.randn(numel, generator=gen).to(torch.bfloat16),
            "n": torch.randint(0, 100, (numel,), generator=gen),
        }
        updates.append(update(f"site-{i}", params, weight=1.0 + i, params_type=params_type))
    return glob, updates


AGGREGATE = {
    "median": lambda u, g, c: coordinate_median(u, g, chunk_elements=c),
    "trimmed_mean": lambda u, g, c: trimmed_mean(u, g, trim_fraction=0.2, chunk_elements=c),
    "krum": lambda u, g, c: krum(u, g, num_malicious=1, num_to_keep=2, chunk_elements=c),
}


@pytest.mark.parametrize("name", sorted(AGGREGATE))
def test_chunking_and_order_do_not_change_the_result(name: str) -> None:
    glob, updates = _random_round(10)
    aggregate = AGGREGATE[name]

    whole = aggregate(updates, glob, 1 << 17)
    chunked = aggregate(updates, glob, 3)  # 3 + 3 + 3 + 1
    shuffled = aggregate([updates[i] for i in (3, 0, 4, 2, 1)], glob, 4)

    assert set(whole) == {"w", "h", "n"}
    for tensor in whole:
        assert_same(chunked[tensor], whole[tensor])
        if name != "krum":  # Krum folds its kept updates in the order given, like fedavg
            assert_same(shuffled[tensor], whole[tensor])
    assert whole["h"].dtype == torch.bfloat16 and whole["n"].dtype == torch.int64


def test_chunked_median_is_the_median_of_the_full_weights() -> None:
    glob, updates = _random_round(10)
    full = torch.stack(
        [
            u.source.read("w", 0, 10, None) + (glob["w"] if u.params_type == DIFF else 0)
            for u in updates
        ]
    )

    # Five values: the median is the middle one, which torch.median finds too.
    assert_same(coordinate_median(updates, glob, chunk_elements=3)["w"], full.median(dim=0).values)


def test_file_sources_give_the_memory_result(tmp_path: Path) -> None:
    glob, updates = _random_round(10)
    glob_path = write_model_file(tmp_path / "global.safetensors", FLModel(params=glob))
    file_updates = []
    for u in updates:
        params = {name: u.source.read(name, 0, 10, None).clone() for name in glob}
        path = write_model_file(tmp_path / f"{u.site}.safetensors", FLModel(params=params))
        file_updates.append(
            SiteUpdate(
                site=u.site,
                source=FileTensorSource(path),
                weight=u.weight,
                params_type=u.params_type,
            )
        )

    for name, aggregate in AGGREGATE.items():
        in_memory = aggregate(updates, glob, 4)
        on_disk = aggregate(file_updates, FileTensorSource(glob_path), 4)
        for tensor in in_memory:
            assert torch.equal(on_disk[tensor], in_memory[tensor]), (name, tensor)


# --------------------------------------------------------------------------------------------
# Bad arguments: named, and refused before any tensor is read
# --------------------------------------------------------------------------------------------


class Unreadable(MemoryTensorSource):
    def read(self, name: str, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        raise AssertionError("read before the arguments were checked")


def unreadable_updates(n: int) -> list[SiteUpdate]:
    return [SiteUpdate(site=f"s{i}", source=Unreadable({"w": torch.zeros(2)})) for i in range(n)]


@pytest.mark.parametrize(
    ("call", "field", "reason"),
    [
        (lambda u: trimmed_mean(u, {}, trim_fraction=0.5), "trim_fraction", "below 0.5"),
        (lambda u: trimmed_mean(u, {}, trim_fraction=-0.1), "trim_fraction", "at least 0"),
        (lambda u: trimmed_mean(u, {}, trim_fraction=float("nan")), "trim_fraction", "finite"),
        (
            lambda u: trimmed_mean(u, {}, trim_fraction="0.1"),  # type: ignore[arg-type]
            "trim_fraction",
            "a number",
        ),
        (lambda u: trimmed_mean(u, {}, trim_fraction=True), "trim_fraction", "a number"),
        # n = 6 needs 6 > 2f + 2: f = 1 is the most.
        (lambda u: krum(u, {}, num_malicious=2, num_to_keep=5), "num_malicious", "too many"),
        (lambda u: krum(u[:5], {}, num_malicious=2), "num_malicious", "too many"),
        (lambda u: krum(u, {}, num_malicious=-1), "num_malicious", "at least 0"),
        (
            lambda u: krum(u, {}, num_malicious=1.0),  # type: ignore[arg-type]
            "num_malicious",
            "an integer",
        ),
        (lambda u: krum(u, {}, num_malicious=1, num_to_keep=0), "num_to_keep", "at least 1"),
        # At most n - f = 5 kept.
        (lambda u: krum(u, {}, num_malicious=1, num_to_keep=6), "num_to_keep", "between 1 and 5"),
    ],
)
def test_bad_arguments_name_the_argument(call, field: str, reason: str) -> None:
    with pytest.raises(FieldError) as raised:
        call(unreadable_updates(6))

    assert raised.value.field == field
    assert reason in raised.value.reason


def test_krum_accepts_the_largest_valid_arguments() -> None:
    # n = 7, f = 2 (7 > 2·2 + 2) and num_to_keep = n - f = 5, the most either may be.
    weights = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0]
    updates = [column(f"s{i}", [float(i)], weight=w) for i, w in enumerate(weights)]

    # Points 0..6, 3 nearest: s0 = s6 = 1 + 4 + 9 = 14, s1..s5 = 1 + 1 + 4 = 6.
    # Kept s1..s5, weighted: (1 + 2 + 2·3 + 2·4 + 2·5)/8 = 27/8.
    assert_same(
        krum(updates, {"w": torch.zeros(1)}, num_malicious=2, num_to_keep=5)["w"],
        torch.tensor([3.375]),
    )


@pytest.mark.parametrize(
    "aggregate",
    [
        lambda: coordinate_median([], {}),
        lambda: trimmed_mean([], {}, trim_fraction=0.1),
        lambda: krum([], {}, num_malicious=0),
    ],
)
def test_no_updates_is_an_error(aggregate) -> None:
    with pytest.raises(ValueError, match="at least one update"):
        aggregate()


# --------------------------------------------------------------------------------------------
# Selection by name
# --------------------------------------------------------------------------------------------


def test_make_aggregator_binds_checked_arguments() -> None:
    glob, updates = _poisoned_round()

    for name, args, direct in (
        ("mean", {}, fedavg(updates, glob)),
        ("median", {}, coordinate_median(updates, glob)),
        ("trimmed_mean", {"trim_fraction": 0.2}, trimmed_mean(updates, glob, trim_fraction=0.2)),
        (
            "krum",
            {"num_malicious": 1, "num_to_keep": 2},
            krum(updates, glob, num_malicious=1, num_to_keep=2),
        ),
    ):
        result = make_aggregator(name, **args)(updates, glob)
        assert set(result) == set(direct)
        for tensor in result:
            assert_same(result[tensor], direct[tensor])
    assert set(AGGREGATORS) == {"mean", "median", "trimmed_mean", "krum"}


@pytest.mark.parametrize(
    ("name", "args", "field", "reason"),
    [
        ("average", {}, "aggregator", "known: 'krum', 'mean', 'median', 'trimmed_mean'"),
        (None, {}, "aggregator", "unknown aggregator None"),
        ("median", {"trim_fraction": 0.1}, "trim_fraction", "not an argument of the 'median'"),
        ("krum", {"num_malicous": 1}, "num_malicous", "it takes: num_malicious, num_to_keep"),
        ("mean", {"chunk_elements": 4}, "chunk_elements", "it takes: none"),
        ("trimmed_mean", {}, "trim_fraction", "required by the 'trimmed_mean'"),
        ("krum", {"num_to_keep": 2}, "num_malicious", "required by the 'krum'"),
        ("trimmed_mean", {"trim_fraction": 0.6}, "trim_fraction", "below 0.5"),
        ("krum", {"num_malicious": -2}, "num_malicious", "at least 0"),
        ("krum", {"num_malicious": 1, "num_to_keep": 0}, "num_to_keep", "at least 1"),
    ],
)
def test_make_aggregator_refuses_bad_names_and_arguments(
    name: object, args: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(FieldError) as raised:
        make_aggregator(name, **args)

    assert raised.value.field == field
    assert reason in raised.value.reason
