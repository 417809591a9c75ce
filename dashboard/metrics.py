"""A job's metric points shaped for the job page's charts.

One chart per metric key and x axis. Points that carry a ``step`` (``flare.log(key, value,
step)``) go on the key's "by step" chart; points that belong to a round (train results, the
round's aggregate, and logged points with a round but no step) go on its "by round" chart, with
rounds counted from 1 as everywhere on the dashboard; a logged point with neither comes one
after the largest x its series has so far. Each site is a series; the round's aggregate (the
sites' weighted mean, as FedAvg weights them) is the series ``all sites``.
``static/dashboard/job.js`` places live points by the same rule.
"""

from __future__ import annotations

from typing import Any

from jobs import selectors
from jobs.models import Job, MetricPoint

AGGREGATE = "all sites"


def chart_of(point: MetricPoint) -> tuple[str, str]:
    """``(chart id, axis)`` of a point."""
    axis = "round" if point.step is None and point.round_number is not None else "step"
    return f"{point.key} · by {axis}", axis


def metric_charts(job: Job) -> dict[str, Any]:
    """``{chart id: {"key", "axis", "series": {name: [[x, y], ...]}}}``, charts by id, each
    series sorted by x."""
    charts: dict[str, dict[str, Any]] = {}
    for point in selectors.metric_points_of(job):
        chart_id, axis = chart_of(point)
        name = point.site.name if point.site_id else AGGREGATE
        chart = charts.setdefault(chart_id, {"key": point.key, "axis": axis, "series": {}})
        series = chart["series"].setdefault(name, [])
        if point.step is not None:
            x = point.step
        elif point.round_number is not None:
            x = point.round_number + 1
        else:
            x = max((p[0] for p in series), default=0) + 1
        series.append([x, point.value])
    for chart in charts.values():
        for points in chart["series"].values():
            points.sort(key=lambda p: p[0])
    return dict(sorted(charts.items()))
