import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest

import kiq
from kiq import errors, version
from kiq.settings import Settings
from producer import cli
from worker.fleet import Heartbeat

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_kiq_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kiq {kiq.__version__}"


def test_a_checkout_that_is_not_installed_reads_pyproject(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version._version() == PYPROJECT


def test_the_installed_version_is_pyprojects():
    dist = importlib.metadata.distribution("kiq")
    origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if origin and Path(origin.removeprefix("file://")).resolve() != ROOT:
        pytest.skip(f"kiq is installed from {origin}, not this checkout ({ROOT}): its version is that tree's")
    assert kiq.__version__ == PYPROJECT


def test_the_changelog_names_this_version_as_its_newest_release():
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == PYPROJECT


def test_the_fleet_heartbeat_carries_the_version():
    class Redis:
        def __init__(self):
            self.writes = []

        def hset(self, key, mapping):
            self.writes.append(dict(mapping))

        def expire(self, key, ttl):
            pass

    redis = Redis()
    Heartbeat(redis, "kiq@h-cpu0", "cpu:0", ["kiq"])._beat()
    assert redis.writes[-1]["version"] == kiq.__version__


def test_the_openapi_info_carries_the_version():
    pytest.importorskip("fastapi")
    from producer.api import create_api

    app = create_api(Settings(), s3=object())
    assert app.openapi()["info"]["version"] == kiq.__version__


def test_every_kiq_error_is_exported():
    classes = {name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.KiqError)}
    classes.add(errors.TransientError.__name__)  # the [transient] mixin callers catch
    assert classes - set(kiq.__all__) == set()
    assert all(getattr(kiq, name) is getattr(errors, name) for name in classes)
