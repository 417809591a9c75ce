"""Client scripts forked from the fork server behave as ``python script.py args`` would."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from client_agent.forkserver import get_server, third_party_imports

ROOT = Path(__file__).resolve().parents[2]


def test_third_party_imports_follow_the_scripts_own_modules(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("import json\nfrom xml.dom import minidom\n")
    (tmp_path / "script.py").write_text(
        "import os\nimport helpers\nfrom helpers import thing\n\ndef f():\n    import csv\n"
    )

    assert third_party_imports(tmp_path / "script.py") == ["os", "json", "xml.dom"]


def test_a_forked_script_runs_as_main_with_its_args_cwd_env_and_log(tmp_path: Path) -> None:
    script = tmp_path / "app" / "show.py"
    script.parent.mkdir()
    (script.parent / "sibling.py").write_text("VALUE = 'imported from the script folder'\n")
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import sibling
            print(__name__, sys.argv[1:], os.getcwd(), os.environ["SHOW_ME"], sibling.VALUE)
            print("to stderr", file=sys.stderr)
            sys.exit(3)
            """
        )
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    log = tmp_path / "log.txt"

    child = get_server().spawn(
        script=script,
        args=["--a", "b c"],
        workdir=workdir,
        log=log,
        env={"SHOW_ME": "yes", "PATH": "/usr/bin"},
    )

    assert child.wait(timeout=30) == 3
    text = log.read_text()
    assert f"__main__ ['--a', 'b c'] {workdir} yes imported from the script folder" in text
    assert "to stderr" in text


def test_a_forked_script_finds_what_the_server_loaded_set_aside_from_the_collector(
    tmp_path: Path,
) -> None:
    # torch and the rest, loaded once by the server: a script's full collections skip them.
    script = tmp_path / "count.py"
    script.write_text("import gc\nprint('frozen', gc.get_freeze_count())\n")
    log = tmp_path / "log.txt"

    child = get_server().spawn(
        script=script, args=[], workdir=tmp_path, log=log, env={"PATH": "/usr/bin"}
    )

    assert child.wait(timeout=30) == 0
    frozen = int(log.read_text().split("frozen ")[1].split()[0])
    assert frozen > 50_000, frozen


def test_an_uncaught_exception_exits_1_with_its_traceback_in_the_log(tmp_path: Path) -> None:
    script = tmp_path / "boom.py"
    script.write_text("raise ValueError('the data volume is gone')\n")
    log = tmp_path / "log.txt"

    child = get_server().spawn(script=script, args=[], workdir=tmp_path, log=log, env={})

    assert child.wait(timeout=30) == 1
    assert "ValueError: the data volume is gone" in log.read_text()


def test_a_job_script_without_a_main_guard_runs(tmp_path: Path) -> None:
    """The sites must not re-import the job's __main__ (multiprocessing's forkserver does)."""
    (tmp_path / "client.py").write_text(
        textwrap.dedent(
            """
            import client_agent.api as flare
            flare.init()
            while flare.is_running():
                flare.send(flare.FLModel(params=flare.receive().params))
            """
        )
    )
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            """
            import torch
            from jobs.envs import SimEnv
            from jobs.recipes import FedAvgRecipe
            recipe = FedAvgRecipe(name="unguarded", min_clients=2, num_rounds=2,
                                  model={"w": torch.ones(3)}, train_script="client.py")
            run = recipe.execute(SimEnv(num_clients=2, workspace="runs", show_progress=False))
            print("STATUS", run.status.value, run.error)
            """
        )
    )

    out = subprocess.run(
        [sys.executable, "job.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )

    assert "STATUS COMPLETED None" in out.stdout, out.stdout + out.stderr


def test_a_shared_server_serves_several_parents_and_tells_each_its_own_exits(
    tmp_path: Path,
) -> None:
    import os
    import tempfile
    import time

    from client_agent.forkserver import ForkServer

    sock_dir = tempfile.mkdtemp(prefix="fs-test-")
    address = os.path.join(sock_dir, "fs.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "client_agent.forkserver", "--listen", address],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(address):
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert os.stat(address).st_mode & 0o777 == 0o600  # only this user may ask for forks
        script = tmp_path / "code.py"
        script.write_text("import sys; print(sys.argv[1]); sys.exit(int(sys.argv[1]))\n")
        first, second = ForkServer(address), ForkServer(address)
        a = first.spawn(script=script, args=["4"], workdir=tmp_path, log=tmp_path / "a", env={})
        b = second.spawn(script=script, args=["5"], workdir=tmp_path, log=tmp_path / "b", env={})

        assert a.wait(timeout=60) == 4
        assert b.wait(timeout=60) == 5
        # Each parent hears only of its own children.
        assert second.exit_code(a.pid) is None and first.exit_code(b.pid) is None
        assert (tmp_path / "a").read_text().strip() == "4"
    finally:
        server.terminate()
        server.wait(timeout=10)
