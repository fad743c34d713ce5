import json
import logging

import pytest

from kiq import logs
from kiq.errors import SettingsError
from kiq.settings import Settings

TENANTS = json.dumps({"tenants": [{"name": "a", "key": "tenant-key-0123456789"}]})


def redactor():
    settings = Settings(broker_url="redis://:redis-pw-4242@h:6379/0", result_backend="redis://u:results-pw-77@h/1",
                        api_keys="api-key-one,api-key-two", api_tenants=TENANTS, webhook_secret="hook-secret-9",
                        sentinel_password="sentinel-pw-3")  # fmt: skip
    return logs.Redactor.from_settings(settings, {"AWS_SECRET_ACCESS_KEY": "aws-secret-xyz", "AWS_SESSION_TOKEN": ""})


PLANTED = ["redis-pw-4242", "results-pw-77", "api-key-one", "api-key-two", "tenant-key-0123456789", "hook-secret-9",
           "sentinel-pw-3", "aws-secret-xyz"]  # fmt: skip


@pytest.mark.parametrize("secret", PLANTED)
def test_every_configured_secret_is_scrubbed(secret):
    assert secret not in redactor()(f"before {secret} after")


def test_image_bytes_signatures_and_url_passwords_are_scrubbed():
    redact = logs.Redactor([])
    b64 = "iVBORw0KGgo" + "A" * 4000
    assert b64[:60] not in redact(f"input data:image/png;base64,{b64} end")
    assert b64[:60] not in redact(f"raw {b64} end")
    assert redact("u?X-Amz-Signature=abc123&x=1") == "u?X-Amz-Signature=***&x=1"
    assert redact("redis://user:hunter22@host:6379/0") == "redis://user:***@host:6379/0"
    assert len(redact("x" * 100_000)) < logs.MAX_MESSAGE + 100


def test_a_line_is_one_json_object_with_the_context():
    formatter = logs.JsonFormatter("worker", logs.Redactor(["s3cret"]))
    record = logging.LogRecord("kiq", logging.WARNING, "", 0, "leak %s\nsecond line", ("s3cret",), None)
    with logs.context(job_id="j1", tenant="t1"), logs.context(stage="prior", device=None):
        line = formatter.format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "leak ***\nsecond line" and entry["process"] == "worker"
    assert (entry["job_id"], entry["tenant"], entry["stage"]) == ("j1", "t1", "prior") and "device" not in entry
    assert "job_id" not in json.loads(formatter.format(record))  # the context ended with the block


def test_raw_output_lines_become_json_and_ours_pass_through():
    formatter = logs.JsonFormatter("worker", logs.Redactor([]))
    assert json.loads(formatter.raw("[WARNING] ME(1): something"))["message"] == "[WARNING] ME(1): something"
    ours = json.dumps({"level": "INFO", "message": "from a child"})
    assert formatter.raw(ours) == ours


def test_a_json_line_from_a_library_is_redacted_too():
    formatter = logs.JsonFormatter("worker", logs.Redactor(["s3cr3t-Planted"]))
    leaked = json.dumps({"message": "token s3cr3t-Planted", "extra": {"url": "redis://:s3cr3t-Planted@h:6379/0"}})
    line = formatter.raw(leaked)
    assert "s3cr3t-Planted" not in line and json.loads(line)["message"] == "token ***"


def test_text_mode_changes_nothing_and_bad_formats_are_refused():
    assert logs.setup(Settings(), "api") is False
    assert logs.uvicorn_options(Settings()) == {}
    with pytest.raises(SettingsError, match="KIQ_LOG_FORMAT"):
        Settings(log_format="xml")
