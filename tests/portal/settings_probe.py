"""What a portal process started with a given environment makes of its settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def portal_settings(expression: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Print ``json.dumps(expression)`` (``s`` is ``django.conf.settings``) in a fresh process
    with only ``env`` (development mode, the portal's settings module, a ``PATH``) set."""
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({expression}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={
            "PATH": "/usr/bin:/bin",
            "DJANGO_SETTINGS_MODULE": "fedportal.settings.base",
            "FEDPORTAL_DEV": "1",
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
