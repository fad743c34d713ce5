import base64
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from kiq.contract import MAX_INPUTS, Job, parse_job, seed_for
from kiq.errors import JobInvalid


def png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SEED_JOB = {
    "inputs": [
        {"text": "a cat", "weight": 0.3},
        {"image": "https://example.com/cat.png", "weight": 0.3},
        {"image": "s3://bucket/starry.jpeg", "weight": 0.4},
    ],
    "negative_prompt": "",
    "height": 768,
    "width": 768,
    "prior_steps": 25,
    "decoder_steps": 100,
    "prior_guidance_scale": 4.0,
    "guidance_scale": 4.0,
    "seed": 42,
    "num_images": 1,
    "output_format": "png",
}


def test_seed_example_is_valid_and_round_trips():
    job = parse_job(SEED_JOB)
    assert job.model_dump(mode="json") == {**SEED_JOB, "priority": 5}


def test_defaults_follow_the_pipelines():
    job = parse_job({"inputs": [{"text": "a cat", "weight": 1}]})
    assert (job.height, job.width, job.prior_steps, job.decoder_steps) == (768, 768, 25, 100)
    assert (job.prior_guidance_scale, job.guidance_scale, job.num_images) == (4.0, 4.0, 1)
    assert job.seed is None and job.output_format == "png" and job.negative_prompt == ""


def test_data_uri_accepted():
    assert parse_job({"inputs": [{"image": png_data_uri(), "weight": 1}]}).inputs[0].image.startswith("data:")


def _with(**changes):
    return {**SEED_JOB, **changes}


def _one(**item):
    return _with(inputs=[item])


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (_with(inputs=[]), "inputs: List should have at least 1 item"),
        (_with(inputs=[{"text": "x", "weight": 1}] * (MAX_INPUTS + 1)), "inputs: List should have at most 16"),
        (_one(text="a", image="s3://b/k", weight=1), "inputs.0: give exactly one of 'text' or 'image'"),
        (_one(weight=1), "inputs.0: give exactly one of 'text' or 'image'"),
        (_one(text="   ", weight=1), "'text' must not be empty"),
        (_one(text="a", weight=float("nan")), "inputs.0.weight: Input should be a finite number"),
        (_one(text="a", weight=float("inf")), "inputs.0.weight: Input should be a finite number"),
        (_one(text="a", weight=1e9), "inputs.0.weight: Input should be less than or equal to 100"),
        (_one(text="a", weight="heavy"), "inputs.0.weight: Input should be a valid number"),
        (_with(inputs=[{"text": "a", "weight": 0}, {"text": "b", "weight": 0.0}]), "weight must be non-zero"),
        (_one(text="a" * 1001, weight=1), "inputs.0.text: String should have at most 1000 characters"),
        (_one(image="ftp://host/x.png", weight=1), "unsupported image reference scheme 'ftp'"),
        (_one(image="/etc/passwd", weight=1), "unsupported image reference scheme ''"),
        (_one(image="s3://bucket-only", weight=1), "s3 reference must be s3://bucket/key"),
        (_one(image="https:///nohost.png", weight=1), "image URL has no host"),
        (_one(image="http://host:99999/x.png", weight=1), "inputs.0.image: image URL has an invalid port (Port out"),
        (_one(image="http://host:abc/x.png", weight=1), "image URL has an invalid port (Port could not be cast"),
        (_one(image="http://host:0/x.png", weight=1), "image URL has an invalid port (0)"),
        (_one(image=f"http://{'a' * 64}.example.com/x.png", weight=1), "host has a label longer than 63 characters"),
        (_one(image="http://" + "abc." * 63 + "com/x.png", weight=1), "host is longer than 253 characters"),
        (_one(image="http://example..com/x.png", weight=1), "host has an empty label"),
        (_one(image="http://.example.com/x.png", weight=1), "host has an empty label"),
        (_one(image="http://\u05d0a.example.com/x.png", weight=1), "host cannot be IDNA-encoded"),
        (_one(image="http://ex%41mple.com/x.png", weight=1), "host has characters not allowed in a DNS name"),
        (_one(image="http://[::1/x.png", weight=1), "image reference is not a valid URL (Invalid IPv6 URL)"),
        (_with(webhook_url="https://example.com:70000/hook"), "webhook_url: webhook_url has an invalid port"),
        (_with(webhook_url=f"https://{'h' * 64}.example.com/hook"), "webhook_url: webhook_url host has a label longer"),
        (_with(webhook_url="https://a..b/hook"), "webhook_url: webhook_url host has an empty label"),
        (_with(webhook_url="ftp://example.com/hook"), "webhook_url must be an http(s) URL with a host"),
        (_one(image="data:text/html;base64,PGh0bWw+", weight=1), "data URI must look like data:image/"),
        (_one(image="data:image/png;base64,%%%notbase64", weight=1), "not valid base64"),
        (_one(image="data:image/png;base64,", weight=1), "payload is empty"),
        (_with(height=700), "height: Input should be a multiple of 64"),
        (_with(width=0), "width: Input should be greater than or equal to 64"),
        (_with(width=4096), "width: Input should be less than or equal to 2048"),
        (_with(prior_steps=1), "prior_steps: Input should be greater than or equal to 2"),
        (_with(decoder_steps=10_000), "decoder_steps: Input should be less than or equal to 500"),
        (_with(guidance_scale=-1), "guidance_scale: Input should be greater than or equal to 0"),
        (_with(prior_guidance_scale=float("nan")), "prior_guidance_scale: Input should be a finite number"),
        (_with(num_images=0), "num_images: Input should be greater than or equal to 1"),
        (_with(num_images=9), "num_images: Input should be less than or equal to 8"),
        (_with(seed=-1), "seed: Input should be greater than or equal to 0"),
        (_with(seed=2**32), "seed: Input should be less than or equal to 4294967295"),
        (_with(output_format="gif"), "output_format: Input should be 'png', 'jpeg' or 'webp'"),
        (_with(negative_prompt="n" * 1001), "negative_prompt: String should have at most 1000 characters"),
        (_with(steps=10), "steps: Extra inputs are not permitted"),
        ([1, 2], "job: Input should be a valid dictionary"),
    ],
)
def test_invalid_jobs_name_field_and_reason(job, message):
    with pytest.raises(JobInvalid) as err:
        parse_job(job)
    assert message in str(err.value)
    assert str(err.value).startswith("invalid job: ")


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        "https://example.com:8443/cat.png",
        "https://example.com./cat.png",  # fully qualified, with the root's empty label
        "https://bücher.example/cat.png",  # IDNA: xn--bcher-kva
        "https://my_bucket.s3.example.com/cat.png",
        f"https://{'a' * 63}.example.com/cat.png",
        "https://" + "abc." * 62 + "com/cat.png",  # 251 characters
        "http://127.0.0.2:9/cat.png",
        "http://[::1]:8080/cat.png",
        "http://[2001:db8::1]/cat.png",
        "https://example.com:/cat.png",  # an empty port is the default one
    ],
)
def test_usable_urls_are_accepted_for_images_and_webhooks(url):
    job = parse_job(_with(inputs=[{"image": url, "weight": 1}], webhook_url=url))
    assert job.inputs[0].image == url and job.webhook_url == url


def test_seed_is_kept_or_derived_stably_from_the_job_id():
    with_seed, without = parse_job(SEED_JOB), parse_job(_with(seed=None))
    assert seed_for(with_seed, "any") == 42
    derived = seed_for(without, "job-1")
    assert derived == seed_for(without, "job-1") != seed_for(without, "job-2")
    assert 0 <= derived < 2**32


texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=50).filter(lambda s: s.strip())
weights = st.floats(-100, 100, allow_nan=False).filter(lambda w: w != 0)
jobs = st.fixed_dictionaries(
    {
        "inputs": st.lists(st.fixed_dictionaries({"text": texts, "weight": weights}), min_size=1, max_size=4),
        "height": st.sampled_from([64, 128, 768, 2048]),
        "seed": st.none() | st.integers(0, 2**32 - 1),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    }
)


@given(jobs)
def test_accepted_jobs_round_trip_through_json(data):
    job = parse_job(data)
    assert Job.model_validate_json(job.model_dump_json()) == job
