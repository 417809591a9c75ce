"""The job submission form, built from each workflow's parameter schema (``PARAMETERS``).

A person fills in what ``recipe.export()`` would have written: the job's name, the workflow and
its parameters, the train script and its arguments, the app folder as a zip (or an earlier
upload of the same project) and the initial weights. The form only shapes the input;
``jobs.services.submission.job_submit`` checks all of it and has the last word.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping
from typing import IO, Any

from django import forms
from django.core.files.uploadedfile import UploadedFile
from django.db.models import QuerySet

from jobs.bundle import BUNDLE_FORMAT
from jobs.models import Job, ModelVersion
from jobs.services.submission import MAX_ROUND_TIMEOUT_SECONDS
from jobs.workflows import workflow_registry
from sites.models import Project, Site, SiteState
from sites.selectors import site_is_online

# A service error's field → the form field it belongs beside; ``spec.params.<name>`` goes beside
# the chosen workflow's parameter <name>.
PARAMS = "spec.params."
SERVICE_FIELDS = {
    "spec.name": "name",
    "spec.workflow": "workflow",
    "spec.train_script": "train_script",
    "spec.train_args": "train_args",
    "spec.format": "workflow",
    "app": "app",
    "initial_model": "initial_model",
    "sites": "sites",
    "round_timeout_seconds": "round_timeout_seconds",
    "body": "app",
}


def param_field_name(workflow: str, param: str) -> str:
    return f"{workflow}__{param}"


class JSONObjectField(forms.CharField):
    """A parameter whose value is a JSON object (``aggregator_args``, ``optimizer_args``),
    typed as JSON text; the error names the parameter and what is wrong with the text. Empty:
    the workflow's default (or null, where the schema allows it)."""

    widget = forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "class": "json"})

    def __init__(self, *, name: str, nullable: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.param = name
        self.nullable = nullable

    def clean(self, value: Any) -> Any:
        text = super().clean(value)
        if text in (None, ""):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"{self.param}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno})",
                code="invalid_json",
            ) from None
        if parsed is None and self.nullable:
            return None
        if not isinstance(parsed, dict):
            raise forms.ValidationError(
                f'{self.param}: must be a JSON object, such as {{"name": 1}}; got '
                f"{type(parsed).__name__ if parsed is not None else 'null'}",
                code="not_an_object",
            )
        return parsed


def _field_for(schema: Mapping[str, Any], *, label: str, name: str = "") -> forms.Field:
    """A form field for one JSON-schema property (the subset workflows use). Every parameter
    field is optional to Django: only the chosen workflow's required ones are checked."""
    help_text = str(schema.get("description", ""))
    if "enum" in schema:
        choices = [("", "default"), *((v, v) for v in schema["enum"])]
        return forms.ChoiceField(choices=choices, required=False, label=label, help_text=help_text)
    kinds = schema.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    low, high = schema.get("minimum"), schema.get("maximum")
    if "integer" in kinds:
        return forms.IntegerField(
            required=False, label=label, help_text=help_text, min_value=low, max_value=high
        )
    if "number" in kinds:
        return forms.FloatField(
            required=False, label=label, help_text=help_text, min_value=low, max_value=high
        )
    if "boolean" in kinds:
        return forms.BooleanField(required=False, label=label, help_text=help_text)
    if "object" in kinds:
        return JSONObjectField(
            name=name or label,
            nullable="null" in kinds,
            required=False,
            label=label,
            help_text=f"{help_text} (JSON)" if help_text else "JSON",
        )
    return forms.CharField(required=False, label=label, help_text=help_text)


# What a required parameter starts at in an empty form: a small federation's usual values.
SUGGESTED = {"min_clients": 2, "num_rounds": 5}


def workflow_defaults(cls: Any) -> dict[str, Any]:
    """Each parameter's default, as the workflow's constructor has it (a default factory
    called), or :data:`SUGGESTED` for a required one; parameters without either are left out."""
    defaults: dict[str, Any] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    else:
        for name, param in inspect.signature(cls).parameters.items():
            if param.default is not inspect.Parameter.empty:
                defaults[name] = param.default
    for name, value in SUGGESTED.items():
        defaults.setdefault(name, value)
    return {
        k: v for k, v in defaults.items() if v is not None and k in cls.PARAMETERS["properties"]
    }


def field_value(value: Any) -> Any:
    """A parameter's value as its form field shows it: JSON text for objects and lists."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return value


def site_choices(project: Project) -> list[tuple[str, str]]:
    """The project's enrolled sites as choices, each saying whether its agent is online now and
    whether it accepts jobs by itself, so a person sees who will answer."""
    choices = []
    for site in Site.objects.filter(project=project, state=SiteState.ENROLLED).order_by("name"):
        online = "online" if site_is_online(site) else "offline"
        decides = "accepts automatically" if site.auto_accept_jobs else "a site admin decides"
        choices.append((site.name, f"{site.name} ({online}; {decides})"))
    return choices


def workflows() -> dict[str, Any]:
    """Every workflow the portal runs, by name, as ``jobs.workflows`` registers them."""
    return dict(sorted(workflow_registry().items()))


class JobSubmitForm(forms.Form):
    name = forms.RegexField(
        regex=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        max_length=100,
        help_text="Letters, digits, '.', '_' and '-'.",
        error_messages={"invalid": "Use letters, digits, '.', '_' and '-', starting with one."},
    )
    workflow = forms.ChoiceField()
    train_script = forms.CharField(
        initial="client.py", help_text="The client script, as a path inside the app folder."
    )
    train_args = forms.CharField(
        required=False, help_text="Arguments for the script, as on a command line."
    )
    app = forms.FileField(
        required=False,
        label="App folder (zip)",
        help_text="The client script's folder, zipped (jobs.bundle.pack_app writes one).",
    )
    earlier_app = forms.ChoiceField(
        required=False,
        label="…or an earlier upload",
        help_text="Reuse the app of an earlier job of this project.",
    )
    initial_model = forms.FileField(
        required=False,
        label="Initial weights (.safetensors)",
        help_text="The initial global model: a safetensors file.",
    )
    earlier_model = forms.ChoiceField(
        required=False,
        label="…or the initial weights of an earlier job",
        help_text="Start from the same weights an earlier job of this project started from.",
    )
    sites = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every site of the project that is enrolled now.",
    )
    round_timeout_seconds = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ROUND_TIMEOUT_SECONDS,
        label="Round timeout (seconds)",
        help_text="A round closes at this deadline if enough sites answered (default: the "
        "portal's FEDPORTAL_ROUND_TIMEOUT_SECONDS).",
    )

    def __init__(
        self,
        *args: Any,
        earlier_jobs: QuerySet[Job],
        sites: list[tuple[str, str]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.earlier = {str(job.uid): job for job in earlier_jobs}
        self.workflow_params: dict[str, list[str]] = {}
        registered = workflows()
        defaults = {name: workflow_defaults(cls) for name, cls in registered.items()}
        workflow_field = self.fields["workflow"]
        assert isinstance(workflow_field, forms.ChoiceField)
        workflow_field.choices = [(name, name) for name in registered]
        for name, cls in registered.items():
            schema = cls.PARAMETERS
            self.workflow_params[name] = []
            for param, prop in schema["properties"].items():
                field_name = param_field_name(name, param)
                label = param.replace("_", " ").capitalize()
                self.fields[field_name] = _field_for(prop, label=label, name=param)
                if param in defaults[name]:
                    self.fields[field_name].initial = field_value(defaults[name][param])
                if param in schema.get("required", ()):
                    self.fields[field_name].widget.attrs["aria-required"] = "true"
                self.workflow_params[name].append(field_name)
        earlier_field = self.fields["earlier_app"]
        assert isinstance(earlier_field, forms.ChoiceField)
        seen: set[str] = set()
        self.offered_apps: dict[str, str] = {}  # archive sha256 -> the job offering it
        choices = [("", "— upload a zip instead —")]
        for uid, job in self.earlier.items():
            if job.app_sha256 in seen:
                continue  # the same archive again: offer it once, from its newest job
            seen.add(job.app_sha256)
            self.offered_apps[job.app_sha256] = uid
            label = f"{job.name}, {job.created_at:%Y-%m-%d %H:%M} (sha256 {job.app_sha256[:12]}…)"
            choices.append((uid, label))
        earlier_field.choices = choices
        model_field = self.fields["earlier_model"]
        assert isinstance(model_field, forms.ChoiceField)
        model_field.choices = [("", "— upload a file instead —")] + [
            (uid, f"{job.name}, {job.created_at:%Y-%m-%d %H:%M}")
            for uid, job in self.earlier.items()
        ]
        sites_field = self.fields["sites"]
        assert isinstance(sites_field, forms.MultipleChoiceField)
        sites_field.choices = sites

    def offered_app(self, job: Job) -> str:
        """The choice of ``earlier_app`` that holds ``job``'s archive (each archive is offered
        once, from its newest job)."""
        return self.offered_apps.get(job.app_sha256, "")

    def param_groups(self) -> list[tuple[str, list[forms.BoundField]]]:
        """Each workflow with its parameters' bound fields, for the template."""
        return [(name, [self[f] for f in fields]) for name, fields in self.workflow_params.items()]

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        chosen = data.get("workflow")
        if chosen in self.workflow_params:
            required = workflows()[chosen].PARAMETERS.get("required", ())
            for param in required:
                field_name = param_field_name(chosen, param)
                if data.get(field_name) in (None, "") and field_name not in self.errors:
                    self.add_error(field_name, f"The {chosen} workflow needs this.")
        if not data.get("initial_model") and not data.get("earlier_model"):
            self.add_error("initial_model", "Upload the initial weights, or pick an earlier job's.")
        elif data.get("initial_model") and data.get("earlier_model"):
            self.add_error("earlier_model", "Choose one: a new file or an earlier job's, not both.")
        if not data.get("app") and not data.get("earlier_app"):
            self.add_error("app", "Upload the app folder as a zip, or pick an earlier upload.")
        elif data.get("app") and data.get("earlier_app"):
            self.add_error("earlier_app", "Choose one: a new zip or an earlier upload, not both.")
        return data

    def spec(self) -> dict[str, Any]:
        """The job.json the form describes (the shape ``jobs.bundle.build_spec`` writes)."""
        data = self.cleaned_data
        workflow = data["workflow"]
        params: dict[str, Any] = {}
        prefix = param_field_name(workflow, "")
        for field_name in self.workflow_params[workflow]:
            value = data.get(field_name)
            if value not in (None, ""):
                params[field_name.removeprefix(prefix)] = value
        return {
            "format": BUNDLE_FORMAT,
            "name": data["name"],
            "workflow": workflow,
            "params": params,
            "train_script": data["train_script"],
            "train_args": data.get("train_args") or "",
        }

    def service_field(self, field: str | None) -> str | None:
        """The form field a service error's ``field`` belongs beside."""
        if not field:
            return None
        if field.startswith(PARAMS):
            workflow = self.cleaned_data.get("workflow", "")
            return param_field_name(workflow, field.removeprefix(PARAMS))
        return SERVICE_FIELDS.get(field)

    def initial_model_file(self) -> IO[bytes]:
        """The uploaded weights, or those the chosen earlier job started from (its model
        version 0, opened for reading)."""
        upload: UploadedFile[bytes] | None = self.cleaned_data.get("initial_model")
        if upload:
            return upload
        earlier = self.earlier[self.cleaned_data["earlier_model"]]
        version = ModelVersion.objects.get(job=earlier, round_number=0)
        assert version.file.name is not None  # a stored version always has its file
        return version.file.storage.open(version.file.name, "rb")

    def app_archive(self) -> IO[bytes]:
        """The uploaded zip, or the chosen earlier job's stored archive (opened for reading)."""
        upload: UploadedFile[bytes] | None = self.cleaned_data.get("app")
        if upload:
            return upload
        archive = self.earlier[self.cleaned_data["earlier_app"]].app_archive
        assert archive.name is not None  # a submitted job always stored its archive
        return archive.storage.open(archive.name, "rb")


def clone_initial(job: Job) -> dict[str, Any]:
    """A submit form filled in from ``job`` ("clone and edit"): its workflow and parameters,
    script, sites and round timeout, with its app and initial weights reused from storage (the
    view sets ``earlier_app`` to the choice that holds the archive)."""
    name = f"{job.name}-2" if len(job.name) <= 98 else f"{job.name[:98]}-2"
    initial: dict[str, Any] = {
        "name": name,
        "workflow": job.workflow,
        "train_script": job.spec.get("train_script", ""),
        "train_args": job.spec.get("train_args", ""),
        "earlier_model": str(job.uid),
        "sites": list(job.participants.values_list("site__name", flat=True)),
        "round_timeout_seconds": job.round_timeout_seconds,
    }
    for param, value in (job.params or {}).items():
        initial[param_field_name(job.workflow, param)] = field_value(value)
    return initial
