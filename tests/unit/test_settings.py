import pytest

from kiq.errors import SettingsError
from kiq.settings import Settings, setting_names


def test_defaults():
    s = Settings.from_env({})
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.backend_url == s.broker_url
    assert (s.device_target, s.device_id, s.queue) == ("Ascend", 0, "kiq")


def test_reads_prefixed_variables():
    s = Settings.from_env(
        {
            "KIQ_BROKER_URL": "redis://r:6380/2",
            "KIQ_RESULT_BACKEND": "redis://r:6380/3",
            "KIQ_DEVICE_TARGET": "CPU",
            "KIQ_DEVICE_ID": "5",
            "KIQ_S3_ENDPOINT_URL": "http://minio:9000",
            "KIQ_FETCH_TIMEOUT_S": "2.5",
            "BROKER_URL": "redis://ignored",
        }
    )
    assert (s.broker_url, s.backend_url, s.device_target, s.device_id) == (
        "redis://r:6380/2",
        "redis://r:6380/3",
        "CPU",
        5,
    )
    assert s.s3_endpoint_url == "http://minio:9000" and s.fetch_timeout_s == 2.5


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"KIQ_DEVICE_ID": "npu0"}, "KIQ_DEVICE_ID"),
        ({"KIQ_DEVICE_ID": "-1"}, "KIQ_DEVICE_ID"),
        ({"KIQ_DEVICE_TARGET": "NPU"}, "KIQ_DEVICE_TARGET"),
        ({"KIQ_BACKEND": "onnx"}, "KIQ_BACKEND"),
        ({"KIQ_BACKEND": "mindone", "KIQ_DEVICE_TARGET": "GPU"}, "KIQ_BACKEND"),
        ({"KIQ_BACKEND": "diffusers", "KIQ_DEVICE_TARGET": "Ascend"}, "KIQ_BACKEND"),
        ({"KIQ_TORCH_COMPILE": "maybe"}, "KIQ_TORCH_COMPILE"),
        ({"KIQ_BROKER_URL": "amqp://guest@localhost//"}, "KIQ_BROKER_URL"),
        ({"KIQ_RESULT_BACKEND": "redis://"}, "KIQ_RESULT_BACKEND"),
        ({"KIQ_S3_ENDPOINT_URL": "minio:9000"}, "KIQ_S3_ENDPOINT_URL"),
        ({"KIQ_S3_BUCKET": ""}, "KIQ_S3_BUCKET"),
        ({"KIQ_FETCH_MAX_BYTES": "0"}, "KIQ_FETCH_MAX_BYTES"),
        ({"KIQ_RESULT_TTL_S": "a week"}, "KIQ_RESULT_TTL_S"),
        # retention acts on everything under the prefix: never the whole bucket
        ({"KIQ_RETENTION_DAYS": "30", "KIQ_S3_PREFIX": ""}, "KIQ_S3_PREFIX"),
        ({"KIQ_RETENTION_DAYS": "30", "KIQ_S3_PREFIX": "/"}, "KIQ_S3_PREFIX"),
    ],
)
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("target", "backend", "resolved"),
    [("Ascend", "auto", "mindone"), ("CPU", "auto", "mindone"), ("GPU", "auto", "diffusers"),
     ("CPU", "diffusers", "diffusers"), ("GPU", "diffusers", "diffusers"), ("CPU", "mindone", "mindone")],
)  # fmt: skip
def test_backend_follows_the_device_target_unless_named(target, backend, resolved):
    s = Settings.from_env({"KIQ_DEVICE_TARGET": target, "KIQ_BACKEND": backend, "KIQ_TORCH_COMPILE": "1"})
    assert s.model_backend == resolved and s.torch_compile is True


def test_url_constructor():
    assert Settings.from_url("redis://h:1/0", queue="q").queue == "q"


def test_every_field_has_a_documented_variable():
    page = open("docs/operations/settings.md", encoding="utf-8").read()  # rows and defaults: tests/unit/test_docs.py
    missing = [name for name in setting_names() if f"`{name}`" not in page]
    assert not missing, f"not in the settings table of docs/operations/settings.md: {missing}"
