"""Session-wide pytest hooks. The end of every run names each skipped test and why, so a skip is never quiet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outermost: the banner comes after pytest's own summary
def pytest_terminal_summary(terminalreporter: Any) -> Iterator[None]:
    yield
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("!", f"{len(skipped)} TEST(S) SKIPPED: they did not run", red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        write(f"  {report.nodeid}\n      {reason.removeprefix('Skipped: ')}")
    write("  To run them, give each what its reason names: `bash .ci/run` (as root) installs redis-server, chromium")
    write("  and chromium-driver; scripts/bootstrap installs the test extra (torch, mindspore, mkdocs, selenium).")
    terminalreporter.write_sep("!", "end of skipped tests", red=True, bold=True)
