"""Summaries of monitor-only runs and the sample → tick-record conversion."""

from __future__ import annotations

import pytest

from adaptive_nb.monitor.report import gpu_label, snapshot_record, summarize
from adaptive_nb.monitor.snapshot import GpuProcess, GpuSample, HostSample, Snapshot


def host(cpu: float, ram_used: float, proc_cpu: float = 50.0, rss: float = 500.0) -> HostSample:
    return HostSample(cpu, (cpu, cpu), ram_used, 16000.0 - ram_used, 16000.0, proc_cpu, rss, 2.0)


def gpu(util: float, used: float, own: float, index: int | None = 0) -> GpuSample:
    return GpuSample(
        index=index,
        nvml_index=3,
        uuid="GPU-abc",
        name="A100",
        util_pct=util,
        mem_used_mb=used,
        mem_free_mb=40000.0 - used,
        mem_total_mb=40000.0,
        processes=(GpuProcess(1, own, True), GpuProcess(2, used - own, False)),
    )


def snaps() -> list[Snapshot]:
    return [
        Snapshot(10.0, host(20.0, 4000.0, 40.0, 400.0), (gpu(10.0, 1000.0, 500.0),)),
        Snapshot(11.0, host(80.0, 6000.0, 160.0, 900.0), (gpu(90.0, 9000.0, 8000.0),)),
        Snapshot(12.0, host(50.0, 5000.0, 100.0, 700.0), (gpu(50.0, 5000.0, 4000.0),)),
    ]


def test_summarize_peaks_and_means() -> None:
    r = summarize(snaps())
    assert r.duration_s == 2.0 and r.samples == 3
    assert r.cpu is not None
    assert (r.cpu.util_peak_pct, r.cpu.util_mean_pct) == (80.0, 50.0)
    assert (r.cpu.mem_peak_mb, r.cpu.mem_mean_mb) == (6000.0, 5000.0)
    assert r.cpu.self_mem_peak_mb == 900.0
    assert (r.process_cpu_peak_pct, r.process_cpu_mean_pct) == (160.0, 100.0)
    (g,) = r.gpus
    assert g.name == "GPU 0 (A100)"
    assert (g.util_peak_pct, g.util_mean_pct) == (90.0, 50.0)
    assert (g.mem_peak_mb, g.mem_mean_mb, g.mem_total_mb) == (9000.0, 5000.0, 40000.0)
    assert g.self_mem_peak_mb == 8000.0


def test_summary_text_and_html() -> None:
    r = summarize(snaps(), duration_s=2.5, notice=None)
    text = str(r)
    assert text.startswith("Monitored 2.5 s (3 samples)")
    assert "GPU 0 (A100): utilisation peak 90%, mean 50%" in text
    assert "peak 8.79 GiB" in text
    assert repr(r) == text
    assert "<table>" in r._repr_html_() and "GPU 0 (A100)" in r._repr_html_()


def test_empty_and_cpu_only() -> None:
    r = summarize([], duration_s=1.0, notice="No NVIDIA GPU driver found")
    assert r.samples == 0 and r.cpu is None and r.gpus == []
    assert "No NVIDIA GPU driver found" in str(r)
    only_cpu = summarize([Snapshot(0.0, host(30.0, 1000.0))])
    assert only_cpu.gpus == [] and only_cpu.duration_s == 0.0


def test_simulated_gpus_are_labelled() -> None:
    sim = GpuSample(0, 0, "u", "A100", 10.0, 100.0, 900.0, 1000.0, simulated=True)
    r = summarize([Snapshot(0.0, host(1.0, 1.0), (sim,))])
    assert "(simulated)" in str(r)


def test_snapshot_record_for_the_live_plots() -> None:
    rec = snapshot_record(snaps()[1], t0=10.0)
    assert rec.t == 1.0
    assert rec.devices == ["CPU", "GPU 0 (A100)"]
    assert rec.util_pct == {"CPU": 80.0, "GPU 0 (A100)": 90.0}
    assert rec.mem_used_mb == {"CPU": 900.0, "GPU 0 (A100)": 8000.0}
    assert rec.mem_other_mb == pytest.approx({"CPU": 5100.0, "GPU 0 (A100)": 1000.0})
    assert rec.mem_total_mb == {"CPU": 16000.0, "GPU 0 (A100)": 40000.0}
    assert rec.shares == {}


def test_gpu_label_without_torch_index() -> None:
    assert gpu_label(gpu(1.0, 10.0, 5.0, index=None)) == "GPU nvml:3 (A100)"
