"""Redis and Sentinel passwords never appear in what kiq prints: errors, logs, stderr (issue 20, defect 7)."""

import os
import subprocess
import sys

import pytest

from kiq import redisurl
from kiq.errors import SettingsError
from kiq.settings import Settings

PASSWORD = "hunter2-Pl4nted-pw"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (f"redis://:{PASSWORD}@h:6379/0", "redis://:***@h:6379/0"),
        (f"rediss://alice:{PASSWORD}@h/1", "rediss://alice:***@h/1"),
        (f"sentinel://:{PASSWORD}@a:1;sentinel://:{PASSWORD}@b:2/3", "sentinel://:***@a:1;sentinel://:***@b:2/3"),
        (f"redis://:{PASSWORD}@bad:99999", "redis://:***@bad:99999"),
        (f"redis://:pa/ss@{PASSWORD}@h/0", "redis://:***@h/0"),  # unescaped '/' and '@': all up to the last '@'
        (f"amqp://guest:{PASSWORD}@h//", "amqp://guest:***@h//"),
        (f"{PASSWORD}@h:6379", "***@h:6379"),  # no scheme, no user: the whole userinfo may be the password
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h/0", "redis://***@h/0"),
    ],
)
def test_redact_masks_every_password_and_keeps_the_rest(raw, shown):
    assert redisurl.redact(raw) == shown


@pytest.mark.parametrize(
    "raw",
    [
        f"redis://:{PASSWORD}@bad:99999/0",  # malformed port
        f"amqp://:{PASSWORD}@h//",  # wrong scheme
        f"redis://:{PASSWORD}@a:1;redis://b:2",  # several servers without Sentinel
        f"redis://:{PASSWORD}@/0",  # no host
        f"redis://:{PASSWORD}@h:1/zero",  # bad database
    ],
)
def test_settings_errors_never_show_the_password(raw):
    with pytest.raises(SettingsError) as caught:
        Settings(broker_url=raw)
    assert "KIQ_BROKER_URL" in str(caught.value) and PASSWORD not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        Settings(result_backend=raw)
    assert PASSWORD not in str(caught.value)


def test_s3_endpoint_errors_never_show_the_password():
    with pytest.raises(SettingsError) as caught:
        Settings(s3_endpoint_url=f"ftp://key:{PASSWORD}@s3.internal")
    assert "KIQ_S3_ENDPOINT_URL" in str(caught.value) and PASSWORD not in str(caught.value)


@pytest.mark.parametrize("command", [["worker"], ["status", "some-id"], ["api"], ["webhook-worker"]])
def test_startup_errors_on_stderr_never_show_the_password(command):
    """The real CLI in its own process, as an operator starts it, with a malformed URL that carries a password."""
    env = {**os.environ, "KIQ_BROKER_URL": f"redis://:{PASSWORD}@redis.internal:99999/0", "KIQ_DEVICE_TARGET": "CPU"}
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *command], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "KIQ_BROKER_URL" in proc.stderr and "redis://:***@redis.internal:99999/0" in proc.stderr, output
    assert PASSWORD not in output
