"""Host sampler: cgroup v1/v2 limits from fake files, usable cores, RAM caps, live sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adaptive_nb.monitor.host import (
    CgroupLimits,
    HostSampler,
    read_cgroup_limits,
    usable_cores,
)

GiB = 1024**3


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def no_proc(tmp_path: Path) -> Path:
    """A /proc/self/cgroup stand-in that names the root cgroup."""
    p = tmp_path / "proc_cgroup"
    p.write_text("0::/\n")
    return p


def test_v2_limits(tmp_path: Path, no_proc: Path) -> None:
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "memory.max", str(4 * GiB))
    write(root / "cpu.max", "150000 100000")
    write(root / "memory.current", str(1 * GiB))
    lim = read_cgroup_limits(root, no_proc)
    assert lim.version == 2
    assert lim.memory_limit_bytes == 4 * GiB
    assert lim.memory_limit_mb == 4096.0
    assert lim.cpu_quota_cores == pytest.approx(1.5)
    assert lim.memory_usage_file == root / "memory.current"


def test_v2_unlimited(tmp_path: Path, no_proc: Path) -> None:
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "memory.max", "max")
    write(root / "cpu.max", "max 100000")
    lim = read_cgroup_limits(root, no_proc)
    assert lim == CgroupLimits(2, None, None, None)


def test_v2_nested_own_cgroup_takes_tightest_limit(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "memory.max", str(8 * GiB))
    write(root / "cpu.max", "max 100000")
    write(root / "user.slice" / "job" / "memory.max", str(2 * GiB))
    write(root / "user.slice" / "cpu.max", "50000 100000")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/user.slice/job\n")
    lim = read_cgroup_limits(root, proc)
    assert lim.memory_limit_bytes == 2 * GiB
    assert lim.cpu_quota_cores == pytest.approx(0.5)


def test_v1_limits(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "memory" / "memory.limit_in_bytes", str(3 * GiB))
    write(root / "memory" / "memory.usage_in_bytes", str(GiB))
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/\n2:cpu,cpuacct:/\n")
    lim = read_cgroup_limits(root, proc)
    assert lim.version == 1
    assert lim.memory_limit_bytes == 3 * GiB
    assert lim.cpu_quota_cores == pytest.approx(2.0)
    assert lim.memory_usage_file == root / "memory" / "memory.usage_in_bytes"


def test_v1_unlimited_values(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712")
    write(root / "cpu" / "cpu.cfs_quota_us", "-1")
    write(root / "cpu" / "cpu.cfs_period_us", "100000")
    lim = read_cgroup_limits(root, tmp_path / "missing")
    assert lim.version == 1
    assert lim.memory_limit_bytes is None
    assert lim.cpu_quota_cores is None


def test_missing_or_garbage_files_mean_no_limit(tmp_path: Path) -> None:
    assert read_cgroup_limits(tmp_path / "nothing", tmp_path / "x") == CgroupLimits(
        None, None, None
    )
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "")
    write(root / "memory.max", "lots")
    write(root / "cpu.max", "x y")
    lim = read_cgroup_limits(root, tmp_path / "x")
    assert (lim.memory_limit_bytes, lim.cpu_quota_cores) == (None, None)


def test_usable_cores_is_the_tightest_bound() -> None:
    none = CgroupLimits(None, None, None)
    assert usable_cores(none, affinity=None, logical=8) == 8.0
    assert usable_cores(none, affinity=3, logical=8) == 3.0
    assert usable_cores(CgroupLimits(2, None, 1.5), affinity=3, logical=8) == 1.5
    assert usable_cores(CgroupLimits(2, None, 16.0), affinity=4, logical=8) == 4.0


def test_sampler_respects_cgroup_memory_and_cpu(tmp_path: Path, no_proc: Path) -> None:
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "memory.max", str(256 * 1024 * 1024))  # 256 MB, below any real machine
    write(root / "memory.current", str(100 * 1024 * 1024))
    write(root / "cpu.max", "50000 100000")
    s = HostSampler(cgroup_root=root, proc_cgroup=no_proc).sample()
    assert s.ram_total_mb == 256.0
    assert s.ram_used_mb == 100.0
    assert s.ram_available_mb <= 156.0
    assert s.cpu_cores == 0.5


def test_live_sample_is_sane() -> None:
    sampler = HostSampler()
    # burn a little CPU so the process reading is above zero
    x = 0
    for k in range(300_000):
        x += k * k
    s = sampler.sample()
    assert 0.0 <= s.cpu_pct <= 100.0
    assert len(s.per_core_pct) == os.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in s.per_core_pct)
    assert 0 < s.ram_used_mb < s.ram_total_mb
    assert 0 < s.ram_available_mb <= s.ram_total_mb
    assert s.proc_rss_mb > 10.0
    assert s.proc_cpu_pct > 0.0
    assert 0 < s.cpu_cores <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert s.cpu_cores <= len(os.sched_getaffinity(0))
