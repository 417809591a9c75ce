"""How rounds are numbered, everywhere.

A round's *index* counts from 0: ``Round.number``, a task's and a metric point's ``round``, the
wire, the API, file names of a round's updates (``round-000``). A person counts from 1, so text
meant for people (log lines, error messages, the dashboard) shows :func:`round_for_people`.

A *count of completed rounds* is another number, not an index: ``Job.completed_rounds`` and a
global model's ``ModelVersion.round_number`` (0 is the initial model, ``n`` the model after n
rounds), hence its file name ``round-00n``. Round index ``i`` makes the model of count
``i + 1``.
"""

from __future__ import annotations


def round_for_people(index: int) -> int:
    """Round ``index`` (from 0) as a person counts it (from 1): for text people read only."""
    return index + 1
