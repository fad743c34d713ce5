import subprocess
import sys

from kiq.settings import Settings
from kiq.tracing import FileExporter  # noqa: F401 - importing kiq.tracing itself must not import OpenTelemetry

# redis-py 8 and FastAPI import parts of OpenTelemetry on their own where it is installed, so the test is that
# kiq's calls, with tracing off, load nothing more of it (and never the SDK's tracer).
PROBE = """
import sys
from kiq import tracing
from kiq.settings import Settings
import producer.client, producer.api, worker.execution, worker.batching, kiq.webhooks
before = {m for m in sys.modules if m.startswith("opentelemetry")}
assert tracing.setup(Settings(), "worker") is False and not tracing.enabled()
with tracing.job("j", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, 1.0), tracing.stage("prior"):
    with tracing.span("fetch input"), tracing.within("j"), tracing.decoder_batch(["j", "k"]):
        pass
tracing.begin("k", {}); tracing.end("k")
assert tracing.inject({"a": 1}) == {"a": 1}
after = {m for m in sys.modules if m.startswith("opentelemetry")}
assert after == before and "opentelemetry.sdk.trace" not in after, sorted(after - before)
print("free")
"""


def test_tracing_off_never_imports_opentelemetry():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "free", done.stderr[-2000:]


def test_tracing_setting_is_checked():
    import pytest

    from kiq.errors import SettingsError

    with pytest.raises(SettingsError, match="KIQ_TRACING"):
        Settings(tracing="jaeger")
    assert Settings(tracing="file:/tmp/x").tracing == "file:/tmp/x"
