"""Submitting a job as one uploaded bundle: upload, preview what it holds, then submit.

The upload is checked and staged (``dashboard.bundle_upload``); the preview shows the job's
spec, its initial model's tensors (from the safetensors header only), the app's files and the
sites that will be asked; submitting calls ``job_submit`` as the form does, so the same checks
and the same audit event apply.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.storage import default_storage
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from common.exceptions import DomainError
from dashboard import bundle_upload
from dashboard.forms import BundleConfirmForm, BundleUploadForm
from dashboard.http import SignedInRequest
from dashboard.submission import site_choices
from dashboard.views._common import project_for, require, source_address
from dashboard.views.projects import project_context
from jobs import selectors
from jobs.services.submission import job_submit

ONLY_SUBMITTERS = "Only a project admin or a lead of this project may submit jobs."


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def bundle_upload_view(request: SignedInRequest, slug: str) -> HttpResponse:
    project = project_for(request, slug)
    require(selectors.can_submit_job(request.user, project), ONLY_SUBMITTERS)
    form = BundleUploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            token = bundle_upload.stage(
                form.cleaned_data["bundle"], project_id=project.pk, user_id=request.user.pk
            )
        except DomainError as exc:
            form.add_error("bundle", exc.message)
        else:
            return redirect("dashboard:job-bundle-preview", slug=project.slug, token=token)
    context = project_context(request, project)
    context["form"] = form
    return render(request, "dashboard/bundle_upload.html", context)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def bundle_preview_view(request: SignedInRequest, slug: str, token: str) -> HttpResponse:
    project = project_for(request, slug)
    require(selectors.can_submit_job(request.user, project), ONLY_SUBMITTERS)
    staged = bundle_upload.staged(project_id=project.pk, user_id=request.user.pk, token=token)
    if staged is None:
        raise Http404("No such uploaded bundle: it was submitted, discarded or has expired.")
    if request.method == "POST" and request.POST.get("action") == "discard":
        bundle_upload.discard(project_id=project.pk, user_id=request.user.pk, token=token)
        messages.success(request, "The uploaded bundle was discarded.")
        return redirect("dashboard:job-bundle", slug=project.slug)
    choices = site_choices(project)
    form = BundleConfirmForm(
        request.POST or None,
        site_choices=choices,
        initial={"name": staged.spec.get("name", "")},
    )
    if request.method == "POST" and form.is_valid():
        spec = {**staged.spec, "name": form.cleaned_data["name"]}
        try:
            with (
                default_storage.open(staged.model_name, "rb") as model,
                default_storage.open(staged.app_name, "rb") as app,
            ):
                job = job_submit(
                    project=project,
                    submitted_by=request.user,
                    spec=spec,
                    initial_model=model,
                    app_archive=app,
                    sites=form.cleaned_data.get("sites") or None,
                    source_address=source_address(request),
                )
        except DomainError as exc:
            target = {"spec.name": "name", "sites": "sites"}.get(exc.field or "")
            form.add_error(target, exc.message)
        else:
            bundle_upload.discard(project_id=project.pk, user_id=request.user.pk, token=token)
            messages.success(request, f"Job {job.name} was submitted.")
            return redirect("dashboard:job", uid=job.uid)
    tensors = staged.tensors()
    context = project_context(request, project)
    context.update(
        form=form,
        staged=staged,
        spec=staged.spec,
        tensors=tensors,
        parameter_count=sum(_count(shape) for _, shape, _ in tensors),
        app_files=staged.app_files(),
    )
    return render(request, "dashboard/bundle_preview.html", context)


def _count(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
