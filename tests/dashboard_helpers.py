"""Builders for the dashboard's pure views, shared by their unit tests."""

from __future__ import annotations

from neuro_dask.dashboard import views


def worker(name: str, **kw) -> views.WorkerView:
    """A serving, routable worker named `name`; `kw` overrides any field."""
    base = dict(
        address=f"tcp://{name}:1",
        name=name,
        owner="",
        status="serving",
        cores=4,
        memory=8 * views.GiB,
        budget=4 * views.GiB,
        gpus=0,
        vram=0,
        speed=10.0,
        score=0.5,
        correctness=0.5,
        timeliness=0.5,
        speed_score=0.5,
        uptime=0.5,
        trusted=False,
        established=False,
        routable=True,
        stake=0,
        hosted=2,
        assigned=2,
        calls_served=0,
    )
    return views.WorkerView(**{**base, **kw})
