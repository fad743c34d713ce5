"""`.ci/run` runs the suite and then the stack test, always both, and fails when either fails (issue 21)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What .ci/run checks for before it would install Debian packages: stand-ins, so nothing is installed here.
NEEDED = ("redis-server", "ip", "iptables", "promtool", "faketime", "chromium", "chromedriver")


def ci_run(tmp_path: Path, tests_rc: int, stack_rc: int) -> tuple[int, list[str], str]:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    ran = tmp_path / "ran"
    for name, rc in (("test", tests_rc), ("stack-test", stack_rc)):
        script = repo / "scripts" / name
        script.write_text(f"#!/bin/sh\necho {name} >> {ran}\nexit {rc}\n")
        script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in NEEDED:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, ran.read_text().split(), done.stdout + done.stderr


@pytest.mark.parametrize(
    ("tests_rc", "stack_rc", "passes"), [(0, 0, True), (1, 0, False), (0, 1, False), (2, 3, False)]
)
def test_ci_runs_the_suite_then_the_stack_test_and_fails_if_either_fails(tmp_path, tests_rc, stack_rc, passes):
    rc, ran, output = ci_run(tmp_path, tests_rc, stack_rc)
    assert ran == ["test", "stack-test"], output  # the stack test runs after a failed suite too
    assert (rc == 0) == passes, output
    assert f"scripts/test rc={tests_rc}" in output and f"scripts/stack-test rc={stack_rc}" in output
