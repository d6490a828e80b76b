"""services/common/event_loop.py: which loop a service process runs on, and MMPIPE_EVENT_LOOP's checks."""
from __future__ import annotations

import asyncio

import pytest

from mmpipe.services.common import event_loop
from mmpipe.services.common.cli_args import EnvValueError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_installed(monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv("MMPIPE_EVENT_LOOP", raising=False)
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_forced(monkeypatch):
    monkeypatch.setenv("MMPIPE_EVENT_LOOP", "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MMPIPE_EVENT_LOOP", "tokio")
    coro = _loop_module()
    with pytest.raises(EnvValueError, match="MMPIPE_EVENT_LOOP='tokio' is not one of auto, uvloop, asyncio"):
        event_loop.run(coro)
    coro.close()


def test_uvloop_required_but_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_uvloop(name, *a, **kw):
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *a, **kw)

    monkeypatch.setenv("MMPIPE_EVENT_LOOP", "uvloop")
    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with pytest.raises(RuntimeError, match="pip install uvloop"):
        event_loop.run(_loop_module())
