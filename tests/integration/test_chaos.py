"""The nemesis campaign, short and seeded (scripts/chaos): kiq on eleven network-namespace hosts under about
two minutes of random faults, then the checker over the whole history must find no violation.

Needs root, `ip netns` and iptables (.ci/run installs iproute2 and iptables); otherwise it skips
and says why. The long campaign is the same command with more minutes: `scripts/chaos --seed N --minutes 30`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SEED = 20261206
ROOT = Path(__file__).resolve().parents[2]


def missing() -> str:
    if os.geteuid() != 0:
        return "the chaos campaign needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "redis-server"):
        if shutil.which(tool) is None:
            return f"the chaos campaign needs {tool} (see .ci/run)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return ""


@pytest.mark.timeout(330)
def test_short_seeded_campaign_finds_no_violation(tmp_path):
    reason = missing()
    if reason:
        print(f"\n!!! SKIPPING THE CHAOS CAMPAIGN: {reason} !!!", file=sys.stderr)
        pytest.skip(reason)
    options = {"--seed": SEED, "--minutes": 2, "--jobs-per-minute": 24, "--max-open": 12, "--drain-s": 75,
               "--webhook-wait-s": 15, "--out": tmp_path / "run"}  # fmt: skip
    argv = [sys.executable, "-m", "tests.chaos", *(str(part) for item in options.items() for part in item)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the campaign removes its namespaces, rules and processes before it exits
        out, err = proc.communicate(timeout=25)
    print(out[-6000:], err[-6000:], sep="\n")
    assert proc.returncode == 0, f"the checker found violations (seed {SEED}):\n{err[-4000:]}"
    assert "checker: no violation" in out
