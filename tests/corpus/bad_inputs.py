"""The bad-input corpus: every entry is refused at submit (JobInvalid, with the message fragment) or
fails in the worker with the named error type. `{web}` is the test web server (allowlisted 127.0.0.2)."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tests.helpers import Reply, data_uri, redirect

GOOD_INPUT = {"text": "a cat", "weight": 0.5}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def noisy_png(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


TRUNCATED_PNG = noisy_png()[:-600]
HTML = b"<!DOCTYPE html><html><body><img src=cat.png></body></html>"

ROUTES: dict[str, Reply] = {
    "/page.png": Reply(200, "image/png", HTML),
    "/bomb.png": Reply(200, "image/png", png_header_only(20000, 20000)),
    "/truncated.png": Reply(200, "image/png", TRUNCATED_PNG),
    "/loop": redirect("/loop"),
    "/to-loopback": redirect("http://127.0.0.1/cat.png"),
    "/to-private": redirect("http://10.0.0.1/cat.png"),
    "/slow.png": Reply(200, "image/png", noisy_png(16), drip_s=0.2),
    "/oversize.png": Reply(200, "image/png", b"\x89PNG" + b"\x00" * 30_000_000),
    "/error.png": Reply(500, "text/plain", b"boom"),
    "/forbidden.png": Reply(403, "text/plain", b"no"),
}


@dataclass(frozen=True)
class Case:
    name: str
    job: Any
    refused_at_submit: str | None = None  # message fragment of the JobInvalid
    error_type: str | None = None  # else: the worker's error type
    message: str = ""


def job(*inputs: dict[str, Any], **settings: Any) -> dict[str, Any]:
    base = {"inputs": list(inputs) or [GOOD_INPUT], "height": 64, "width": 64, "prior_steps": 2,
            "decoder_steps": 2, "seed": 1}  # fmt: skip
    return {**base, **settings}


def image(ref: str) -> dict[str, Any]:
    return job(GOOD_INPUT, {"image": ref, "weight": 0.5})


def submit(name: str, data: Any, message: str) -> Case:
    return Case(name, data, refused_at_submit=message)


def worker(name: str, ref: str, error_type: str, message: str = "") -> Case:
    return Case(name, image(ref), error_type=error_type, message=message)


CASES = [
    # the job's shape and types
    submit("job is a list", [GOOD_INPUT], "job: Input should be a valid dictionary"),
    submit("job is a string", "a cat", "job: Input should be a valid dictionary"),
    submit("inputs missing", {"height": 64}, "inputs: Field required"),
    submit("inputs null", job(inputs=None), "inputs: Input should be a valid list"),
    submit("inputs not a list", job(inputs={"text": "a"}), "inputs: Input should be a valid list"),
    submit("no inputs", job(inputs=[]), "inputs: List should have at least 1 item"),
    submit("too many inputs", job(*[GOOD_INPUT] * 17), "inputs: List should have at most 16 items"),
    submit("input not an object", job("a cat"), "inputs.0: Input should be a valid dictionary"),
    submit("text and image", job({"text": "a", "image": "s3://b/k", "weight": 1}), "exactly one of 'text' or 'image'"),
    submit("neither text nor image", job({"weight": 1}), "exactly one of 'text' or 'image'"),
    submit("weight missing", job({"text": "a"}), "inputs.0.weight: Field required"),
    submit("text is a number", job({"text": 42, "weight": 1}), "inputs.0.text: Input should be a valid string"),
    submit("empty text", job({"text": "", "weight": 1}), "'text' must not be empty"),
    submit(
        "weight is a string", job({"text": "a", "weight": "0.5"}), "inputs.0.weight: Input should be a valid number"
    ),
    submit(
        "weight NaN", job({"text": "a", "weight": float("nan")}), "inputs.0.weight: Input should be a finite number"
    ),
    submit(
        "weight +inf", job({"text": "a", "weight": float("inf")}), "inputs.0.weight: Input should be a finite number"
    ),
    submit("weight -inf", job({"text": "a", "weight": float("-inf")}), "inputs.0.weight: Input should be a finite"),
    submit("weight huge", job({"text": "a", "weight": 1e300}), "inputs.0.weight: Input should be less than or equal"),
    submit("all weights zero", job({"text": "a", "weight": 0}, {"text": "b", "weight": 0}), "must be non-zero"),
    submit("10k-character prompt", job({"text": "cat " * 2500, "weight": 1}), "at most 1000 characters"),
    submit("10k-character negative prompt", job(negative_prompt="x" * 10_000), "negative_prompt: String should have"),
    submit("unknown field", job(steps=50), "steps: Extra inputs are not permitted"),
    # sizes, steps and the other settings
    submit("height as a string", job(height="768"), "height: Input should be a valid integer"),
    submit("height not a multiple of 64", job(height=700), "height: Input should be a multiple of 64"),
    submit("huge size", job(height=20480, width=20480), "Input should be less than or equal to 2048"),
    submit("zero width", job(width=0), "width: Input should be greater than or equal to 64"),
    submit("negative height", job(height=-64), "height: Input should be greater than or equal to 64"),
    submit("float steps", job(decoder_steps=2.5), "decoder_steps: Input should be a valid integer"),
    submit("zero prior steps", job(prior_steps=0), "prior_steps: Input should be greater than or equal to 2"),
    submit("one prior step (the UnCLIP scheduler needs two)", job(prior_steps=1), "greater than or equal to 2"),
    submit("a million decoder steps", job(decoder_steps=10**6), "decoder_steps: Input should be less than or equal"),
    submit("guidance NaN", job(guidance_scale=float("nan")), "guidance_scale: Input should be a finite number"),
    submit("negative guidance", job(prior_guidance_scale=-4), "prior_guidance_scale: Input should be greater"),
    submit("100 images", job(num_images=100), "num_images: Input should be less than or equal to 8"),
    submit("negative seed", job(seed=-1), "seed: Input should be greater than or equal to 0"),
    submit("seed over 32 bits", job(seed=2**40), "seed: Input should be less than or equal to 4294967295"),
    submit("gif output", job(output_format="gif"), "output_format: Input should be 'png', 'jpeg' or 'webp'"),
    # sweeps and animations
    submit("sweep without keyframes or to", job(sweep={"frames": 4}), "sweep: give exactly one of 'keyframes' or 'to'"),
    submit("sweep with both", job(sweep={"frames": 4, "to": [1.0], "keyframes": [[1.0]]}), "exactly one of"),
    submit("sweep of one frame", job(sweep={"frames": 1, "to": [1.0]}), "sweep.frames: Input should be greater"),
    submit("sweep of 10k frames", job(sweep={"frames": 10_000, "to": [1.0]}), "sweep.frames: Input should be less"),
    submit(
        "sweep keyframe too short",
        job(GOOD_INPUT, GOOD_INPUT, sweep={"frames": 4, "to": [1.0]}),
        "sweep: to: keyframe 0 has 1 weights; give one per input (2)",
    ),
    submit(
        "sweep keyframe too long",
        job(sweep={"frames": 4, "keyframes": [[1.0], [1.0, 2.0]]}),
        "sweep: keyframes: keyframe 1 has 2 weights",
    ),
    submit("sweep weight NaN", job(sweep={"frames": 4, "to": [float("nan")]}), "sweep.to.0: Input should be a finite"),
    submit("sweep weight inf", job(sweep={"frames": 4, "keyframes": [[float("inf")]]}), "should be a finite number"),
    submit("sweep through all-zero weights", job(sweep={"frames": 3, "to": [-0.5]}), "every weight of frame 1 is zero"),
    submit("sweep of 2 images each", job(num_images=2, sweep={"frames": 3, "to": [1.0]}), "num_images must be 1"),
    submit(
        "sweep with more keyframes than frames",
        job(sweep={"frames": 2, "keyframes": [[1.0], [2.0]]}),
        "sweep: frames: 2 frames cannot show 3 keyframes",
    ),
    submit("sweep easing unknown", job(sweep={"frames": 3, "to": [1.0], "easing": "bounce"}), "sweep.easing"),
    submit("animation without a sweep", job(animation={"format": "gif"}), "animation: needs a sweep"),
    submit(
        "animation as avi",
        job(sweep={"frames": 3, "to": [1.0]}, animation={"format": "avi"}),
        "animation.format: Input should be 'gif', 'webp' or 'mp4'",
    ),
    submit("animation at 0 fps", job(sweep={"frames": 3, "to": [1.0]}, animation={"fps": 0}), "animation.fps"),
    # image references refused from their text alone
    submit("ftp scheme", image("ftp://example.com/cat.png"), "unsupported image reference scheme 'ftp'"),
    submit("file scheme", image("file:///etc/passwd"), "unsupported image reference scheme 'file'"),
    submit("javascript scheme", image("javascript:alert(1)"), "unsupported image reference scheme 'javascript'"),
    submit("gopher scheme", image("gopher://127.0.0.1:6379/_FLUSHALL"), "unsupported image reference scheme"),
    submit("bare path", image("/etc/passwd"), "unsupported image reference scheme ''"),
    submit("s3 without a key", image("s3://bucket"), "s3 reference must be s3://bucket/key"),
    submit("http without a host", image("http:///cat.png"), "image URL has no host"),
    submit("URL port out of range", image("http://example.com:99999/cat.png"), "image URL has an invalid port"),
    submit("URL port not a number", image("http://example.com:http/cat.png"), "image URL has an invalid port"),
    submit("URL port 0", image("http://example.com:0/cat.png"), "image URL has an invalid port (0)"),
    submit("URL host label over 63 characters", image(f"http://{'a' * 64}.example.com/cat.png"), "longer than 63"),
    submit("URL host over 253 characters", image("http://" + "a." * 127 + "com/cat.png"), "longer than 253"),
    submit("URL host with an empty label", image("http://example..com/cat.png"), "host has an empty label"),
    submit("URL host IDNA cannot encode", image("http://\u05d0a.example.com/cat.png"), "cannot be IDNA-encoded"),
    submit("URL host percent-encoded", image("http://ex%41mple.com/cat.png"), "not allowed in a DNS name"),
    submit("URL with a broken IPv6 literal", image("http://[::1/cat.png"), "image reference is not a valid URL"),
    submit(
        "webhook port out of range",
        job(webhook_url="https://example.com:70000/hook"),
        "webhook_url: webhook_url has an invalid port",
    ),
    submit(
        "webhook host label over 63 characters",
        job(webhook_url=f"https://{'h' * 64}.example.com/hook"),
        "webhook_url: webhook_url host has a label longer than 63",
    ),
    submit("data URI of HTML", image("data:text/html;base64,PGh0bWw+"), "data URI must look like data:image/"),
    submit("data URI not base64", image("data:image/png;base64,@@@@"), "not valid base64"),
    submit("empty data URI", image("data:image/png;base64,"), "payload is empty"),
    submit("data URI over 4 MiB", image(data_uri(b"\x00" * (5 * 1024 * 1024))), "over 4194304 bytes"),
    # references that only the worker can judge
    worker("data URI of text", data_uri(b"just some text, not pixels"), "NotAnImage", "is not an image"),
    worker("truncated PNG (data URI)", data_uri(TRUNCATED_PNG), "NotAnImage", "could not be decoded"),
    worker("truncated PNG (URL)", "{web}/truncated.png", "NotAnImage", "could not be decoded"),
    worker("20000x20000 PNG bomb", "{web}/bomb.png", "ImageTooLarge", "400000000 pixels"),
    worker("PNG bomb as data URI", data_uri(png_header_only(8000, 8000)), "ImageTooLarge", "8000x8000, over the"),
    worker("HTML served as image/png", "{web}/page.png", "NotAnImage", "got an HTML page"),
    worker("redirect loop", "{web}/loop", "FetchError", "too many redirects"),
    worker("redirect to 127.0.0.1", "{web}/to-loopback", "BlockedAddress", "127.0.0.1, a loopback address"),
    worker("redirect to 10.0.0.1", "{web}/to-private", "BlockedAddress", "10.0.0.1, a private address"),
    worker("URL to 127.0.0.1", "http://127.0.0.1:6379/cat.png", "BlockedAddress", "a loopback address"),
    worker("URL to localhost", "http://localhost/cat.png", "BlockedAddress", "a loopback address"),
    worker("URL to 10.0.0.1", "http://10.0.0.1/cat.png", "BlockedAddress", "a private address"),
    worker("URL to the metadata service", "http://169.254.169.254/latest/meta-data/", "BlockedAddress", "link-local"),
    worker("URL to [::1]", "http://[::1]:8080/cat.png", "BlockedAddress", "a loopback address"),
    worker("missing s3 key", "s3://kiq-test/inputs/no/such/key.png", "ObjectNotFound", "does not exist or is not"),
    worker("s3 bucket outside the fence", "s3://kiq-no-such-bucket/cat.png", "ReferenceNotAllowed", "outside what"),
    worker("s3 key outside the input prefix", "s3://kiq-test/jobs/x/0.png", "ReferenceNotAllowed", "outside what"),
    worker("s3 key climbing out", "s3://kiq-test/inputs/../jobs/x/0.png", "ReferenceNotAllowed", "outside what"),
    worker("TLS to a plain HTTP server", "{web_tls}/cat.png", "FetchUnavailable", "TLS"),
    worker("slow-loris server", "{web}/slow.png", "FetchUnavailable", "time"),
    worker("body over the byte cap", "{web}/oversize.png", "ImageTooLarge", "over the"),
    worker("HTTP 500", "{web}/error.png", "FetchUnavailable", "answered HTTP 500"),
    worker("HTTP 403", "{web}/forbidden.png", "FetchError", "answered HTTP 403"),
    worker("connection refused", "http://127.0.0.2:9/cat.png", "FetchUnavailable", "could not connect"),
]
