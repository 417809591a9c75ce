"""Template helpers: form fields tied to their help and error text for screen readers, and
small formatting."""

from __future__ import annotations

from typing import Any

from django import forms, template
from django.utils.safestring import SafeString

from common.rounds import round_for_people

register = template.Library()


@register.filter
def described(field: forms.BoundField) -> SafeString:
    """The field's widget with ``aria-describedby`` naming its error and help paragraphs, and
    ``aria-invalid`` when it has an error (see ``dashboard/_field.html``)."""
    ids = []
    attrs: dict[str, Any] = {}
    if field.errors:
        ids.append(f"{field.auto_id}-error")
        attrs["aria-invalid"] = "true"
    if field.help_text:
        ids.append(f"{field.auto_id}-help")
    if ids:
        attrs["aria-describedby"] = " ".join(ids)
    return field.as_widget(attrs=attrs)


@register.filter
def is_checkbox(field: forms.BoundField) -> bool:
    return isinstance(field.field.widget, forms.CheckboxInput)


@register.filter
def is_multi_checkbox(field: forms.BoundField) -> bool:
    return isinstance(field.field.widget, forms.CheckboxSelectMultiple)


@register.filter
def get(mapping: Any, key: str) -> Any:
    try:
        return mapping.get(key)
    except AttributeError:
        return None


@register.filter
def filesize(size: int | None) -> str:
    if size is None:
        return "—"
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


@register.filter
def round_label(number: int | None) -> str:
    """A round as people count it (``common.rounds``)."""
    return "—" if number is None else f"{round_for_people(number)}"
