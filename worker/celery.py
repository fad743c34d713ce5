"""`celery -A worker worker` finds the app here. Settings are read once, from KIQ_* variables."""

from kiq import logs, tracing
from kiq.settings import Settings
from worker.app import create_app

settings = Settings.from_env()
logs.setup_celery(settings, "worker")
tracing.setup(settings, "worker")
app = create_app(settings)
