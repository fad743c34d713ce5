"""The docs site builds with every link and anchor checked, and its generated parts match the code."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from kiq.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_PAGE = ROOT / "docs" / "operations" / "settings.md"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_strict_passes(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("MKDOCS NOT INSTALLED: the docs site was not built (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert (site / "index.html").is_file() and (site / "api" / "reference" / "index.html").is_file()


def test_the_committed_openapi_files_match_what_the_app_serves():
    pytest.importorskip("fastapi")
    gen = load_generator()
    schema = gen.served_schema()
    assert (ROOT / "docs" / "api" / "openapi.json").read_text(encoding="utf-8") == gen.schema_text(schema), (
        "docs/api/openapi.json is stale: run .venv/bin/python scripts/gen_api_docs.py"
    )
    assert (ROOT / "docs" / "api" / "reference.md").read_text(encoding="utf-8") == gen.render(schema), (
        "docs/api/reference.md is stale: run .venv/bin/python scripts/gen_api_docs.py"
    )


def settings_rows() -> dict[str, str]:
    """Each variable named in the settings table, with its default cell's literal (None when descriptive)."""
    rows = {}
    for line in SETTINGS_PAGE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `KIQ_") or len(cells) < 3:
            continue
        names = re.findall(r"`(KIQ_[A-Z0-9_]+)`", cells[0])
        defaults = [d.strip() for d in cells[-1].split(" / ")]
        for n, name in enumerate(names):
            literal = re.fullmatch(r"`([^`]*)`(?: \(.*\))?", defaults[n]) if len(defaults) == len(names) else None
            rows[name] = literal.group(1) if literal else None
    return rows


def same(documented: str, default: object) -> bool:
    if isinstance(default, bool):
        return documented == ("1" if default else "0")
    if isinstance(default, int | float):
        try:
            return float(documented) == float(default)
        except ValueError:
            return False
    return documented == default


def test_the_settings_table_has_a_row_and_the_default_of_every_setting():
    rows = settings_rows()
    expected = {PREFIX + f.name.upper(): f for f in fields(Settings)}
    assert sorted(set(expected) - set(rows)) == [], "settings without a row in docs/operations/settings.md"
    assert sorted(set(rows) - set(expected)) == [], "rows in docs/operations/settings.md for settings that do not exist"
    wrong = {}
    for name, documented in rows.items():
        default = expected[name].default
        if documented is not None and not documented.startswith(("KIQ_", "<")) and default is not MISSING:
            if not same(documented, default):
                wrong[name] = (documented, default)
    assert wrong == {}, "documented default != Settings default"
    assert sum(d is not None for d in rows.values()) >= 40  # the check above really compared most rows


def test_nothing_in_the_repository_points_outside_it():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    needle = "/".join(["..", "shared"])  # built, so that this file does not match itself
    found = subprocess.run(["git", "grep", "-n", "-F", needle], cwd=ROOT, capture_output=True, text=True).stdout
    assert found == ""


def test_every_test_file_the_repository_cites_exists():
    """A moved or renamed test leaves no stale citation behind in code, docs or other tests."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    tests = {Path(f).name for f in files if f.startswith("tests/")} | {f for f in files if f.startswith("tests/")}
    cited = subprocess.run(["git", "grep", "-h", "-o", "-I", "-E", r"(tests/[a-z_/]*)?\btest_[a-z0-9_]+\.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.split()  # fmt: skip
    assert len(cited) > 20  # the grep found the citations there are
    assert sorted({c for c in cited if c not in tests}) == []


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
    assert "./scripts/test" in readme and "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_openapi_reference_names_every_path():
    pytest.importorskip("fastapi")
    schema = json.loads((ROOT / "docs" / "api" / "openapi.json").read_text(encoding="utf-8"))
    page = (ROOT / "docs" / "api" / "reference.md").read_text(encoding="utf-8")
    assert all(f"`{path}`" in page for path in schema["paths"])
