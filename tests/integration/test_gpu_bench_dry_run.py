"""bench/gpu/run.py's plumbing on the CPU: its own Redis and S3, the direct call, a foreground worker and a
background-warmed one, submissions, and the JSON. The GPU run gets one try; this keeps it from rotting."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_measures_every_phase_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu.json"
    argv = [sys.executable, str(ROOT / "bench" / "gpu" / "run.py"), "--dry-run", "--out", str(out),
            "--workdir", str(tmp_path / "work"), "--eager-batches", "1", "--compile-batches", "2",
            "--jobs", "2", "--reps", "1", "--budget-s", "420"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=570)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(done.stdout[done.stdout.index("{") :])  # the same JSON on stdout
    assert report["mode"] == "dry-run" and report["errors"] == []
    assert report["direct"]["status"] == "ok" and report["direct"]["s_per_image"] > 0
    rows = {row["name"]: row for row in report["kiq"]}
    assert set(rows) == {"eager-b1", "compile-b2"}
    for row in rows.values():
        assert row["single"]["status"] == "ok" and row["queued"]["status"] == "ok", row
        assert row["queued"]["done"] == 2 and row["queued"]["throughput_ratio_vs_direct"] > 0
        assert row["worker_ready_s"] > 0
    assert report["targets"]["best_queued_config"] in rows
    assert "===== worker-compile-b2.log =====" in (tmp_path / "gpu-logs.txt").read_text()
