"""Updates whose site withheld tensors (its privacy policy's ``exclude_tensors``): a withheld
tensor counts as no change from that site, and an update that lies about what it withholds is
rejected. Tiny tensors, results computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_agent.config import PRIVACY_META_KEY
from client_agent.fl_model import FLModel
from client_agent.wire import write_model_file
from jobs.aggregation import SiteUpdate, UpdateRejected, check_update, fedavg
from jobs.aggregation.sources import MemoryTensorSource
from jobs.workflows import TrainResult, fill_withheld
from tests.core.test_aggregation import assert_same
from tests.core.updates import DIFF, FULL, update

GLOBAL = {
    "w": torch.tensor([10.0, 20.0]),
    "b": torch.tensor([1.0]),
    "steps": torch.tensor(4),
}
SPECS = MemoryTensorSource(GLOBAL).specs()


def withholding(
    site: str,
    params: dict[str, torch.Tensor],
    withheld: set[str],
    *,
    weight: float = 1.0,
    params_type: object = FULL,
) -> SiteUpdate:
    result = update(site, params, weight=weight, params_type=params_type)  # type: ignore[arg-type]
    result.withheld = frozenset(withheld)
    return result


def aggregate(updates: list[SiteUpdate]) -> dict[str, torch.Tensor]:
    for one in updates:
        check_update(SPECS, one)
    results = [TrainResult(site=u.site, update=u) for u in updates]
    fill_withheld(list(results), GLOBAL)
    return fedavg([r.update for r in results], GLOBAL)


def test_a_full_update_that_withholds_a_tensor_counts_as_no_change_there() -> None:
    a = withholding("a", {"w": torch.tensor([2.0, 4.0]), "steps": torch.tensor(6)}, {"b"}, weight=1)
    b = update(
        "b",
        {"w": torch.tensor([6.0, 8.0]), "b": torch.tensor([5.0]), "steps": torch.tensor(6)},
        weight=3,
    )

    result = aggregate([a, b])

    # w: (1*2 + 3*6)/4 = 5, (1*4 + 3*8)/4 = 7; b: a sent the global's 1, so (1*1 + 3*5)/4 = 4
    assert_same(result["w"], torch.tensor([5.0, 7.0]))
    assert_same(result["b"], torch.tensor([4.0]))
    assert_same(result["steps"], torch.tensor(6))


def test_a_diff_update_that_withholds_a_tensor_counts_as_no_change_there() -> None:
    a = withholding(
        "a", {"w": torch.tensor([4.0, -4.0]), "steps": torch.tensor(0)}, {"b"}, params_type=DIFF
    )
    b = update(
        "b",
        {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([2.0]), "steps": torch.tensor(0)},
        params_type=DIFF,
    )

    result = aggregate([a, b])

    # global + mean of the Δs: w = [10 + 2, 20 - 2]; b = 1 + (0 + 2)/2
    assert_same(result["w"], torch.tensor([12.0, 18.0]))
    assert_same(result["b"], torch.tensor([2.0]))


def test_a_tensor_every_site_withholds_stays_at_the_global_s_value() -> None:
    a = withholding("a", {"w": torch.tensor([0.0, 0.0]), "steps": torch.tensor(4)}, {"b"})
    b = withholding(
        "b", {"w": torch.tensor([2.0, 2.0]), "steps": torch.tensor(4)}, {"b"}, params_type=DIFF
    )

    result = aggregate([a, b])

    # a's FULL w = [0, 0]; b's w = global + [2, 2] = [12, 22]
    assert_same(result["w"], torch.tensor([6.0, 11.0]))
    assert_same(result["b"], torch.tensor([1.0]))


def test_the_withheld_names_are_read_from_the_result_s_privacy_report(tmp_path: Path) -> None:
    model = FLModel(
        params={"w": torch.tensor([2.0, 4.0]), "steps": torch.tensor(4)},
        meta={PRIVACY_META_KEY: {"epsilon": 1.0, "excluded": ["b"]}},
    )
    path = write_model_file(tmp_path / "a.safetensors", model)

    from_model = SiteUpdate.from_model("a", model)
    from_file = SiteUpdate.from_file("a", path)

    assert from_model.withheld == from_file.withheld == frozenset({"b"})
    check_update(SPECS, from_file)
    from_file.source.close()


def test_a_result_without_a_privacy_report_withholds_nothing() -> None:
    plain = SiteUpdate.from_model("a", FLModel(params={"w": torch.zeros(2)}))
    odd = SiteUpdate.from_model(
        "a", FLModel(params={"w": torch.zeros(2)}, meta={PRIVACY_META_KEY: {"excluded": "b"}})
    )

    assert plain.withheld == odd.withheld == frozenset()
    with pytest.raises(UpdateRejected, match="missing tensors"):
        check_update(SPECS, odd)


@pytest.mark.parametrize(
    ("params", "withheld", "words"),
    [
        pytest.param(
            {"w": torch.zeros(2), "b": torch.zeros(1), "steps": torch.tensor(4)},
            {"head.weight"},
            "withholds tensors the model does not have: 'head.weight'",
            id="unknown",
        ),
        pytest.param(
            {"w": torch.zeros(2), "b": torch.zeros(1), "steps": torch.tensor(4)},
            {"b"},
            "sends tensors it says it withholds: 'b'",
            id="sent-anyway",
        ),
        pytest.param(
            {"w": torch.zeros(2)},
            {"steps"},
            "missing tensors 'b'",
            id="missing-another",
        ),
    ],
)
def test_an_update_that_lies_about_what_it_withholds_is_rejected(
    params: dict[str, torch.Tensor], withheld: set[str], words: str
) -> None:
    with pytest.raises(UpdateRejected) as info:
        check_update(SPECS, withholding("site-2", params, withheld))

    assert info.value.site == "site-2"
    assert words in info.value.reason
