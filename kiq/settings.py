"""One settings object per process, read from `KIQ_*` environment variables.

AWS credentials are not kiq settings: boto3 reads them its usual way (env, ~/.aws, instance role).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from kiq import redisurl
from kiq.errors import SettingsError
from kiq.names import DEFAULT_QUEUE, QUEUE_NAME

PREFIX = "KIQ_"
MIN_VISIBILITY_TIMEOUT_S = 6.0
MAX_EXPIRES_S = 30 * 24 * 3600  # a job's deadline to start, at most (the contract's bound too)
DeviceTarget = Literal["Ascend", "CPU", "GPU"]
BACKENDS = ("auto", "mindone", "diffusers")


@dataclass(frozen=True)
class Settings:
    broker_url: str = "redis://localhost:6379/0"  # or sentinel://host:port;sentinel://host:port/db
    result_backend: str = ""  # empty: same as the broker
    sentinel_master: str = "kiq"  # the Sentinels' name for the Redis group (sentinel:// URLs)
    sentinel_password: str = ""  # the Sentinels' own AUTH password; the master's goes in the URL
    redis_retry_s: float = 30.0  # how long submits, publishes and delivery bookkeeping ride out a Redis outage
    submit_replicas: int = 1  # with Sentinel: a submit returns once the job is on this many replicas (WAIT)
    submit_replica_timeout_ms: int = 1000  # ...or after this long, with a warning; 0 replicas = do not wait
    s3_endpoint_url: str = ""  # empty: AWS S3
    s3_bucket: str = "kiq"
    s3_prefix: str = "jobs/"
    s3_region: str = "us-east-1"
    s3_input_prefix: str = "inputs/"  # uploads and inline images are stored under <prefix><tenant>/<job id>/
    s3_read_allow: str = ""  # comma-separated bucket/prefix a worker may read s3:// refs from; empty: the input prefix
    prior_model: str = "kandinsky-community/kandinsky-2-2-prior"
    decoder_model: str = "kandinsky-community/kandinsky-2-2-decoder"
    device_target: DeviceTarget = "Ascend"
    device_id: int = 0
    backend: str = "auto"  # auto: diffusers (torch) on GPU, mindone (MindSpore) on Ascend and CPU
    torch_compile: bool = False  # diffusers backend: compile the UNet at worker start
    queue: str = DEFAULT_QUEUE
    worker_queues: str = ""  # comma-separated queues a worker consumes; empty: KIQ_QUEUE
    large_queue: str = ""  # if set, producers route jobs over KIQ_LARGE_PIXELS here (unless a job names a queue)
    large_pixels: int = 1024 * 1024
    fair_share: bool = True  # tenants' jobs wait in their own queues, served in turns (kiq/fairshare.py)
    fair_share_max_tenants: int = 10_000  # tenant queues per routed queue; past it, jobs wait in the routed queue
    fair_share_poll_s: float = 1.0  # how often workers look for new tenant queues and drain requests
    device_runtime_id: int = -1  # the id the framework is given; -1: KIQ_DEVICE_ID (0 under *_VISIBLE_DEVICES)
    metrics_port: int = 0  # Prometheus metrics on this port; 0: off
    log_format: str = "text"  # json: one JSON object per line, with job ids, secrets scrubbed (kiq/logs.py)
    tracing: str = ""  # OpenTelemetry (the otel extra): otlp (OTEL_EXPORTER_OTLP_* variables) or file:PATH; empty: off
    health_port: int = 0  # worker probes /healthz and /readyz on this port (supervisor: + device id); 0: off
    metrics_queues: str = ""  # comma-separated queues the queue metrics always report (beside KIQ_QUEUE, tenants')
    restart_max: int = 5  # a supervised worker that dies this often within KIQ_RESTART_WINDOW_S is left down
    restart_window_s: float = 300.0
    shutdown_grace_s: float = 600.0  # SIGTERM: time for running jobs to finish before children are killed
    fast_prior: bool = True  # one batched prior run per job, no wasted negative run (same output)
    decoder_batch: int = 1  # > 1: run up to this many queued jobs of one decoder shape as one decoder batch
    decoder_batch_wait_ms: int = 50  # how long a job waits for batch mates
    progress_interval_ms: int = 500  # a job's progress is written at most this often (stage ends always); 0: every step
    embed_cache_mb: int = 256  # image-embedding and text-prior caches (with the fast prior); 0: off
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keys: str = ""  # comma-separated bearer keys; empty (and no tenants): the API is open to everyone
    api_open: bool = False  # serve an API without keys on an address beyond loopback (refused unless set)
    api_tenants: str = ""  # JSON (or a path to a JSON file): tenants with their key, queues, priority, s3 reads
    api_max_priority: int = 5  # the highest priority a tenant may ask for unless its entry says more
    api_max_body_bytes: int = 32 * 1024 * 1024
    idempotency_ttl_s: int = 24 * 3600
    # An in-flight submit's Idempotency-Key answers 409 to retries; renewed while the submit works, so this is how
    # long a key stays blocked after the API process handling it died.
    idempotency_pending_s: float = 300.0
    webhook_secret: str = ""  # HMAC-SHA256 key for X-Kiq-Signature; required by the webhook worker
    webhook_timeout_s: float = 10.0
    webhook_retry_s: float = 600.0  # how long a failing webhook is retried, with backoff
    result_ttl_s: int = 7 * 24 * 3600
    presign_ttl_s: int = 24 * 3600
    fetch_timeout_s: float = 20.0
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_max_pixels: int = 40_000_000
    fetch_max_redirects: int = 3
    fetch_retries: int = 2
    fetch_allow: str = ""  # comma-separated hosts, IPs or CIDRs exempt from the private-address refusal
    s3_retry_s: float = 60.0
    max_deliveries: int = 3
    # The reference speed: where no worker's own measured speed is known (kiq/limits.py) — a worker before its
    # warm-up probe, a submit while no live worker of the job's queue publishes one.
    prior_step_s: float = 0.05  # expected seconds per prior step (one text)
    decoder_step_s: float = 0.15  # expected seconds per decoder step, per 768x768 image
    speed_probe_s: float = 10.0  # warm-up speed probe: 64x64 always, larger sizes while they fit this; 0: none
    time_limit_factor: float = 4.0
    time_limit_min_s: float = 300.0
    time_limit_max_s: float = 3 * 3600.0
    time_limit_grace_s: float = 60.0
    visibility_timeout_s: float = 60.0  # a dead worker's jobs come back after this; live workers renew leases
    # Quotas of each submitter (an API tenant, or this process's direct submits); 0: none. Tenants' own override.
    quota_submits_per_minute: int = 0
    quota_queued: int = 0  # jobs submitted and not started
    quota_running: int = 0  # jobs started and not ended: a submit is refused while this many run
    quota_job_mpx_steps: float = 0.0  # the largest job: megapixels x decoder steps x images x frames
    job_expires_s: int = 24 * 3600  # a job's deadline to start, unless it sets expires_in_s: then it ends EXPIRED
    retention_days: int = 0  # outputs and inputs age out after this many days (S3 lifecycle or `kiq gc`); 0: kept
    s3_lifecycle: bool = True  # with KIQ_RETENTION_DAYS: the API sets the bucket's lifecycle rules at start

    def __post_init__(self) -> None:
        redisurl.parse(self.broker_url, env_name("broker_url"))
        if self.result_backend:
            redisurl.parse(self.result_backend, env_name("result_backend"))
        if not self.sentinel_master.strip():
            raise SettingsError(f"{env_name('sentinel_master')} must not be empty")
        if self.s3_endpoint_url:
            _check_url("s3_endpoint_url", self.s3_endpoint_url, ("http", "https"))
        if self.device_target not in ("Ascend", "CPU", "GPU"):
            raise SettingsError(f"{env_name('device_target')} must be Ascend, CPU or GPU, got {self.device_target!r}")
        _check_backend(self.backend, self.device_target)
        if self.tracing and self.tracing != "otlp" and not self.tracing.startswith("file:"):
            raise SettingsError(f"{env_name('tracing')} must be otlp, file:PATH or empty, got {self.tracing!r}")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"{env_name('log_format')} must be text or json, got {self.log_format!r}")
        for name in ("queue", "large_queue", *(["worker_queues"] if self.worker_queues else [])):
            for queue in filter(None, getattr(self, name).split(",")):
                if not QUEUE_NAME.fullmatch(queue.strip()):
                    raise SettingsError(f"{env_name(name)}: {queue!r} is not a queue name ({QUEUE_NAME.pattern})")
        if not self.s3_bucket:
            raise SettingsError(f"{env_name('s3_bucket')} must not be empty")
        if not self.s3_input_prefix.endswith("/") or self.s3_input_prefix.startswith("/"):
            raise SettingsError(f"{env_name('s3_input_prefix')} must end with '/' and not start with it")
        if not 0 <= self.api_max_priority <= 9:
            raise SettingsError(f"{env_name('api_max_priority')} must be in 0..9, got {self.api_max_priority}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise SettingsError(f"{env_name(name)} must not be negative: {getattr(self, name)}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{env_name(name)} must be positive: {getattr(self, name)}")
        if self.job_expires_s > MAX_EXPIRES_S:
            raise SettingsError(f"{env_name('job_expires_s')} must be at most {MAX_EXPIRES_S} (30 days)")
        if self.retention_days and not (self.s3_prefix.endswith("/") and self.s3_prefix.strip("/")):
            # the lifecycle rule and `kiq gc` act on everything under it: never the whole bucket
            raise SettingsError(
                f"{env_name('retention_days')} needs {env_name('s3_prefix')} of kiq's own, ending in '/'"
            )
        if self.retention_days and self.retention_days * 86400 < self.job_expires_s:
            # A queued job's uploaded inputs must outlive its deadline to start.
            raise SettingsError(f"{env_name('retention_days')} must cover {env_name('job_expires_s')}")
        if self.visibility_timeout_s < MIN_VISIBILITY_TIMEOUT_S:
            # Leases are renewed every sixth of the timeout; below this a slow Redis round trip could lose one.
            raise SettingsError(
                f"{env_name('visibility_timeout_s')} must be at least {MIN_VISIBILITY_TIMEOUT_S:g} s, "
                f"got {self.visibility_timeout_s:g}"
            )

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def broker_server(self) -> redisurl.RedisURL:
        return redisurl.parse(self.broker_url, env_name("broker_url"))

    @property
    def results_server(self) -> redisurl.RedisURL:
        return redisurl.parse(self.backend_url, env_name("result_backend" if self.result_backend else "broker_url"))

    @property
    def s3_read_prefixes(self) -> list[tuple[str, str]]:
        """(bucket, key prefix) pairs the worker may read s3:// references from."""
        items = [i.strip().removeprefix("s3://") for i in self.s3_read_allow.split(",") if i.strip()]
        if not items:
            return [(self.s3_bucket, self.s3_input_prefix)]
        return [(bucket, prefix) for bucket, _, prefix in (item.partition("/") for item in items)]

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def consumed_queues(self) -> list[str]:
        return [q.strip() for q in self.worker_queues.split(",") if q.strip()] or [self.queue]

    @property
    def model_backend(self) -> str:
        """The backend that runs the models: `backend`, with auto resolved by the device target."""
        if self.backend != "auto":
            return self.backend
        return "diffusers" if self.device_target == "GPU" else "mindone"

    @property
    def runtime_device_id(self) -> int:
        return self.device_id if self.device_runtime_id < 0 else self.device_runtime_id

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field from `KIQ_<FIELD>`; a malformed value raises SettingsError naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = env.get(env_name(field.name))
            if raw is not None:
                values[field.name] = _coerce(field.name, field.type, raw.strip())
        return cls(**values)

    @classmethod
    def from_url(cls, broker_url: str, **overrides: Any) -> Settings:
        """Settings for a given Redis URL (arq style), everything else default or overridden."""
        return cls(broker_url=broker_url, **overrides)


_NON_NEGATIVE = (
    "device_id", "fetch_max_redirects", "fetch_retries", "s3_retry_s", "time_limit_grace_s", "metrics_port",
    "embed_cache_mb", "decoder_batch_wait_ms", "speed_probe_s", "health_port",
    "shutdown_grace_s", "redis_retry_s", "progress_interval_ms", "submit_replicas", "submit_replica_timeout_ms",
    "quota_submits_per_minute", "quota_queued", "quota_running", "quota_job_mpx_steps", "retention_days",
)  # fmt: skip
_POSITIVE = (
    "result_ttl_s", "presign_ttl_s", "fetch_timeout_s", "fetch_max_bytes", "fetch_max_pixels", "max_deliveries",
    "prior_step_s", "decoder_step_s", "time_limit_factor", "time_limit_min_s", "time_limit_max_s",
    "visibility_timeout_s", "large_pixels", "restart_max", "restart_window_s", "api_port", "api_max_body_bytes",
    "idempotency_ttl_s", "idempotency_pending_s", "webhook_timeout_s", "webhook_retry_s", "decoder_batch",
    "fair_share_max_tenants", "fair_share_poll_s", "job_expires_s",
)  # fmt: skip


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def setting_names() -> list[str]:
    return [env_name(f.name) for f in fields(Settings)]


def _coerce(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    if kind == "bool":
        if raw.lower() not in _BOOLS:
            raise SettingsError(f"{env_name(name)} must be one of {', '.join(sorted(_BOOLS))}, got {raw!r}")
        return _BOOLS[raw.lower()]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)} must be a number, got {raw!r}") from None
    return raw


def _check_backend(backend: str, target: str) -> None:
    if backend not in BACKENDS:
        raise SettingsError(f"{env_name('backend')} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # MindSpore's GPU build does not run mindone's ops; torch here means CUDA or CPU, not NPUs.
    if (backend, target) in (("mindone", "GPU"), ("diffusers", "Ascend")):
        raise SettingsError(
            f"{env_name('backend')}={backend} cannot run on {env_name('device_target')}={target}: "
            "mindone runs on Ascend or CPU, diffusers on GPU or CPU"
        )


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        shown = redisurl.redact(url)
        raise SettingsError(f"{env_name(name)} must be a {'/'.join(schemes)} URL with a host, got {shown!r}")
