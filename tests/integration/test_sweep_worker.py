"""Sweeps through the real parts: the CLI, Redis, the session's mindone worker process and the S3 server. Frames
are listed while they land, the animation comes at the end, `kiq download` saves any job's outputs, and a
cancelled sweep keeps the frames it uploaded."""

import io
import json
import time

import pytest

from tests.helpers import kiq_cli
from tests.integration.jobs import image_input, read_object, tiny_job

SWEEP = tiny_job({"text": "a cat", "weight": 1.0}, image_input(0.0), prior_steps=2, decoder_steps=2,
                 sweep={"to": [0.0, 1.0], "frames": 3, "easing": "ease-in-out"},
                 animation={"format": "mp4", "fps": 6, "boomerang": True})  # fmt: skip


def test_cli_sweep_lists_frames_then_downloads_frames_and_animation(env, worker, s3, settings, tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    done = kiq_cli(env, "submit", str(path), "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    job_id, status_json = done.stdout.split("\n", 1)
    result = json.loads(status_json)["result"]
    prefix = f"s3://{settings.s3_bucket}/{settings.s3_prefix}{job_id}"
    assert [i["uri"] for i in result["images"]] == [f"{prefix}/{k}.png" for k in range(3)]
    assert result["animation"]["uri"] == f"{prefix}/animation.mp4" and result["animation"]["format"] == "mp4"
    assert result["frame_weights"] == [[1.0, 0.0], pytest.approx([0.5, 0.5]), [0.0, 1.0]]
    assert [line for line in done.stderr.splitlines() if line.startswith("frame ")] == [
        f"frame {k} done: {prefix}/{k}.png" for k in range(3)]  # fmt: skip
    frame, metadata = read_object(s3, result["images"][1]["uri"])
    assert frame.size == (64, 64) and metadata["kiq-frame"] == "1"

    saved = kiq_cli(env, "download", job_id, str(tmp_path / "out"))
    assert saved.returncode == 0, saved.stderr
    names = sorted(p.rsplit("/", 1)[-1] for p in saved.stdout.split())
    assert names == ["0.png", "1.png", "2.png", "animation.mp4"]
    mp4 = (tmp_path / "out" / "animation.mp4").read_bytes()
    assert mp4[4:8] == b"ftyp"  # an MP4 container
    import av

    with av.open(io.BytesIO(mp4)) as container:
        assert len(list(container.decode(video=0))) == 4  # boomerang: 0 1 2 1

    plain = kiq_cli(env, "submit", "-", "--wait", stdin=json.dumps(tiny_job(decoder_steps=2)))
    plain_id = plain.stdout.split("\n", 1)[0]
    saved = kiq_cli(env, "download", plain_id, str(tmp_path / "plain"))
    assert saved.returncode == 0 and saved.stdout.split() == [str(tmp_path / "plain" / "0.png")]


def test_a_cancelled_sweep_ends_revoked_and_keeps_its_frames_listed(client, worker, s3):
    job_id = client.submit({**SWEEP, "sweep": {"to": [0.0, 1.0], "frames": 12}, "animation": {"format": "gif"}})
    seen_in_progress = []
    deadline = time.monotonic() + 180
    while not seen_in_progress and time.monotonic() < deadline:
        status = client.status(job_id)
        if status.state == "PROGRESS" and status.progress.frames:
            seen_in_progress = status.progress.frames
        time.sleep(0.05)
    assert seen_in_progress, "no PROGRESS status listed a frame"
    client.cancel(job_id)
    final = client.wait(job_id, timeout=60)
    assert final.state == "REVOKED" and final.error.type == "Cancelled"
    assert len(seen_in_progress) <= len(final.frames) < 12
    for k, ref in enumerate(final.frames):
        assert ref.uri.endswith(f"/{job_id}/{k}.png")
        read_object(s3, ref.uri)  # uploaded
