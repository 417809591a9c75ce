"""The processes one PocEnv started: each in its own process group, logging to its own file.

The supervisor starts them, ends exactly them (``stop`` signals each one's group, so a
process's children go too), and, while watching, starts a watched process that exited on its
own again, as a service manager does in a deployment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

# What the processes PocEnv starts create is their owner's only: files 0600, folders 0700.
PRIVATE_UMASK = 0o077


class Supervisor:
    """Start, watch and stop named processes.

    ``environ`` is called at every start, so a process started again gets the environment as
    it is then. Output goes to ``<logs>/<log name>.log`` (0600: it holds what the processes
    print, tokens included).
    """

    def __init__(
        self,
        *,
        cwd: Path,
        logs: Path,
        environ: Callable[[], dict[str, str]],
        say: Callable[[str], None],
    ) -> None:
        self.cwd = cwd
        self.logs = logs
        self.environ = environ
        self.say = say
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # Processes ended on purpose (kill, stop): the watcher leaves those alone.
        self._stopped_on_purpose: set[str] = set()
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()

    def spawn(
        self, name: str, args: list[str], log_name: str | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.logs / f"{log_name or name}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "ab") as log_file:
            proc = subprocess.Popen(
                args,
                cwd=self.cwd,
                env=self.environ(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends it and its children
                umask=PRIVATE_UMASK,
            )
        self.processes[name] = proc
        return proc

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start ``name`` again with the command it was first started with."""
        self._stopped_on_purpose.discard(name)
        old = self.processes.pop(name)
        args = old.args if isinstance(old.args, list) else [str(old.args)]
        return self.spawn(name, [str(a) for a in args])

    def forget_stopped(self, name: str) -> None:
        """``name`` is started again by its owner: the watcher may restart it from now on."""
        self._stopped_on_purpose.discard(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to ``name``'s process group and wait for it; the watcher leaves it."""
        proc = self.processes[name]
        self._stopped_on_purpose.add(name)
        with contextlib.suppress(ProcessLookupError):  # gone already: fine
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def watch(self, names: Collection[str], restart: Callable[[str], object]) -> None:
        """From now until ``stop``, call ``restart(name)`` when one of ``names`` exits on its
        own (not through ``kill`` or ``stop``)."""
        self._stopping.clear()
        self._watcher = threading.Thread(
            target=self._watch, args=(frozenset(names), restart), daemon=True, name="poc"
        )
        self._watcher.start()

    def _watch(self, names: frozenset[str], restart: Callable[[str], object]) -> None:
        while not self._stopping.wait(0.5):
            for name in [n for n in self.processes if n in names]:
                proc = self.processes.get(name)
                if proc is None or proc.poll() is None or name in self._stopped_on_purpose:
                    continue
                self.say(f"the {name} exited (code {proc.returncode}); starting it again")
                with contextlib.suppress(OSError, ValueError):
                    restart(name)

    def stop(self, grace: float = 10.0) -> None:
        """End every process: agents first, then the others. SIGTERM to each process group,
        and SIGKILL to those still there after ``grace`` seconds."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        self._watcher = None
        order = sorted(self.processes, key=lambda n: (not n.startswith("agent:"), n))
        for name in order:
            proc = self.processes[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in order:
            proc = self.processes[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
