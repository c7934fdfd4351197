"""The Ray Train engine on a local Ray (2 CPU workers, gloo): uneven shares give the
single-process full-batch result, a plan reaches every worker at the step it names, each
worker reports its device, the local Ray listens on loopback only with token
authentication on, and the workers are gone after the run."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import psutil
import pytest
from ray_support import job, local_ray, max_diff, pids_alive, ray, reference, step

from adaptive_nb.engine.ray_train import RayConnection, RayEngine
from adaptive_nb.layout import Plan

pytestmark = pytest.mark.timeout(240)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayConnection]:
    yield from local_ray()


def test_local_ray_listens_on_loopback_with_token_auth(cluster: RayConnection) -> None:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert cluster.started_here
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    nodes = ray.nodes()
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    listening = []
    for proc in psutil.Process().children(recursive=True):
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening, "no Ray process found listening"
    not_loopback = [ip for ip in listening if not _loopback(ip)]
    assert not_loopback == [], not_loopback


def test_uneven_shares_match_full_batch_and_plans_switch_at_the_named_step(
    cluster: RayConnection,
) -> None:
    model, opt, data = job(6)
    engine = RayEngine(step, model=model, optimizer=opt, data=data, min_workers=2, max_workers=2)
    try:
        engine.start()
        names = engine.device_names()
        assert len(names) == 2 and all("cpu" in n for n in names)
        engine.apply_plan(Plan((0, 1), (0.3, 0.7), 1, 0))
        for token in engine.iter_batches(data, 1):
            if token.step == 1:  # sent at step 1, for step 4 on
                engine.apply_plan(Plan((0, 1), (0.8, 0.2), 1, 0), from_step=4)
            outcome = engine.forward_backward(None, token)
            engine.optimizer_step()
            want = (3, 7) if token.step < 4 else (8, 2)
            assert outcome.device_batch == {0: want[0], 1: want[1]}
        log = engine.rank_log()
        pids = [info["pid"] for info in engine.group.infos.values()]
    finally:
        engine.close()
    assert log[0] == [(s, 3 if s < 4 else 8) for s in range(6)]
    assert log[1] == [(s, 7 if s < 4 else 2) for s in range(6)]
    assert max_diff(model, reference(6)) < 1e-6
    assert engine.applied == 6
    assert pids_alive(pids, 30.0) == []  # the workers ended with the run


def test_elastic_group_below_its_maximum_gives_absent_workers_no_share(
    cluster: RayConnection,
) -> None:
    """``workers="1:3"`` on a Ray with 2 CPUs: Ray Train's elastic policy starts the 2
    workers it has room for; the third position is excluded in the planner and the run
    gives the full-batch result."""
    import adaptive_nb

    model, opt, data = job(4)
    report = adaptive_nb.train(  # "weights": every available worker gets a share
        step, model=model, optimizer=opt, data=data, engine="ray", workers="1:3", policy="weights"
    )
    summary = report.summary
    assert summary["ended"] == "completed" and summary["steps"] == 4
    assert summary["devices_left_out"] == ["ray worker 2"]
    assert any(
        "Ray Train workers: 0: cpu on" in e.detail and "2:" not in e.detail for e in report.events
    )
    assert max_diff(model, reference(4)) < 1e-6
