import json
import subprocess
import sys

import pytest

from kiq.status import JobStatus, Progress
from producer import cli
from producer.client import to_status
from producer.progress import render


def test_invalid_job_exits_2_with_the_reason_before_touching_redis(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KIQ_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens: any connection would fail
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"inputs": [{"text": "a cat", "weight": 1}], "height": 100}))
    assert cli.main(["submit", str(job)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "height: Input should be a multiple of 64" in err


@pytest.mark.parametrize(("content", "message"), [("{not json", "not valid JSON"), (None, "cannot read job file")])
def test_unreadable_job_file(tmp_path, capsys, content, message):
    path = tmp_path / "job.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["submit", str(path)]) == cli.EXIT_INVALID
    assert message in capsys.readouterr().err


def test_bad_settings_exit_2_naming_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KIQ_BROKER_URL", "amqp://localhost")
    assert cli.main(["status", "x"]) == cli.EXIT_INVALID
    assert "KIQ_BROKER_URL" in capsys.readouterr().err


def test_status_mapping():
    progress = to_status("a", "PROGRESS", {"stage": "decoder", "step": 3, "total": 10})
    assert progress.progress == Progress(stage="decoder", step=3, total=10)
    failure = to_status("a", "FAILURE", ValueError("boom"))
    assert (failure.error.type, failure.error.message) == ("ValueError", "boom")
    assert to_status("a", "REVOKED", None).error.type == "Cancelled"
    assert to_status("a", "STARTED", {"pid": 1}) == JobStatus(id="a", state="STARTED")


def test_progress_bar_text():
    status = JobStatus(id="a", state="PROGRESS", progress=Progress(stage="decoder", step=5, total=10))
    assert render(status) == "decoder [" + "#" * 15 + "." * 15 + "] 5/10"


def test_producer_never_imports_a_framework_or_the_worker():
    code = (
        "import sys, producer, producer.cli, producer.client, producer.demo, kiq;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('mindspore', 'mindone', 'torch', 'diffusers', 'worker', 'boto3'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("argv", "module", "extra"), [(["api"], "fastapi", "api"),
                                                       (["make-tiny-models", "x"], "mindspore", "worker")])  # fmt: skip
def test_a_command_without_its_extra_names_the_extra(argv, module, extra, capsys, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] in (module, "worker")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "producer.api", raising=False)
    monkeypatch.delitem(sys.modules, "worker.pipelines.tiny", raising=False)
    assert cli.main(argv) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert f"needs the '{extra}' extra" in err and f"pip install 'kiq[{extra}]'" in err


def test_api_host_and_port_flags_override_the_settings(monkeypatch):
    import producer.api

    seen = []
    monkeypatch.setattr(producer.api, "run_api", seen.append)
    monkeypatch.setenv("KIQ_API_PORT", "9000")
    assert cli.main(["api", "--host", "0.0.0.0", "--port", "8080"]) == 0
    assert (seen[0].api_host, seen[0].api_port) == ("0.0.0.0", 8080)
    assert cli.main(["api"]) == 0
    assert (seen[1].api_host, seen[1].api_port) == ("127.0.0.1", 9000)


def test_api_bound_beyond_loopback_without_keys_refuses_to_start():
    # The real command, no Redis or S3 needed: it must stop before serving anything.
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KIQ_")}
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "api", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == cli.EXIT_INVALID, done.stderr
    assert "KIQ_API_KEYS" in done.stderr and "KIQ_API_OPEN=1" in done.stderr and "0.0.0.0" in done.stderr


@pytest.mark.parametrize(
    ("env", "opens"),
    [
        ({"KIQ_API_HOST": "0.0.0.0"}, False),
        ({"KIQ_API_HOST": "::"}, False),
        ({"KIQ_API_HOST": "kiq-api"}, False),  # a name may resolve anywhere
        ({"KIQ_API_HOST": "0.0.0.0", "KIQ_API_OPEN": "1"}, True),
        ({"KIQ_API_HOST": "0.0.0.0", "KIQ_API_KEYS": "k1"}, True),
        ({"KIQ_API_HOST": "0.0.0.0", "KIQ_API_TENANTS": '{"tenants": [{"key": "k2"}]}'}, True),
        ({"KIQ_API_HOST": "127.0.0.1"}, True),
        ({"KIQ_API_HOST": "127.0.0.2"}, True),
        ({"KIQ_API_HOST": "::1"}, True),
        ({"KIQ_API_HOST": "localhost"}, True),
    ],
)
def test_an_open_api_is_served_only_on_loopback_or_on_purpose(env, opens):
    from kiq.errors import SettingsError
    from kiq.settings import Settings
    from producer.api import check_exposure

    settings = Settings.from_env(env)
    if opens:
        check_exposure(settings)
    else:
        with pytest.raises(SettingsError, match="KIQ_API_OPEN=1"):
            check_exposure(settings)
