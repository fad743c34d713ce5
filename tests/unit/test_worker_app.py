import subprocess
import sys

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


def test_importing_the_worker_app_loads_no_model_framework():
    code = "import sys, worker.celery; sys.exit(1 if 'mindspore' in sys.modules or 'mindone' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_worker_with_bad_settings_fails_at_start_naming_the_variable():
    env = {"PATH": "/usr/bin:/bin", "KIQ_DEVICE_ID": "npu-three"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "KIQ_DEVICE_ID must be a number, got 'npu-three'" in done.stderr
