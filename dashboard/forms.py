"""Dashboard forms. They parse what a person typed; the services check it again and have the
last word (a service's ``ValidationFailed`` is shown beside the field it names)."""

from __future__ import annotations

from typing import Any

from django import forms

from jobs.bundle import MAX_EXPERIMENT_CHARS, MAX_TAG_CHARS, MAX_TAGS
from jobs.models import JobState
from sites.models import SITE_NAME_HELP, Organization

REASON_HELP = "Recorded in the audit log."


class SiteRequestForm(forms.Form):
    organization = forms.ModelChoiceField(
        queryset=Organization.objects.none(),
        empty_label=None,
        help_text="The organisation that runs the site.",
    )
    name = forms.CharField(max_length=63, help_text=SITE_NAME_HELP)
    contact_email = forms.EmailField(help_text="Who the project admin writes to about the site.")
    gpus = forms.IntegerField(required=False, min_value=0, label="GPUs")
    memory_gb = forms.IntegerField(required=False, min_value=0, label="Memory (GB)")

    def __init__(self, *args: Any, organizations: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["organization"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = organizations

    def resources(self) -> dict[str, object]:
        data = self.cleaned_data
        return {k: data[k] for k in ("gpus", "memory_gb") if data.get(k) is not None}


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=1000, widget=forms.Textarea(attrs={"rows": 3}), help_text=REASON_HELP
    )


class AbortForm(forms.Form):
    reason = forms.CharField(
        max_length=1000, required=False, help_text="Optional; recorded as the job's reason."
    )


class JobFilterForm(forms.Form):
    """The project page's jobs filter (a GET form, kept in the URL with the page number)."""

    state = forms.ChoiceField(required=False, choices=[("", "Any state"), *JobState.choices])
    name = forms.CharField(
        required=False, max_length=100, help_text="A part of the job's name, in any case."
    )
    submitter = forms.CharField(
        required=False, max_length=150, label="Submitted by", help_text="A username."
    )
    experiment = forms.CharField(
        required=False, max_length=MAX_EXPERIMENT_CHARS, help_text="Its whole name, in any case."
    )
    tag = forms.CharField(required=False, max_length=MAX_TAG_CHARS, help_text="One tag, exactly.")


class JobLabelsForm(forms.Form):
    """A job's experiment and tags (``jobs.services.labels.job_label`` checks them)."""

    experiment = forms.CharField(
        required=False,
        max_length=MAX_EXPERIMENT_CHARS,
        help_text="Groups the runs to compare, as in MLflow; empty for none.",
    )
    tags = forms.CharField(
        required=False,
        max_length=MAX_TAGS * (MAX_TAG_CHARS + 2),
        help_text=f"Comma-separated; at most {MAX_TAGS}, each at most {MAX_TAG_CHARS} characters.",
    )

    def tag_list(self) -> list[str]:
        return [tag.strip() for tag in self.cleaned_data["tags"].split(",") if tag.strip()]


class ApiTokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. “CI”.")
    expires_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Optional (UTC). Without it the token works until it is revoked.",
    )


class AuditFilterForm(forms.Form):
    project = forms.ChoiceField(required=False)
    actor = forms.CharField(required=False, max_length=150, help_text="A username.")
    action = forms.CharField(
        required=False,
        max_length=64,
        help_text="Exact (site.approved), or a prefix ending in a dot (site.).",
    )
    since = forms.DateTimeField(
        required=False,
        label="From",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="UTC",
    )
    until = forms.DateTimeField(
        required=False,
        label="Until",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="UTC, not included",
    )

    def __init__(self, *args: Any, projects: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["project"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [("", "All my projects"), *((p.slug, p.name) for p in projects)]


class DecisionReasonForm(forms.Form):
    """The optional reason a site admin gives with accepting or declining jobs."""

    reason = forms.CharField(
        max_length=1000,
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Optional. Shown with the decision and recorded in the audit log.",
    )


class SiteSettingsForm(forms.Form):
    auto_accept_jobs = forms.BooleanField(
        required=False,
        label="Accept this project's jobs automatically",
        help_text="On: the site's agent accepts each new job of the project by itself. Off: a "
        "site admin reviews and accepts or declines each job here.",
    )


class BundleUploadForm(forms.Form):
    bundle = forms.FileField(
        label="Job bundle (.zip)",
        help_text="The folder `python job.py --export --export-dir DIR` (recipe.export) wrote, "
        "zipped: its contents or the folder itself, e.g. `python -m zipfile -c job.zip DIR/`. "
        "It holds job.json, initial_model.safetensors and app/.",
    )


class BundleConfirmForm(forms.Form):
    """What a person may still choose when submitting an uploaded bundle."""

    name = forms.RegexField(
        regex=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        max_length=100,
        help_text="From job.json; letters, digits, '.', '_' and '-'.",
        error_messages={"invalid": "Use letters, digits, '.', '_' and '-', starting with one."},
    )
    sites = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every site of the project that is enrolled now.",
    )

    def __init__(self, *args: Any, site_choices: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["sites"]
        assert isinstance(field, forms.MultipleChoiceField)
        field.choices = site_choices
