"""Quotas, expiry and deletion: the pure parts (parsing, sizes, header forms, validation)."""

import pytest

from kiq import expiry
from kiq.contract import parse_job
from kiq.errors import JobExpired, JobInvalid, QuotaExceeded, SettingsError
from kiq.settings import Settings
from producer.client import to_status
from producer.quotas import Quotas, check_size, job_mpx_steps, rate_limit_headers
from producer.tenants import Tenants

JOB = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 512, "width": 512, "decoder_steps": 50}


def test_a_tenants_quotas_default_field_by_field_to_the_settings():
    settings = Settings(quota_queued=10, quota_submits_per_minute=30)
    tenants = Tenants.from_settings(Settings(quota_queued=10, quota_submits_per_minute=30, api_tenants=(
        '{"tenants": [{"key": "k1", "quotas": {"queued": 3, "job_mpx_steps": 2.5}}, {"key": "k2"}]}')))  # fmt: skip
    assert tenants.find("k1").quotas == Quotas(submits_per_minute=30, queued=3, running=0, job_mpx_steps=2.5)
    assert tenants.find("k2").quotas == Quotas.from_settings(settings)


@pytest.mark.parametrize("quotas", ['{"queue": 3}', '{"queued": -1}', '{"queued": 1.5}', '{"running": true}', "[]"])
def test_malformed_quotas_are_refused_at_start(quotas):
    with pytest.raises(SettingsError, match="quotas"):
        Tenants.from_settings(Settings(api_tenants=f'{{"tenants": [{{"key": "k", "quotas": {quotas}}}]}}'))


def test_the_size_quota_counts_pixels_steps_images_and_frames():
    assert job_mpx_steps(parse_job(JOB)) == pytest.approx(0.262144 * 50)
    sweep = {**JOB, "inputs": [*JOB["inputs"], {"text": "a dog", "weight": 0.0}],
             "sweep": {"to": [0.0, 1.0], "frames": 4}}  # fmt: skip
    assert job_mpx_steps(parse_job(sweep)) == pytest.approx(0.262144 * 50 * 4)
    check_size(parse_job(JOB), Quotas(job_mpx_steps=13.2))
    with pytest.raises(QuotaExceeded, match=r"13\.1072 megapixel-steps") as raised:
        check_size(parse_job(JOB), Quotas(job_mpx_steps=13))
    assert raised.value.quota == "job_size" and raised.value.retry_after_s is None


def test_ratelimit_fields_are_structured_field_lists_of_named_policies():
    rate = QuotaExceeded("x", quota="submits_per_minute", limit=60, retry_after_s=17, window_s=60)
    assert rate_limit_headers(rate) == {"Retry-After": "17", "RateLimit-Policy": '"submits_per_minute";q=60;w=60',
                                        "RateLimit": '"submits_per_minute";r=0;t=17'}  # fmt: skip
    busy = QuotaExceeded("x", quota="running", limit=2, retry_after_s=10)
    assert rate_limit_headers(busy)["RateLimit-Policy"] == '"running";q=2;qu="concurrent-requests"'
    assert rate_limit_headers(QuotaExceeded("x", quota="job_size", limit=1.5)) == {}


@pytest.mark.parametrize("value", [0, -5, 30 * 86400 + 1, True, 1.5, "60"])
def test_expires_in_s_is_validated(value):
    with pytest.raises(JobInvalid, match="expires_in_s"):
        parse_job({**JOB, "expires_in_s": value})


def test_expires_in_s_travels_only_when_set():
    assert "expires_in_s" not in parse_job(JOB).model_dump()
    assert parse_job({**JOB, "expires_in_s": 60}).model_dump()["expires_in_s"] == 60
    assert "expires_in_s" not in parse_job({**JOB, "expires_in_s": 60}).settings_summary()


def test_expiry_and_retention_settings_are_checked():
    with pytest.raises(SettingsError, match="KIQ_JOB_EXPIRES_S"):
        Settings(job_expires_s=31 * 86400)
    with pytest.raises(SettingsError, match="KIQ_RETENTION_DAYS"):
        Settings(retention_days=1, job_expires_s=2 * 86400)
    with pytest.raises(SettingsError, match="KIQ_QUOTA_QUEUED"):
        Settings.from_env({"KIQ_QUOTA_QUEUED": "-1"})
    assert Settings(retention_days=1).job_expires_s == 86400


def test_an_expired_job_reads_expired_and_its_header_parses():
    status = to_status("j", "REVOKED", JobExpired("job j did not start before its deadline"))
    assert (status.state, status.error.type, status.done) == ("EXPIRED", "JobExpired", True)
    assert to_status("j", "REVOKED", None).state == "REVOKED"
    assert expiry.deadline_header("1700000000.5") == 1700000000.5
    assert expiry.deadline_header(None) is expiry.deadline_header("soon") is expiry.deadline_header(-1) is None
