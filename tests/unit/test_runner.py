"""The runner with in-memory storage and a fake pipeline pair: stage order, keys, metadata, cancel."""

import io
import json

import pytest
from PIL import Image

from kiq.contract import parse_job
from kiq.errors import NotAnImage, PipelineError
from kiq.settings import Settings
from tests.helpers import data_uri, image_bytes
from worker.runner import JobCancelled, JobContext, Runner
from worker.storage import MemoryStorage


class FakePipelines:
    def caches(self):
        return {}

    def memory_bytes(self):
        return float("nan")

    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def interpolate(self, conditions, weights, params, generator, on_step):
        self.calls.append(("interpolate", [type(c).__name__ for c in conditions], list(weights), params))
        on_step(params.steps, params.steps)
        return "embeds", "negative"

    def decode(self, embeds, negative, params, generator, on_step):
        if self.fail:
            raise RuntimeError("The kernel Foo unregistered.")
        for step in range(1, params.steps + 1):
            on_step(step, params.steps)
        return [Image.new("RGB", (params.width, params.height), (1, 2, 3))] * 2

    def decode_batch(self, rows, params, on_step):
        """Like the real one: rows drop out when on_step stops naming them; stop when none is left."""
        live = list(range(len(rows)))
        for step in range(1, params.steps + 1):
            wanted = set(on_step(step, params.steps))
            live = [r for r in live if r in wanted]
            self.calls.append(("step", step, tuple(live)))
            if not live:
                return {}
        return {r: Image.new("RGB", (params.width, params.height), (r, 2, 3)) for r in live}


def make_runner(pipelines):
    settings = Settings(device_target="CPU", s3_bucket="out", s3_prefix="jobs/")
    return Runner(settings, storage=MemoryStorage(bucket="out"), pipelines=pipelines)


def context(events, cancel_after=None):
    def cancelled():
        return cancel_after is not None and len(events) >= cancel_after

    return JobContext(job_id="job-1", report=events.append, cancelled=cancelled)


JOB = {
    "inputs": [{"text": "a cat", "weight": 0.5}, {"image": data_uri(image_bytes()), "weight": 0.5}],
    "height": 64,
    "width": 128,
    "decoder_steps": 3,
    "num_images": 2,
    "output_format": "webp",
}


def test_runs_stages_in_order_and_uploads_by_job_id():
    pipes, events = FakePipelines(), []
    runner = make_runner(pipes)
    result = runner.run(parse_job(JOB), context(events))
    assert pipes.calls[0][1:3] == (["str", "Image"], [0.5, 0.5])
    assert [(e.stage, e.step, e.total) for e in events] == [
        ("fetch", 0, 2), ("fetch", 1, 2), ("prior", 0, 25), ("prior", 25, 25), ("prior", 25, 25),
        ("decoder", 1, 3), ("decoder", 2, 3), ("decoder", 3, 3), ("upload", 0, 2),
    ]  # fmt: skip
    assert [i.uri for i in result.images] == ["s3://out/jobs/job-1/0.webp", "s3://out/jobs/job-1/1.webp"]
    assert set(result.timings) == {"fetch", "prior", "decoder", "encode", "upload"}
    assert result.device == "cpu:0"
    body, content_type, metadata = runner.storage.objects[("out", "jobs/job-1/0.webp")]
    assert content_type == "image/webp" and Image.open(io.BytesIO(body)).format == "WEBP"
    assert metadata["kiq-seed"] == str(result.seed)
    assert json.loads(metadata["kiq-settings"])["width"] == 128


def test_rerun_overwrites_instead_of_duplicating():
    runner = make_runner(FakePipelines())
    runner.run(parse_job(JOB), context([]))
    runner.run(parse_job(JOB), context([]))
    assert len(runner.storage.objects) == 2


def test_cancel_stops_between_steps():
    events = []
    with pytest.raises(JobCancelled):
        make_runner(FakePipelines()).run(parse_job(JOB), context(events, cancel_after=6))
    assert events[-1].stage == "decoder"


def test_framework_errors_become_pipeline_errors():
    with pytest.raises(PipelineError, match="RuntimeError: The kernel Foo unregistered"):
        make_runner(FakePipelines(fail=True)).run(parse_job(JOB), context([]))


def test_bad_reference_fails_before_the_model_runs():
    pipes = FakePipelines()
    job = {**JOB, "inputs": [{"image": data_uri(b"GIF89a-not-really"), "weight": 1}]}
    with pytest.raises(NotAnImage):
        make_runner(pipes).run(parse_job(job), context([]))
    assert pipes.calls == []


BATCH_JOB = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "decoder_steps": 4}


def batch_context(job_id, cancel_at_step=None):
    events = []

    def cancelled():
        decoder_steps = [e for e in events if e.stage == "decoder"]
        return cancel_at_step is not None and len(decoder_steps) >= cancel_at_step

    return JobContext(job_id=job_id, report=events.append, cancelled=cancelled)


def test_a_cancelled_job_leaves_the_batch_and_an_unknown_error_fails_only_its_own_job():
    pipes = FakePipelines()
    runner = make_runner(pipes)
    broken = parse_job({**BATCH_JOB, "inputs": [{"image": "data:image/png;base64,AAAA", "weight": 1.0}]})
    runner.fetcher.image = lambda ref, deadline=None: (_ for _ in ()).throw(KeyError("surprise"))
    items = [(parse_job(BATCH_JOB), batch_context("a")), (broken, batch_context("b")),
             (parse_job(BATCH_JOB), batch_context("c", cancel_at_step=2))]  # fmt: skip
    outcomes = runner.run_batch(items)
    assert [type(o).__name__ for o in outcomes] == ["JobResult", "PipelineError", "JobCancelled"]
    assert "KeyError" in str(outcomes[1])
    # rows 0 and 1 of the decoder batch are jobs a and c; c drops out after step 2, a runs to the end
    assert [c for c in pipes.calls if c[0] == "step"] == [("step", 1, (0, 1)), ("step", 2, (0, 1)),
                                                          ("step", 3, (0,)), ("step", 4, (0,))]  # fmt: skip


def test_a_batch_stops_when_every_job_is_cancelled():
    pipes = FakePipelines()
    items = [(parse_job(BATCH_JOB), batch_context(n, cancel_at_step=1)) for n in "ab"]
    outcomes = make_runner(pipes).run_batch(items)
    assert [type(o).__name__ for o in outcomes] == ["JobCancelled", "JobCancelled"]
    assert [c for c in pipes.calls if c[0] == "step"] == [("step", 1, (0, 1)), ("step", 2, ())]
