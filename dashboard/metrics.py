"""A job's metric points shaped for the job page's charts, and all of them as CSV.

One chart per metric key and x axis. Points that carry a ``step`` (``flare.log(key, value,
step)``) go on the key's "by step" chart; points that belong to a round (train results, the
round's aggregate, and logged points with a round but no step) go on its "by round" chart, with
rounds counted from 1 as everywhere on the dashboard; a logged point with neither comes one
after the largest x its series has so far. Each site is a series; the round's aggregate (the
sites' weighted mean, as FedAvg weights them) is the series ``all sites``.
``static/dashboard/job.js`` places live points by the same rule.

**Bounded.** Building the charts reads the points once, as plain tuples in the order they were
recorded, and is linear in their number (plus sorting each series). A series longer than
:data:`MAX_CHART_POINTS` is downsampled for the chart: its first and last points are kept, and
the rest is cut into equal stretches, each giving its lowest and highest point (in x order), so
spikes and dips survive where taking every n-th point would drop them. The chart says it was
downsampled (``counts``: the series' full length) and the page links the full series:
:func:`metric_points_csv`, streamed in batches rather than built in memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
from asgiref.sync import sync_to_async

from common.rounds import round_for_people
from common.spreadsheet import spreadsheet_safe
from jobs.models import Job, MetricPoint
from sites.models import Site

AGGREGATE = "all sites"
MAX_CHART_POINTS = 1000
CSV_BATCH = 5000
CSV_COLUMNS = ("site", "round", "step", "key", "value", "source", "recorded_at")


def _site_names(job: Job) -> dict[int, str]:
    """Series are named by their site: the project's names once, not a join on every point."""
    return dict(Site.objects.filter(project_id=job.project_id).values_list("pk", "name"))


def _kept(ys: Any, limit: int) -> Any:
    """Indices of the points :func:`downsample` keeps, for ``ys`` in x order (numpy)."""
    n = len(ys)
    if n <= limit:
        return np.arange(n)
    buckets = max(1, (limit - 2) // 2)
    bounds = 1 + (np.arange(buckets + 1) * (n - 2)) // buckets
    kept = [0]
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if start >= end:
            continue
        stretch = ys[start:end]
        low = start + int(stretch.argmin())
        high = start + int(stretch.argmax())
        kept += [low, high] if low < high else [high, low] if high < low else [low]
    kept.append(n - 1)
    return np.asarray(kept)


def downsample(points: list[list[Any]], limit: int = MAX_CHART_POINTS) -> list[list[Any]]:
    """At most ``limit`` of ``points`` (sorted by x): the first, the last, and the lowest and
    highest y of each of ``(limit - 2) // 2`` equal stretches between them, in x order."""
    if len(points) <= limit:
        return points
    ys = np.fromiter((p[1] for p in points), dtype=np.float64, count=len(points))
    return [points[i] for i in _kept(ys, limit).tolist()]


def _place_unplaced(xs: list[Any]) -> None:
    """Give each point logged with neither step nor round (None in ``xs``, in the order they
    were recorded) the x one after the largest its series had so far (1 for the first)."""
    largest: int | None = None
    for i, x in enumerate(xs):
        if x is None:
            x = xs[i] = (0 if largest is None else largest) + 1
        if largest is None or x > largest:
            largest = x


def metric_charts(job: Job, *, limit: int = MAX_CHART_POINTS) -> dict[str, Any]:
    """``{chart id: {"key", "axis", "series": {name: [[x, y], ...]}, "counts": {name: n}}}``,
    charts by id, each series sorted by x and at most ``limit`` points long; ``counts`` gives
    each series' full length (longer than its points when it was downsampled)."""
    return _charts_and_through(job, limit)[0]


def metric_snapshot(job: Job, *, limit: int = MAX_CHART_POINTS) -> dict[str, Any]:
    """What the job page draws and then keeps up to date from its socket: ``{"charts":
    metric_charts(job), "through": {site name: id}}``, ``through`` naming, for each site, the
    last of its logged points that these charts hold.

    The page may hear of a point after a snapshot that holds it already (a snapshot fetched
    while the point's event was on its way); it skips a site's live point whose id is not
    above the site's ``through``. That is exact because a site's logged points are inserted
    under its job-site row's lock (``jobs.services.telemetry``): their ids rise in the order
    they commit, so a snapshot that holds one holds every earlier one, and a point it lacks
    has a higher id. Points of other sources come with no event of their own (the page
    fetches the charts again when a round closes) and do not count.
    """
    charts, through = _charts_and_through(job, limit)
    return {"charts": charts, "through": through}


def _charts_and_through(job: Job, limit: int) -> tuple[dict[str, Any], dict[str, int]]:
    rows = (
        MetricPoint.objects.filter(job=job)
        .order_by("created_at", "id")
        .values_list("key", "value", "step", "round_number", "site_id", "id", "source")
    )
    # One pass in the order the points were recorded, a few cheap statements a point
    # (measured: ~0.2 µs); placing, sorting and cutting each series is numpy's.
    series: dict[tuple[str, int | None, bool], tuple[list[Any], list[float]]] = {}
    through_ids: dict[int, int] = {}
    site_id: int | None  # None: the round's aggregate
    x: int | None
    for key, value, step, round_number, site_id, point_id, source in rows:
        if site_id is not None and source == MetricPoint.Source.LOG:
            through_ids[site_id] = max(point_id, through_ids.get(site_id, 0))
        if step is None and round_number is not None:
            ref, x = (key, site_id, True), round_for_people(round_number)
        else:
            ref, x = (key, site_id, False), step  # None: placed once the series is complete
        entry = series.get(ref)
        if entry is None:
            entry = series[ref] = ([], [])
        entry[0].append(x)
        entry[1].append(value)
    names = _site_names(job)
    charts: dict[str, dict[str, Any]] = {}
    for (key, site_id, axis_is_round), (xs, values) in series.items():
        if None in xs:
            _place_unplaced(xs)
        x_arr = np.asarray(xs, dtype=np.int64)
        order = np.argsort(x_arr, kind="stable")  # equal x: in the order recorded
        x_arr = x_arr[order]
        y_arr = np.asarray(values, dtype=np.float64)[order]
        kept = _kept(y_arr, limit)
        axis = "round" if axis_is_round else "step"
        chart_id = f"{key} · by {axis}"
        chart = charts.get(chart_id)
        if chart is None:
            chart = charts[chart_id] = {"key": key, "axis": axis, "series": {}, "counts": {}}
        name = AGGREGATE if site_id is None else names.get(site_id, AGGREGATE)
        xs_kept, ys_kept = x_arr[kept].tolist(), y_arr[kept].tolist()
        chart["series"][name] = [[x, y] for x, y in zip(xs_kept, ys_kept, strict=True)]
        chart["counts"][name] = len(values)
    through = {names[pk]: point_id for pk, point_id in through_ids.items() if pk in names}
    return dict(sorted(charts.items())), through


# --- the full series, as CSV -----------------------------------------------------------------


def _csv_batch(job_id: int, names: dict[int, str], after_id: int) -> tuple[str, int | None]:
    """The CSV lines of the next :data:`CSV_BATCH` points after ``after_id`` (``names``: the
    project's site names by id), and the last id (None when there are no more)."""
    rows = list(
        MetricPoint.objects.filter(job_id=job_id, id__gt=after_id)
        .order_by("id")
        .values_list(
            "id", "site_id", "round_number", "step", "key", "value", "source", "created_at"
        )[:CSV_BATCH]
    )
    if not rows:
        return "", None
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        (
            AGGREGATE if site_id is None else names.get(site_id, ""),
            "" if round_number is None else round_for_people(round_number),
            "" if step is None else step,
            spreadsheet_safe(key),
            repr(value),
            source,
            created_at.isoformat(),
        )
        for _, site_id, round_number, step, key, value, source, created_at in rows
    )
    return out.getvalue(), rows[-1][0]


def _header() -> str:
    return ",".join(CSV_COLUMNS) + "\n"


def metric_points_csv(job: Job) -> Iterator[str]:
    """Every point of the job in the order it was stored, one CSV line each, with rounds
    counted from 1 as on the pages; fetched :data:`CSV_BATCH` rows at a time, so memory stays
    flat however long the job ran."""
    yield _header()
    names = _site_names(job)
    last: int | None = 0
    while last is not None:
        text, last = _csv_batch(job.pk, names, last)
        if text:
            yield text


async def metric_points_csv_async(job: Job) -> AsyncIterator[str]:
    """:func:`metric_points_csv` for an ASGI server, which would read a plain iterator to the
    end before sending anything."""
    yield _header()
    names = await sync_to_async(_site_names)(job)
    last: int | None = 0
    batch = sync_to_async(_csv_batch)
    while last is not None:
        text, last = await batch(job.pk, names, last)
        if text:
            yield text
