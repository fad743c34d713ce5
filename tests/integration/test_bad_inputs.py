"""The bad-input corpus against the real worker: each case is refused at submit or fails with its specific
error; the worker stays up and serves a good job right after. Secrets never appear anywhere."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiq.contract import Job, parse_job
from kiq.errors import JobInvalid
from tests.corpus.bad_inputs import CASES, ROUTES, job
from tests.helpers import http_server
from tests.integration.conftest import SECRET
from tests.integration.jobs import read_object

SUBMIT = [c for c in CASES if c.refused_at_submit]
WORKER = [c for c in CASES if c.error_type]


def test_corpus_is_big_enough():
    assert len(CASES) >= 40 and len(WORKER) >= 15


@pytest.fixture(scope="module")
def web():
    with http_server(ROUTES) as base:
        yield base


@pytest.mark.parametrize("case", SUBMIT, ids=[c.name for c in SUBMIT])
def test_refused_at_submit(case, client, redis_client):
    before = redis_client.dbsize()
    with pytest.raises(JobInvalid) as err:
        client.submit(case.job)
    assert case.refused_at_submit in str(err.value)
    assert redis_client.dbsize() == before  # nothing recorded, nothing enqueued


@pytest.mark.parametrize("case", WORKER, ids=[c.name for c in WORKER])
def test_fails_in_worker_with_a_specific_error_then_serves_a_good_job(case, client, worker, web):
    tls = web.replace("http://", "https://")  # a TLS handshake against a plain HTTP server fails
    data = json.loads(json.dumps(case.job).replace("{web_tls}", tls).replace("{web}", web))
    failed = client.wait(client.submit(data), timeout=60)
    assert failed.state == "FAILURE"
    assert failed.error.type == case.error_type, failed.error
    assert case.message in failed.error.message
    assert client.wait(client.submit(job()), timeout=60).state == "SUCCESS"
    assert worker.poll() is None


small_jobs = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries(
                {
                    "text": st.text(
                        st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30
                    ).filter(str.strip),
                    "weight": st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3),
                }
            ),
            min_size=1,
            max_size=3,
        ),
        "negative_prompt": st.text(max_size=20),
        "height": st.sampled_from([64, 128]),
        "width": st.sampled_from([64, 128]),
        "prior_steps": st.integers(2, 3),
        "decoder_steps": st.integers(1, 3),
        "guidance_scale": st.floats(0, 10),
        "seed": st.none() | st.integers(0, 2**32 - 1),
        "num_images": st.integers(1, 2),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    }
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=small_jobs)
def test_any_accepted_job_round_trips_and_runs(data, client, worker, s3):
    accepted = parse_job(data)
    assert Job.model_validate_json(accepted.model_dump_json()) == accepted
    final = client.wait(client.submit(accepted), timeout=120)
    assert final.state == "SUCCESS", final.error
    assert len(final.result.images) == accepted.num_images
    image, metadata = read_object(s3, final.result.images[-1].uri)
    assert image.size == (accepted.width, accepted.height)
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[accepted.output_format]
    assert int(metadata["kiq-seed"]) == final.result.seed


def test_secrets_never_leak(client, worker, redis_client, s3, settings, logs):
    """After the corpus ran: the AWS secret is in no result, error, log line or object metadata."""
    values = []
    for key in redis_client.scan_iter("*"):
        kind = redis_client.type(key)
        if kind == b"string":
            values.append(redis_client.get(key))
        elif kind == b"hash":
            values.extend(redis_client.hvals(key))
        elif kind == b"list":
            values.extend(redis_client.lrange(key, 0, -1))
    assert values and not [v for v in values if SECRET.encode() in v]
    for path in logs.iterdir():
        assert SECRET not in path.read_text(errors="replace"), path
    listed = s3.list_objects_v2(Bucket=settings.s3_bucket)
    for obj in listed.get("Contents", [])[:50]:
        head = s3.head_object(Bucket=settings.s3_bucket, Key=obj["Key"])
        assert SECRET not in json.dumps(head["Metadata"])
