"""docker compose cannot run here: check the file's services and variables against the settings."""

from pathlib import Path

import yaml

from kiq.settings import setting_names

COMPOSE = yaml.safe_load(Path("docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ASCEND_MOUNTS = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]


def environment(service):
    env = SERVICES[service].get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_services_present():
    assert {"redis", "minio", "minio-init", "worker-npu0", "worker-npu1"} <= set(SERVICES)


def test_worker_variables_are_real_settings():
    known = set(setting_names())
    for name in ("worker-npu0", "worker-npu1"):
        kiq_vars = {k for k in environment(name) if k.startswith("KIQ_")}
        assert kiq_vars <= known, kiq_vars - known
        assert {
            "KIQ_BROKER_URL",
            "KIQ_S3_ENDPOINT_URL",
            "KIQ_S3_BUCKET",
            "KIQ_DEVICE_TARGET",
            "KIQ_DEVICE_ID",
        } <= kiq_vars


def test_each_worker_is_pinned_to_its_own_npu():
    for npu in (0, 1):
        service = SERVICES[f"worker-npu{npu}"]
        env = environment(f"worker-npu{npu}")
        assert (env["KIQ_DEVICE_TARGET"], str(env["KIQ_DEVICE_ID"])) == ("Ascend", str(npu))
        devices = service["devices"]
        assert f"/dev/davinci{npu}" in devices and f"/dev/davinci{1 - npu}" not in devices
        assert all(m in devices for m in ASCEND_MOUNTS)
        assert any("/usr/local/Ascend/driver" in v for v in service["volumes"])
        assert "kiq" in " ".join(service["command"]) and "worker" in service["command"]


def test_bucket_is_created_and_workers_wait_for_it():
    assert "mc mb --ignore-existing local/kiq" in " ".join(SERVICES["minio-init"]["entrypoint"])
    for npu in (0, 1):
        depends = SERVICES[f"worker-npu{npu}"]["depends_on"]
        assert {"redis", "minio-init"} <= set(depends)
