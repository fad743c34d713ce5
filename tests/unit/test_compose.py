"""The compose file, the Dockerfiles and the Kubernetes manifests checked against the settings and each other.
scripts/stack-test starts the compose stack for real; tests/unit/test_k8s_schemas.py checks the manifests' schemas."""

import re
from pathlib import Path

import yaml

from kiq.settings import setting_names

COMPOSE = yaml.safe_load(Path("docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ASCEND_MOUNTS = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]


def environment(service):
    env = SERVICES[service].get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


NPUS = GPUS = range(8)
K8S = list(yaml.safe_load_all(Path("deploy/k8s/kiq-workers.yaml").read_text()))
K8S_GPU = list(yaml.safe_load_all(Path("deploy/k8s/kiq-workers-gpu.yaml").read_text()))
K8S_API = list(yaml.safe_load_all(Path("deploy/k8s/kiq-api.yaml").read_text()))
DOCKERFILES = {"Dockerfile": "ascendai/cann:", "Dockerfile.cuda": "pytorch/pytorch:", "Dockerfile.cpu": "python:3.11-"}


def test_services_present():
    workers = {f"worker-npu{n}" for n in NPUS} | {f"worker-gpu{n}" for n in GPUS}
    redis_ha = {"redis-ha-1", "redis-ha-2", "redis-ha-3", "sentinel-1", "sentinel-2", "sentinel-3"}
    cpu = {"tiny-models", "worker-cpu"}
    core = {"redis", "minio", "minio-init", "flower", "api", "webhook-worker"}
    assert core | workers | cpu | redis_ha == set(SERVICES)


def test_worker_variables_are_real_settings():
    known = set(setting_names())
    for name in [f"worker-npu{n}" for n in NPUS] + [f"worker-gpu{n}" for n in GPUS] + ["worker-cpu"]:
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
        # The container sees only /dev/davinciN, which the Ascend runtime numbers 0: MindSpore is given 0.
        assert str(env["KIQ_DEVICE_RUNTIME_ID"]) == "0"
        assert "profiles" not in service  # `docker compose up` on an Ascend host starts them as before
        devices = service["devices"]
        assert [d for d in devices if d.startswith("/dev/davinci") and d[12:].isdigit()] == [f"/dev/davinci{npu}"]
        assert all(m in devices for m in ASCEND_MOUNTS)
        assert any("/usr/local/Ascend/driver" in v for v in service["volumes"])
        assert service["command"] == ["worker"]  # after the image's entry point, kiq


def test_each_gpu_worker_reserves_its_own_gpu_in_the_gpu_profile():
    for gpu in GPUS:
        service = SERVICES[f"worker-gpu{gpu}"]
        env = environment(f"worker-gpu{gpu}")
        assert service["profiles"] == ["gpu"]
        assert service["build"]["dockerfile"] == "Dockerfile.cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [str(gpu)], "capabilities": ["gpu"]}]
        assert (env["KIQ_DEVICE_TARGET"], env["KIQ_BACKEND"]) == ("GPU", "diffusers")
        assert str(env["KIQ_DEVICE_ID"]) == str(gpu)
        assert str(env["KIQ_DEVICE_RUNTIME_ID"]) == "0"  # the one GPU it is given is CUDA device 0 inside
        assert "devices" not in service and not any("Ascend" in v for v in service["volumes"])
        assert service["command"] == ["worker"]


def test_metrics_ports_do_not_collide():
    published = [p.rsplit(":", 1)[0] for name, s in SERVICES.items() if name.startswith("worker-") for p in s["ports"]]
    assert len(published) == len(set(published)) == len(NPUS) + len(GPUS) + 1  # + worker-cpu


def test_bucket_is_created_and_workers_wait_for_it():
    assert "mc mb --ignore-existing local/kiq" in " ".join(SERVICES["minio-init"]["entrypoint"])
    for name in [f"worker-npu{n}" for n in NPUS] + [f"worker-gpu{n}" for n in GPUS] + ["worker-cpu", "api"]:
        depends = SERVICES[name]["depends_on"]
        assert depends["redis"] == {"condition": "service_healthy"}
        assert depends["minio-init"] == {"condition": "service_completed_successfully"}


def test_flower_watches_the_broker():
    assert (
        "flower" in SERVICES["flower"]["command"] and "--broker=redis://redis:6379/0" in SERVICES["flower"]["command"]
    )


def test_kubernetes_pod_per_npu_scaled_by_keda_on_the_queue():
    kinds = {doc["kind"]: doc for doc in K8S}
    assert set(kinds) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject"}
    assert set(kinds["ConfigMap"]["data"]) <= set(setting_names())
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["huawei.com/Ascend910"] == 1
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == 1
    assert kinds["ConfigMap"]["data"]["KIQ_DEVICE_RUNTIME_ID"] == "0"  # the pod's one NPU is logical device 0
    assert container["command"] == ["kiq", "worker"]
    assert pod["terminationGracePeriodSeconds"] >= 600
    scaled = kinds["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    scales_on_queue_metrics(scaled, kinds["ConfigMap"]["data"]["KIQ_QUEUE"])


def scales_on_queue_metrics(scaled: dict, queue: str) -> None:
    """Tenant queues (fair share, on by default) are created as tenants appear: no fixed list of Redis keys names
    them all, so KEDA scales on kiq_queue_depth, which counts them, through Prometheus."""
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert f'kiq_queue_depth{{queue="{queue}"}}' in trigger["metadata"]["query"]
    assert "max(sum by (instance)" in trigger["metadata"]["query"]  # one replica's count, not the replicas' sum
    (api,) = (
        d["spec"]["template"] for d in K8S_API if d["kind"] == "Deployment" and d["metadata"]["name"] == "kiq-api"
    )
    assert api["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_kubernetes_pod_per_gpu_beside_the_ascend_pool():
    kinds = {doc["kind"]: doc for doc in K8S_GPU}
    ascend = {doc["kind"]: doc for doc in K8S}
    assert set(kinds) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject"}
    for kind in kinds:  # both files can be applied to one namespace
        assert kinds[kind]["metadata"]["name"] != ascend[kind]["metadata"]["name"]
    config = kinds["ConfigMap"]["data"]
    assert set(config) <= set(setting_names())
    assert (config["KIQ_DEVICE_TARGET"], config["KIQ_BACKEND"]) == ("GPU", "diffusers")
    assert config["KIQ_DEVICE_RUNTIME_ID"] == "0"
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"][0]["configMapRef"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert container["command"] == ["kiq", "worker"] and container["image"] == "kiq-worker-cuda:latest"
    assert pod["terminationGracePeriodSeconds"] >= 600
    scaled = kinds["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    scales_on_queue_metrics(scaled, config["KIQ_QUEUE"])


def test_ha_profile_replicates_with_aof_and_three_sentinels_on_the_tested_timings():
    from tests.sentinel import DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, MASTER

    nodes = [SERVICES[f"redis-ha-{n}"] for n in (1, 2, 3)]
    for n, node in enumerate(nodes, 1):
        command = node["command"]
        assert node["profiles"] == ["ha"] and command[0] == "redis-server"
        assert command[command.index("--appendfsync") + 1] == "everysec" and "--appendonly" in command
        assert command[command.index("--replica-announce-ip") + 1] == f"redis-ha-{n}"
        assert ("--replicaof" in command) == (n > 1)
    for n in (1, 2, 3):
        script = " ".join(SERVICES[f"sentinel-{n}"]["command"])
        assert f"sentinel monitor {MASTER} redis-ha-1 6379 2" in script  # KIQ_SENTINEL_MASTER's default
        assert f"down-after-milliseconds {MASTER} {DOWN_AFTER_MS}" in script
        assert f"failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}" in script
        assert "--sentinel" in script and SERVICES[f"sentinel-{n}"]["profiles"] == ["ha"]
    header = Path("docker-compose.yml").read_text()
    url = "sentinel://sentinel-1:26379;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379/0"
    assert url in header
    from kiq.settings import Settings

    assert Settings(broker_url=url).sentinel_master == MASTER


def test_every_service_is_health_checked_or_a_one_shot_job():
    one_shots = {"minio-init", "tiny-models"}  # judged by their exit code (service_completed_successfully)
    for name, service in SERVICES.items():
        assert ("healthcheck" in service) != (name in one_shots), name
        assert ("restart" in service) != (name in one_shots) or name in {"redis", "minio", "flower"}, name


def test_depends_on_is_accepted_by_docker_compose_1_29():
    # Debian's docker-compose 1.29 (the stack test's tool) rejects Compose v2.20's `required`.
    text = Path("docker-compose.yml").read_text()
    assert "required:" not in text
    for name, service in SERVICES.items():
        depends = service.get("depends_on", [])
        for condition in depends.values() if isinstance(depends, dict) else []:
            assert set(condition) == {"condition"}, name


def test_api_and_webhook_worker_take_keys_and_secret_from_the_environment():
    api = environment("api")
    assert api["KIQ_API_KEYS"] == "${KIQ_API_KEYS:-}" and api["KIQ_WEBHOOK_SECRET"] == "${KIQ_WEBHOOK_SECRET:-}"
    assert api["KIQ_API_OPEN"] == "${KIQ_API_OPEN:-0}"  # open only when .env says so
    assert environment("webhook-worker") == api
    assert SERVICES["api"]["command"][:3] == ["api", "--host", "0.0.0.0"]
    assert SERVICES["api"]["ports"] == ["${KIQ_API_PUBLISH:-8000}:8000"]
    assert "/readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert SERVICES["webhook-worker"]["command"] == ["webhook-worker"]


def test_cpu_profile_runs_one_worker_on_tiny_models_unless_real_ones_are_named():
    for name in ("tiny-models", "worker-cpu"):
        assert SERVICES[name]["profiles"] == ["cpu"]
    env = environment("worker-cpu")
    assert env["KIQ_DEVICE_TARGET"] == "CPU"
    assert env["KIQ_PRIOR_MODEL"] == "${CPU_PRIOR_MODEL:-/var/lib/kiq/tiny/prior}"
    assert "kiq make-tiny-models /var/lib/kiq/tiny" in " ".join(SERVICES["tiny-models"]["entrypoint"])
    assert SERVICES["worker-cpu"]["depends_on"]["tiny-models"] == {"condition": "service_completed_successfully"}


def test_env_example_names_every_variable_the_compose_file_reads():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", Path("docker-compose.yml").read_text()))
    example = {line.split("=", 1)[0] for line in Path(".env.example").read_text().splitlines() if "=" in line[:40]}
    assert used <= example, used - example
    assert all(v.startswith("KIQ_") is False or v in setting_names() or v in {"KIQ_MODELS_DIR", "KIQ_API_PUBLISH"}
               for v in example)  # fmt: skip


def body(dockerfile):
    """The Dockerfile less its comments, its ARG defaults and its ENV line: what every target shares."""
    text = re.sub(r"(?m)^#.*\n", "", Path(dockerfile).read_text())
    text = re.sub(r"(?m)^ARG (BASE_IMAGE|EXTRAS|RUNTIME_PACKAGES)=.*$", "", text)
    return re.sub(r"(?ms)^ENV .*?(?<!\\)\n", "", text)


def test_images_share_one_structure():
    bodies = {name: body(name) for name in DOCKERFILES}
    assert len(set(bodies.values())) == 1, "the Dockerfiles differ beyond their ARG defaults and ENV"
    for name, base in DOCKERFILES.items():
        assert f"ARG BASE_IMAGE={base}" in Path(name).read_text()
    shared = bodies["Dockerfile"]
    # deps layer before the source; a non-root user; kiq as the entry point; pip gone from the final image
    assert shared.index("requirements.txt") < shared.index("COPY kiq ./kiq")
    assert "USER kiq" in shared and 'ENTRYPOINT ["kiq"]' in shared and "pip uninstall -y -q pip" in shared
    assert shared.count("FROM ${BASE_IMAGE}") == 2 and "COPY --from=build /opt/kiq /opt/kiq" in shared
    assert "--mount=type=secret,id=ca" in shared and "trusted-host" not in shared  # CA bundle, never no-verify
    assert "KIQ_API_KEYS" not in shared and "KIQ_WEBHOOK_SECRET" not in shared


def test_each_image_installs_its_target_extra():
    extras = {"Dockerfile": "worker", "Dockerfile.cuda": "cuda", "Dockerfile.cpu": "worker,api"}
    for name, extra in extras.items():
        assert f"ARG EXTRAS={extra}\n" in Path(name).read_text()
    assert "ARG RUNTIME_PACKAGES=libgomp1\n" in Path("Dockerfile.cpu").read_text()  # MindSpore's CPU build needs it
    assert "KIQ_BACKEND=diffusers" in Path("Dockerfile.cuda").read_text()


def test_kiq_containers_run_under_an_init_that_forwards_sigterm():
    kiq = ["api", "webhook-worker", "worker-cpu"] + [f"worker-npu{n}" for n in NPUS] + [f"worker-gpu{n}" for n in GPUS]
    assert all(SERVICES[name].get("init") is True for name in kiq)
