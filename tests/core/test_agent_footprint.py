"""A site agent that rewrites nothing (no clipping, noise or excluded tensors) runs without
torch: its process is about 130 MB smaller, and a host runs many more of them (PocEnv's
hundred-agent benches ran out of memory at 150 before)."""

from __future__ import annotations

import subprocess
import sys


def test_the_agent_starts_without_importing_torch() -> None:
    code = (
        "import sys, client_agent.agent, client_agent.cli, client_agent.privacy.release; "
        "print(sorted(m for m in ('torch', 'django') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
