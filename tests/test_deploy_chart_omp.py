"""The chart's OMP_NUM_THREADS (issue 15): set where `mmpipe serve` sets it (`_child_env`: the gateway, ingest and
every stage on a GPU), never on CPU encoder / generator pods, off with `ompNumThreads: 0`, and a component's own
extraEnv value wins. Renderings are validated with kubernetes-validate (strict, 1.30) as in test_deploy_chart.py.
"""
from __future__ import annotations

from typing import Any

import pytest
import yaml

from test_deploy_chart import (CHART, K8S_VERSION, NAMESPACE, RELEASE, RENDERINGS, container, deployments, env_of,
                               helm, kv_utils, objects)


def _render(values: dict[str, Any]) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            kv_utils.validate(obj, K8S_VERSION, strict=True)
    return objs


def _omp(objs: list[dict]) -> dict[str, str | None]:
    """component -> its OMP_NUM_THREADS value (None: not set); every name at most once per container."""
    out = {}
    for comp, dep in deployments(objs).items():
        names = [e["name"] for e in container(dep).get("env", [])]
        assert names.count("OMP_NUM_THREADS") <= 1, (comp, names)
        out[comp] = env_of(container(dep)).get("OMP_NUM_THREADS", {}).get("value")
    return out


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_one_openmp_thread_where_mmpipe_serve_sets_it(rendering: str) -> None:
    gpu_pods = RENDERINGS[rendering]
    omp = _omp(objects(rendering))
    for comp, value in omp.items():
        want = "1" if comp in ("gateway", "ingest") or comp in gpu_pods else None
        assert value == want, (rendering, comp, value)


def test_omp_num_threads_value_and_off() -> None:
    assert set(_omp(_render({"ompNumThreads": 4})).values()) == {"4"}  # default rendering: both stages on GPUs
    assert set(_omp(_render({"ompNumThreads": 0})).values()) == {None}


def test_a_components_own_extra_env_wins() -> None:
    objs = _render({"generator": {"extraEnv": [{"name": "OMP_NUM_THREADS", "value": "8"}]},
                    "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}]})
    omp = _omp(objs)
    assert omp["generator"] == "8" and omp["encoder"] == omp["gateway"] == omp["ingest"] == "1"


def test_schema_refuses_a_negative_or_non_integer_value() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for bad in (-1, "one", 1.5):
            with pytest.raises(helm.HelmValuesError):
                chart.render({"ompNumThreads": bad}, name=RELEASE, namespace=NAMESPACE)
