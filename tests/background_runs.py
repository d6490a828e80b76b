"""Test subprocesses that run in the background, at idle CPU priority, from the end of collection on.

The Triton-interpreter checks run in fresh interpreter processes (TRITON_INTERPRET must be set before triton is
imported), one per parametrization, each for up to a few CPU-minutes, and need nothing but the CPU: no port, no
Redis, no shared folder. A module declares them at its top level:

    RUNS = BackgroundRuns("family", lambda family: [sys.executable, SCRIPT, family], env={"TRITON_INTERPRET": "1"},
                          cwd=ROOT, timeout_s=540, needs="triton")

    @pytest.mark.parametrize("family", [...])
    def test_family(family):
        r = RUNS.result(family)   # waits for this family's process: a subprocess.CompletedProcess (text output)
        assert r.returncode == 0, failure(family, r)

and conftest.py's hooks (`start_selected`, `move_to_end`, `stop_all`) start, when collection ends, one process for
each parametrization the session will run (after -m / -k deselection, so `make test-slow` starts only its slow
ones), all at once, and move those tests to the end of the session. The processes are SCHED_IDLE: they get only
the CPU time that the other tests leave idle (on the 2-core CI box about half of it, while a test waits on its
served stack), so the rest of the suite runs as fast as without them; by the time their tests come most have
finished. Each gets OMP_NUM_THREADS = its share of the cores beside the main test process, at least 1.

A test waits for its process at most `timeout_s` (from the moment it asks); one still running then is killed and
the test fails naming it, with the output it had written. Output goes to files, so no pipe fills up.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest


def failure(name: str, r: subprocess.CompletedProcess, what: str = "") -> str:
    """An assertion message naming the run, with the tails of its output."""
    return (f"{name}: {what or f'exit status {r.returncode}'}\n"
            f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")


def _idle_priority() -> None:  # in the child, before exec
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


@dataclass
class _Run:
    argv: list[str]
    proc: subprocess.Popen
    out: Path
    err: Path


class BackgroundRuns:
    """One background process per selected value of the test parameter `argname` (see the module docstring)."""

    def __init__(self, argname: str, argv: Callable[[object], list[str]], *, env: dict[str, str], cwd: Path,
                 timeout_s: float, needs: str | None = None):
        self.argname, self.argv, self.env, self.cwd = argname, argv, env, cwd
        self.timeout_s, self.needs = timeout_s, needs
        self._runs: dict[object, _Run] = {}
        self._log_dir: Path | None = None

    def _missing(self) -> bool:
        return self.needs is not None and importlib.util.find_spec(self.needs) is None

    def start(self, values: list, threads: int) -> None:
        if self._missing():
            return
        self._log_dir = Path(tempfile.mkdtemp(prefix="mmpipe-background-"))
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(threads)}
        for value in values:
            out, err = self._log_dir / f"{value}.stdout", self._log_dir / f"{value}.stderr"
            with open(out, "wb") as o, open(err, "wb") as e:
                proc = subprocess.Popen(self.argv(value), stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env,
                                        cwd=self.cwd, preexec_fn=_idle_priority)
            self._runs[value] = _Run(self.argv(value), proc, out, err)

    def result(self, value) -> subprocess.CompletedProcess:
        if self._missing():
            pytest.skip(f"{self.needs} is not importable")
        run = self._runs[value]
        timed_out = False
        try:
            run.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
            timed_out = True
        r = subprocess.CompletedProcess(run.argv, run.proc.returncode, run.out.read_text(errors="replace"),
                                        run.err.read_text(errors="replace"))
        if timed_out:
            pytest.fail(failure(value, r, f"still running after {self.timeout_s:.0f} s, killed"))
        return r

    def stop(self) -> None:
        for run in self._runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)


def _runs_of(item: pytest.Item) -> BackgroundRuns | None:
    """The module's BackgroundRuns when `item` is one of its parametrizations."""
    module = getattr(item, "module", None)
    runs = next((v for v in vars(module).values() if isinstance(v, BackgroundRuns)), None) if module else None
    params = getattr(getattr(item, "callspec", None), "params", {})
    return runs if runs is not None and runs.argname in params else None


def move_to_end(items: list[pytest.Item]) -> None:
    """Reorder `items` in place: the tests with background processes last (each module's order kept)."""
    items.sort(key=lambda item: _runs_of(item) is not None)


def start_selected(items: list[pytest.Item]) -> list[BackgroundRuns]:
    """Start the background processes of the selected `items`; returns the BackgroundRuns started."""
    selected: dict[BackgroundRuns, list] = {}
    for item in items:
        runs = _runs_of(item)
        if runs is not None:
            value = item.callspec.params[runs.argname]
            if value not in selected.setdefault(runs, []):
                selected[runs].append(value)
    total = sum(len(v) for v in selected.values())
    threads = max(1, ((os.cpu_count() or 1) - 1) // max(1, total))
    for runs, values in selected.items():
        runs.start(values, threads)
    return list(selected)


def stop_all(started: list[BackgroundRuns]) -> None:
    for runs in started:
        runs.stop()
