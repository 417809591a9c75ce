"""A download's file name keeps letters, digits, '.', '_' and '-' of the job's name only."""

from __future__ import annotations

from common.downloads import download_filename


def test_unsafe_runs_become_one_dash_and_an_empty_name_becomes_job() -> None:
    assert download_filename('a "b"/..\\c d', "u1", "-log.txt") == "a-b-..-c-d-u1-log.txt"
    assert download_filename("résumé run", 7, ".csv") == "r-sum-run-7.csv"
    assert download_filename('";\r\n', "u", "") == "job-u"
