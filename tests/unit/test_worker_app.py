import ast
import subprocess
import sys
from pathlib import Path

from celery.app.utils import find_app

from kiq.names import GENERATE_TASK


def test_celery_dash_a_worker_finds_a_solo_single_process_app():
    app = find_app("worker")
    assert app.main == "kiq-worker"
    assert GENERATE_TASK in app.tasks
    conf = app.conf
    assert (conf.worker_pool, conf.worker_concurrency, conf.worker_prefetch_multiplier) == ("solo", 1, 1)
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]


FRAMEWORKS = ("mindspore", "mindone", "torch", "diffusers")


def test_importing_the_worker_app_loads_no_model_framework():
    loaded = "{m.split('.')[0] for m in sys.modules}"
    code = f"import sys, worker.celery; sys.exit(1 if {loaded} & {set(FRAMEWORKS)} else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_only_the_backends_import_a_framework():
    """The runner and everything else above worker/pipelines/ reach a framework only through the backend seam."""
    above = [p for p in Path("worker").rglob("*.py") if "pipelines" not in p.parts]
    bad = {str(p): m for p in above for m in imported_modules(p) if m.split(".")[0] in FRAMEWORKS}
    assert not bad, bad
    seam = imported_modules(Path("worker/pipelines/base.py")) | imported_modules(Path("worker/pipelines/fast_prior.py"))
    assert not {m for m in seam if m.split(".")[0] in FRAMEWORKS}


def test_worker_with_bad_settings_fails_at_start_naming_the_variable():
    env = {"PATH": "/usr/bin:/bin", "KIQ_DEVICE_ID": "npu-three"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "KIQ_DEVICE_ID must be a number, got 'npu-three'" in done.stderr


def test_gpu_worker_without_cuda_fails_at_start_naming_the_setting():
    env = {"PATH": "/usr/bin:/bin", "KIQ_DEVICE_TARGET": "GPU", "KIQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "KIQ_DEVICE_TARGET=GPU" in done.stderr and "no CUDA device" in done.stderr
