"""The submission form's object-typed workflow parameters (``aggregator_args``): JSON text,
parsed, with an error that names the parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs.models import Job
from tests.portal import jobs_api_world as jw

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("eager_celery", "media"),
]


def fields(bundle: jw.Bundle, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "browser-job",
        "workflow": "fedavg",
        "fedavg__min_clients": "3",
        "fedavg__num_rounds": "1",
        "train_script": "client.py",
        "app": SimpleUploadedFile("app.zip", bundle.app),
        "initial_model": SimpleUploadedFile("initial.safetensors", bundle.model),
        **overrides,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"trim_fraction": 0.1', "aggregator_args: not valid JSON (Expecting ',' delimiter"),
        ("[0.1]", "aggregator_args: must be a JSON object"),
    ],
)
def test_json_that_is_no_object_is_refused_beside_its_field(
    tmp_path: Path, text: str, message: str
) -> None:
    world = jw.build_world(tmp_path, submit=False)
    client = Client()
    client.force_login(world.users[jw.LEAD])
    url = f"/projects/{world.project.slug}/jobs/new/"

    response = client.post(url, fields(jw.make_bundle(tmp_path), fedavg__aggregator_args=text))

    assert message in response.context["form"].errors["fedavg__aggregator_args"][0]
    assert Job.objects.count() == 0


def test_a_json_object_becomes_the_parameter(tmp_path: Path) -> None:
    world = jw.build_world(tmp_path, submit=False)
    client = Client()
    client.force_login(world.users[jw.LEAD])
    url = f"/projects/{world.project.slug}/jobs/new/"
    assert 'name="fedavg__aggregator_args"' in client.get(url).content.decode()

    response = client.post(
        url,
        fields(
            jw.make_bundle(tmp_path),
            fedavg__aggregator="trimmed_mean",
            fedavg__aggregator_args='{"trim_fraction": 0.25}',
        ),
    )

    job = Job.objects.get()
    assert response.status_code == 302, response.context["form"].errors
    assert job.params["aggregator"] == "trimmed_mean"
    assert job.params["aggregator_args"] == {"trim_fraction": 0.25}
