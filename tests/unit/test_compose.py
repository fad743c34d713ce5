"""docker compose cannot run here: check the file's services and variables against the settings."""

from pathlib import Path

import yaml

from kiq.celeryconf import PRIORITY_STEPS
from kiq.settings import setting_names

COMPOSE = yaml.safe_load(Path("docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ASCEND_MOUNTS = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]


def environment(service):
    env = SERVICES[service].get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


NPUS = range(8)
K8S = list(yaml.safe_load_all(Path("deploy/k8s/kiq-workers.yaml").read_text()))


def test_services_present():
    assert {"redis", "minio", "minio-init", "flower"} | {f"worker-npu{n}" for n in NPUS} == set(SERVICES)


def test_worker_variables_are_real_settings():
    known = set(setting_names())
    for name in (f"worker-npu{n}" for n in NPUS):
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
    for npu in NPUS:
        service = SERVICES[f"worker-npu{npu}"]
        env = environment(f"worker-npu{npu}")
        assert (env["KIQ_DEVICE_TARGET"], str(env["KIQ_DEVICE_ID"])) == ("Ascend", str(npu))
        devices = service["devices"]
        assert [d for d in devices if d.startswith("/dev/davinci") and d[12:].isdigit()] == [f"/dev/davinci{npu}"]
        assert all(m in devices for m in ASCEND_MOUNTS)
        assert any("/usr/local/Ascend/driver" in v for v in service["volumes"])
        assert "kiq" in " ".join(service["command"]) and "worker" in service["command"]


def test_bucket_is_created_and_workers_wait_for_it():
    assert "mc mb --ignore-existing local/kiq" in " ".join(SERVICES["minio-init"]["entrypoint"])
    for npu in NPUS:
        depends = SERVICES[f"worker-npu{npu}"]["depends_on"]
        assert {"redis", "minio-init"} <= set(depends)


def test_flower_watches_the_broker():
    assert (
        "flower" in SERVICES["flower"]["command"] and "--broker=redis://redis:6379/0" in SERVICES["flower"]["command"]
    )


def test_kubernetes_pod_per_npu_scaled_by_keda_on_the_queue():
    kinds = {doc["kind"]: doc for doc in K8S}
    assert set(kinds) == {"ConfigMap", "Deployment", "ScaledObject"}
    assert set(kinds["ConfigMap"]["data"]) <= set(setting_names())
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["huawei.com/Ascend910"] == 1
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == 1
    assert container["command"] == ["kiq", "worker"]
    assert pod["terminationGracePeriodSeconds"] >= 600
    scaled = kinds["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    queue = kinds["ConfigMap"]["data"]["KIQ_QUEUE"]
    lists = [queue] + [f"{queue}:{step}" for step in PRIORITY_STEPS[1:]]  # kombu's list per priority class
    assert [t["metadata"]["listName"] for t in scaled["triggers"]] == lists
    assert {t["type"] for t in scaled["triggers"]} == {"redis"}
