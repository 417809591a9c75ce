"""The site's privacy policy (``client_agent.privacy.policy``): every field read from
``privacy.toml``, every bad value refused naming the file, the line and the field, the
portal's JSON copy, and what a job would cost here."""

from __future__ import annotations

import hashlib
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from client_agent.privacy import accounting
from client_agent.privacy.accounting import DEFAULT_DELTA
from client_agent.privacy.policy import (
    BUDGET_EXHAUSTED,
    POLICY_FILE,
    PolicyError,
    PrivacyPolicy,
    assess_job,
)

FULL_POLICY = textwrap.dedent(
    """\
    # every field, each on its own line
    [jobs]
    projects = ["cardiology", "oncology"]
    submitters = ["alice"]

    [update]
    clip_norm = 1.5
    clip_scope = "layer"
    noise_multiplier = 1.1
    exclude_tensors = ["*.bias", "head.*"]
    max_update_bytes = 200_000_000

    [budget]
    delta = 1e-6
    max_epsilon = 8.0
    max_project_epsilon = 20

    [output]
    send_lines = false
    """
)


def write_policy(folder: Path, text: str) -> Path:
    path = folder / POLICY_FILE
    path.write_text(text)
    return path


def load_error(folder: Path, text: str) -> PolicyError:
    path = write_policy(folder, text)
    with pytest.raises(PolicyError) as info:
        PrivacyPolicy.load(path)
    return info.value


# --------------------------------------------------------------------------------------------
# privacy.toml
# --------------------------------------------------------------------------------------------


def test_every_field_is_read_in_its_type(tmp_path: Path) -> None:
    path = write_policy(tmp_path, FULL_POLICY)

    policy = PrivacyPolicy.load(path)

    assert policy == PrivacyPolicy(
        projects=("cardiology", "oncology"),
        submitters=("alice",),
        clip_norm=1.5,
        clip_scope="layer",
        noise_multiplier=1.1,
        exclude_tensors=("*.bias", "head.*"),
        max_update_bytes=200_000_000,
        delta=1e-6,
        max_epsilon=8.0,
        max_project_epsilon=20.0,
        send_lines=False,
    )
    assert isinstance(policy.max_project_epsilon, float)
    assert policy.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.path == str(path)


def test_a_folder_without_a_policy_gets_the_default_and_an_empty_file_is_the_default(
    tmp_path: Path,
) -> None:
    default = PrivacyPolicy.in_folder(tmp_path)

    assert default == PrivacyPolicy()
    assert (default.clip_norm, default.noise_multiplier, default.delta) == (None, 0.0, 1e-5)
    assert default.send_lines and not default.changes_updates and not default.has_budget
    write_policy(tmp_path, "# nothing set\n")
    assert PrivacyPolicy.in_folder(tmp_path) == default


def test_the_folder_s_policy_file_is_the_one_read(tmp_path: Path) -> None:
    write_policy(tmp_path, "[update]\nclip_norm = 2.0\n")

    assert PrivacyPolicy.in_folder(tmp_path).clip_norm == 2.0


# Each bad file, the field its error names and the line that holds the bad value (1-based;
# the lines above it are there so that "line 1" or the table's line cannot pass by chance).
BAD_FILES = [
    pytest.param(
        "[jobs]\nprojects = ['a']\n\n[updates]\nclip_norm = 1.0\n",
        "updates",
        4,
        "no such table",
        id="unknown-table",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nclipnorm = 2.0\n",
        "update.clipnorm",
        4,
        "no such field",
        id="unknown-field",
    ),
    pytest.param(
        "[update]\nclip_norm = '1.0'\n",
        "update.clip_norm",
        2,
        "must be a finite number, got '1.0'",
        id="clip-as-string",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nnoise_multiplier = true\n",
        "update.noise_multiplier",
        3,
        "must be a finite number, got True",
        id="noise-as-bool",
    ),
    pytest.param(
        "[jobs]\nprojects = 'cardiology'\n",
        "jobs.projects",
        2,
        "must be a list of non-empty strings",
        id="projects-not-a-list",
    ),
    pytest.param(
        "[jobs]\nsubmitters = ['alice', '']\n",
        "jobs.submitters",
        2,
        "must be a list of non-empty strings",
        id="empty-submitter",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nclip_scope = 'tensor'\n",
        "update.clip_scope",
        3,
        "must be one of model, layer, got 'tensor'",
        id="clip-scope",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nmax_update_bytes = 1.5\n",
        "update.max_update_bytes",
        3,
        "positive whole number of bytes",
        id="bytes-not-whole",
    ),
    pytest.param(
        "[update]\nmax_update_bytes = 0\n",
        "update.max_update_bytes",
        2,
        "positive whole number of bytes",
        id="bytes-zero",
    ),
    pytest.param(
        "[output]\n\nsend_lines = 'no'\n",
        "output.send_lines",
        3,
        "must be true or false",
        id="send-lines",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nnoise_multiplier = -1\n",
        "update.noise_multiplier",
        3,
        "must be ≥ 0, got -1",
        id="negative-noise",
    ),
    pytest.param(
        "[update]\nclip_norm = 0\n",
        "update.clip_norm",
        2,
        "must be > 0, got 0",
        id="zero-clip",
    ),
    pytest.param(
        "[update]\nclip_norm = inf\n",
        "update.clip_norm",
        2,
        "must be a finite number",
        id="infinite-clip",
    ),
    pytest.param(
        "[update]\nclip_norm = nan\n",
        "update.clip_norm",
        2,
        "must be a finite number",
        id="nan-clip",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n\n[budget]\nmax_epsilon = 8\n"
        "delta = 1\n",
        "budget.delta",
        7,
        "between 0 and 1 (exclusive), got 1",
        id="delta-one",
    ),
    pytest.param(
        "[budget]\ndelta = 1.5\n",
        "budget.delta",
        2,
        "between 0 and 1",
        id="delta-over-one",
    ),
    pytest.param(
        "[budget]\n\ndelta = 0\n",
        "budget.delta",
        3,
        "between 0 and 1",
        id="delta-zero",
    ),
    pytest.param(
        "[budget]\ndelta = -1e-5\n",
        "budget.delta",
        2,
        "between 0 and 1",
        id="delta-negative",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n[budget]\nmax_epsilon = 0\n",
        "budget.max_epsilon",
        5,
        "must be > 0, got 0",
        id="epsilon-zero",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n[budget]\nmax_epsilon = 4\n"
        "max_project_epsilon = -2\n",
        "budget.max_project_epsilon",
        6,
        "must be > 0, got -2",
        id="project-epsilon-negative",
    ),
    pytest.param(
        "[update]\nexclude_tensors = ['*.bias']\nnoise_multiplier = 1.1\n",
        "update.noise_multiplier",
        3,
        "noise needs update.clip_norm",
        id="noise-without-clip",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\n\n[budget]\ndelta = 1e-5\nmax_epsilon = 8.0\n",
        "budget.max_epsilon",
        6,
        "a budget needs update.noise_multiplier > 0",
        id="budget-without-noise",
    ),
    pytest.param(
        "[update]\nclip_norm = 1.0\n\n[budget]\nmax_project_epsilon = 8.0\n",
        "budget.max_project_epsilon",
        5,
        "a budget needs update.noise_multiplier > 0",
        id="project-budget-without-noise",
    ),
]


@pytest.mark.parametrize(("text", "field", "line", "words"), BAD_FILES)
def test_a_bad_policy_names_the_file_the_line_and_the_field(
    tmp_path: Path, text: str, field: str, line: int, words: str
) -> None:
    error = load_error(tmp_path, text)

    path = str(tmp_path / POLICY_FILE)
    assert (error.field, error.line, error.path) == (field, line, path)
    assert words in error.reason
    assert str(error).startswith(f"{path}:{line}: {field}: ")
    assert str(error).endswith(error.reason)


def test_the_error_message_reads_as_documented(tmp_path: Path) -> None:
    text = "\n".join(["# comment"] * 4 + ["[update]", "clip_norm = 1", "noise_multiplier = -1"])

    error = load_error(tmp_path, text + "\n")

    assert str(error) == (
        f"{tmp_path / POLICY_FILE}:7: update.noise_multiplier: must be ≥ 0, got -1"
    )


def test_invalid_toml_names_its_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[update]\nclip_norm = 1.0\nnoise_multiplier = = 2\n")

    assert error.line == 3
    assert "not valid TOML" in error.reason
    assert str(error).startswith(f"{tmp_path / POLICY_FILE}:3: not valid TOML")


def test_a_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / POLICY_FILE
    path.write_bytes(b"[update]\nclip_norm = 1.0 # \xff\n")

    with pytest.raises(PolicyError) as info:
        PrivacyPolicy.load(path)

    assert "not UTF-8" in str(info.value) and str(path) in str(info.value)


def test_a_field_in_the_wrong_table_is_refused(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[update]\nclip_norm = 1.0\nmax_epsilon = 8.0\n")

    assert (error.field, error.line) == ("update.max_epsilon", 3)
    assert "no such field; [update] has clip_norm" in error.reason


def test_policies_built_in_code_are_checked_the_same_way() -> None:
    with pytest.raises(PolicyError) as info:
        PrivacyPolicy(clip_norm=1.0, noise_multiplier=-0.5)
    assert info.value.field == "update.noise_multiplier"
    with pytest.raises(PolicyError) as info:
        PrivacyPolicy(delta=1.0)
    assert info.value.field == "budget.delta"


# --------------------------------------------------------------------------------------------
# The portal's copy
# --------------------------------------------------------------------------------------------


def test_to_json_and_from_json_round_trip_every_field(tmp_path: Path) -> None:
    policy = PrivacyPolicy.load(write_policy(tmp_path, FULL_POLICY))

    data = policy.to_json()
    again = PrivacyPolicy.from_json(data)

    assert again == policy
    assert again.sha256 == policy.sha256
    assert again.to_json() == data
    assert data["budget"] == {"delta": 1e-6, "max_epsilon": 8.0, "max_project_epsilon": 20.0}
    assert data["update"]["exclude_tensors"] == ["*.bias", "head.*"]


def test_the_default_policy_round_trips_with_nulls_for_what_is_not_set() -> None:
    data = PrivacyPolicy().to_json()

    assert data["jobs"] == {"projects": None, "submitters": None}
    assert data["update"]["clip_norm"] is None
    assert data["budget"]["max_epsilon"] is None
    assert PrivacyPolicy.from_json(data) == PrivacyPolicy()


def _json_with(table: str, name: str, value: Any) -> dict[str, Any]:
    data = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, max_epsilon=8.0).to_json()
    data[table][name] = value
    return data


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        pytest.param(
            _json_with("update", "noise_multiplier", -1), "update.noise_multiplier", "≥ 0"
        ),
        pytest.param(_json_with("budget", "delta", 1.0), "budget.delta", "between 0 and 1"),
        pytest.param(_json_with("budget", "max_epsilon", 0), "budget.max_epsilon", "> 0"),
        pytest.param(_json_with("update", "clip_norm", "1"), "update.clip_norm", "finite number"),
        pytest.param(_json_with("update", "clip_scope", "all"), "update.clip_scope", "one of"),
        pytest.param(_json_with("update", "extra", 1), "update.extra", "no such field"),
        pytest.param(
            {**PrivacyPolicy().to_json(), "secrets": {}}, "secrets", "no such table", id="table"
        ),
        pytest.param({**PrivacyPolicy().to_json(), "sha256": "abc"}, "sha256", "64", id="sha"),
        pytest.param(
            {**PrivacyPolicy().to_json(), "update": [1]}, "update", "must be a table", id="list"
        ),
    ],
)
def test_from_json_refuses_bad_values_naming_the_field(
    data: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(PolicyError) as info:
        PrivacyPolicy.from_json(data)

    assert info.value.field == field
    assert words in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_from_json_refuses_what_is_not_an_object() -> None:
    with pytest.raises(PolicyError, match="a policy is a JSON object, got list"):
        PrivacyPolicy.from_json([])


def test_to_toml_is_read_back_as_the_same_policy(tmp_path: Path) -> None:
    policy = PrivacyPolicy.load(write_policy(tmp_path, FULL_POLICY))

    again = PrivacyPolicy.load(write_policy(tmp_path, policy.to_toml()))

    assert again == policy


# --------------------------------------------------------------------------------------------
# What it rules
# --------------------------------------------------------------------------------------------


def test_excluded_matches_glob_patterns_case_sensitively() -> None:
    policy = PrivacyPolicy(exclude_tensors=("*.bias", "head.*"))

    names = ["conv.weight", "conv.bias", "head.weight", "Head.weight", "fc.Bias", "bias"]

    assert policy.excluded(names) == {"conv.bias", "head.weight"}
    assert PrivacyPolicy().excluded(names) == set()


def test_describe_puts_each_rule_in_words() -> None:
    policy = PrivacyPolicy(
        projects=("cardiology",),
        submitters=("alice", "bob"),
        clip_norm=1.5,
        noise_multiplier=1.1,
        exclude_tensors=("*.bias",),
        max_update_bytes=2_000_000,
        max_epsilon=8.0,
        send_lines=False,
    )

    assert policy.describe() == [
        ("Jobs", "projects cardiology, submitted by alice, bob"),
        ("Clipping", "whole update to L2 norm 1.5"),
        ("Noise", "Gaussian, std 1.1 × clip norm"),
        ("δ", "1e-05"),
        ("ε per job", "8"),
        ("ε per project", "no cap"),
        ("Tensors kept here", "*.bias"),
        ("Largest update", "2,000,000 bytes"),
        ("Script output lines", "stay at the site"),
    ]


def test_describe_of_the_default_policy_says_nothing_is_limited() -> None:
    rows = dict(PrivacyPolicy().describe())

    assert rows["Jobs"] == "any project, any submitter"
    assert rows["Clipping"] == rows["Noise"] == rows["Tensors kept here"] == "none"
    assert rows["ε per job"] == rows["ε per project"] == "no cap"
    assert rows["Largest update"] == "no limit"
    assert rows["Script output lines"] == "leave the site"


def test_describe_of_layer_clipping_gives_the_per_tensor_rule() -> None:
    rows = dict(PrivacyPolicy(clip_norm=2.0, clip_scope="layer").describe())

    assert rows["Clipping"] == "each tensor to L2 norm 2 / √(tensors) (update total ≤ 2)"


@pytest.mark.parametrize(
    ("project", "submitter", "refused"),
    [
        ("cardiology", "alice", None),
        ("oncology", "bob", None),
        ("dermatology", "alice", "allows jobs of cardiology, oncology only"),
        ("cardiology", "mallory", "submitted by alice, bob only, not mallory"),
        ("cardiology", None, "only, not an unknown submitter"),
    ],
)
def test_refuses_job_by_project_and_submitter(
    project: str, submitter: str | None, refused: str | None
) -> None:
    policy = PrivacyPolicy(projects=("cardiology", "oncology"), submitters=("alice", "bob"))

    reason = policy.refuses_job(project=project, submitter=submitter)

    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_a_policy_without_lists_refuses_no_job_and_an_empty_list_refuses_every_job() -> None:
    assert PrivacyPolicy().refuses_job(project="any", submitter=None) is None
    reason = PrivacyPolicy(projects=()).refuses_job(project="any", submitter="alice")
    assert reason is not None and "nobody" in reason


# --------------------------------------------------------------------------------------------
# What a job would cost
# --------------------------------------------------------------------------------------------

NOISY = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.1, max_epsilon=8.0)


def test_epsilon_after_is_the_accountant_s_value_for_the_policy_s_steps() -> None:
    spent = [(1.1, 1.0, 3)]

    assert NOISY.epsilon_after(5, spent) == accounting.epsilon([(1.1, 1.0, 8)], DEFAULT_DELTA)
    assert NOISY.epsilon_after(0) == 0.0
    # no clipping: nothing bounds what an update reveals
    assert PrivacyPolicy().epsilon_after(1) == math.inf
    assert PrivacyPolicy().epsilon_after(0) == 0.0


def test_assess_job_with_room_for_every_round() -> None:
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=4.0, max_epsilon=8.0)
    within = policy.rounds_within()
    assert within is not None and within > 3

    assessment = assess_job(policy, project="p", submitter="alice", rounds=3)

    assert assessment.refused is None
    assert not assessment.partial
    assert (assessment.rounds, assessment.rounds_within) == (3, within)
    assert assessment.expected_epsilon == accounting.epsilon_after(4.0, 3, DEFAULT_DELTA)


def test_assess_job_that_fits_partly_expects_the_epsilon_of_the_rounds_that_fit() -> None:
    within = NOISY.rounds_within()
    assert within is not None
    rounds = within + 10

    assessment = assess_job(NOISY, project="p", submitter=None, rounds=rounds)

    assert assessment.refused is None
    assert assessment.partial
    assert assessment.rounds_within == within
    assert assessment.expected_epsilon == accounting.epsilon_after(1.1, within, DEFAULT_DELTA)
    assert assessment.expected_epsilon <= 8.0
    assert accounting.epsilon_after(1.1, within + 1, DEFAULT_DELTA) > 8.0


def test_assess_job_refuses_when_no_round_fits_the_job_budget() -> None:
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=0.5, max_epsilon=1.0)
    assert accounting.epsilon_after(0.5, 1, DEFAULT_DELTA) > 1.0

    assessment = assess_job(policy, project="p", submitter=None, rounds=5)

    assert assessment.rounds_within == 0
    assert not assessment.partial
    assert assessment.refused is not None
    assert assessment.refused.startswith(f"{BUDGET_EXHAUSTED}: one more round would bring this")
    assert "over the site's 1" in assessment.refused


def test_assess_job_counts_what_the_project_has_already_spent() -> None:
    policy = PrivacyPolicy(
        clip_norm=1.0, noise_multiplier=1.1, max_epsilon=8.0, max_project_epsilon=10.0
    )
    fresh = policy.rounds_within()
    project_within = accounting.steps_within(10.0, 1.1, DEFAULT_DELTA)
    spent = [(1.1, 1.0, project_within)]

    assessment = assess_job(policy, project="p", submitter=None, rounds=2, project_spent=spent)

    assert fresh is not None and fresh > 0
    assert assessment.rounds_within == 0
    assert assessment.refused is not None
    assert "the project's ε here" in assessment.refused


def test_assess_job_gives_the_policy_refusal_before_the_budget() -> None:
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.1, submitters=("alice",))

    assessment = assess_job(policy, project="p", submitter="bob", rounds=3)

    assert assessment.refused is not None and "not bob" in assessment.refused
    assert assessment.rounds_within is None  # no budget here
    assert assessment.expected_epsilon == accounting.epsilon_after(1.1, 3, DEFAULT_DELTA)


def test_assess_job_without_clipping_has_no_accounting() -> None:
    assessment = assess_job(PrivacyPolicy(), project="p", submitter=None, rounds=4)

    assert assessment.refused is None
    assert (assessment.rounds_within, assessment.expected_epsilon) == (None, None)
    assert not assessment.partial
