"""``bench/site_round_statements.py`` at a small size, with its figures as upper bounds: the SQL
statements of one site's part in a round, step by step on the portal and in the worker. A
change that adds a statement to a site-round fails here, naming the step."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
from django.db import connection

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Statements per site and round, at most: each step of the portal, and the worker's update
# checks. A socket's certificate checks go through the cache of verified certificates, as a
# signed request's do (its periodic check from the database is no step of a round).
PORTAL_STEPS = {
    # The tasks marked training as their model goes out with the event: one transaction of 4
    # statements for the round's sites (here 3), whatever their number.
    "round event": 4 / 3,
    "model": 0,  # the bench's model is small: it came with the event, not downloaded
    "heartbeat": 1,  # written: the bench makes it due every round
    "report": 7,  # one transaction: the job-site row locked, which entries are new, both stored
    # On the socket (a small update): the task read, then updated. Over HTTP, the same two: the
    # server's check of the sender reads the task, the view updates it.
    "upload": 2,
}
# A model over FEDPORTAL_EVENT_MODEL_MAX_BYTES is downloaded: the download marks the task.
DOWNLOADED = {
    **PORTAL_STEPS,
    "round event": 0,
    "model": 3,  # the heartbeat written (1), the task with its start model, marked training
    "heartbeat": 0,  # the heartbeat was written with the model's request
}
JOB_LIST = 2  # the site's jobs and their tasks; no step of a round
# The first check records the whole batch (10 statements), each later one finds its task done
# (1): 4 a site at the 3 sites counted here, 2.8 at 5, 1.2 at 50.
WORKER_CHECKS = 4

pytestmark = [
    # The bench counts what the worker's tasks do after the portal's transactions commit.
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("media"),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="counts PostgreSQL's statements (row locks)"
    ),
]


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("site_round_statements")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize(
    "model", ["with the event, the update on the socket", "downloaded, the update over HTTP"]
)
def test_a_site_round_stays_within_its_statements(tmp_path: Path, settings, model: str) -> None:
    steps = PORTAL_STEPS
    if model.startswith("downloaded"):
        settings.FEDPORTAL_EVENT_MODEL_MAX_BYTES = 0
        settings.FEDPORTAL_SOCKET_UPDATE_MAX_BYTES = 0
        steps = DOWNLOADED
    bench = _bench()
    kicks = bench.Kicks()
    with kicks.collecting():
        seeded = bench.seed(tmp_path, sites=3, rounds=2, kicks=kicks)
        counts = bench.rounds_counted(seeded, 2, kicks)

    later = counts[1]
    assert {step: max(later.portal[step]) for step in bench.STEPS} == {
        step: min(max(later.portal[step]), bound) for step, bound in steps.items()
    }
    assert later.portal_per_site() <= sum(steps.values()) + 1e-9  # shares are fractions
    assert max(later.listing) <= JOB_LIST
    assert later.checks / later.sites <= WORKER_CHECKS
    # Every site's update was taken and the job went on to its end.
    seeded.job.refresh_from_db()
    assert seeded.job.state == "completed"
    assert kicks.queue == []
