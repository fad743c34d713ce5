import struct
import time

import pytest

from kiq.errors import FetchError, FetchUnavailable, ImageTooLarge, NotAnImage, ObjectNotFound
from kiq.safe_http import AddressPolicy
from tests.helpers import ALLOWED_HOST, Reply, data_uri, http_server, image_bytes
from worker import fetch
from worker.fetch import Fetcher, FetchLimits, decode_image
from worker.storage import MemoryStorage

LIMITS = FetchLimits(max_bytes=200_000, max_pixels=100_000, timeout_s=2, policy=AddressPolicy.parse(ALLOWED_HOST))


@pytest.fixture
def fetcher():
    storage = MemoryStorage()
    storage.put("inputs/cat.png", image_bytes(), "image/png", {})
    return Fetcher(storage, LIMITS)


def test_decodes_png_jpeg_webp_to_rgb():
    for fmt in ("PNG", "JPEG", "WEBP"):
        image = decode_image(image_bytes(fmt), "ref", LIMITS.max_pixels)
        assert (image.mode, image.size) == ("RGB", (32, 24))


def test_data_uri(fetcher):
    assert fetcher.image(data_uri(image_bytes("JPEG"), "image/jpeg")).size == (32, 24)


def test_s3_reference(fetcher):
    assert fetcher.image("s3://kiq/inputs/cat.png").size == (32, 24)


def test_missing_s3_key(fetcher):
    with pytest.raises(ObjectNotFound, match=r"s3://kiq/inputs/nope\.png does not exist"):
        fetcher.image("s3://kiq/inputs/nope.png")


def test_html_is_not_an_image(fetcher):
    with pytest.raises(NotAnImage, match="got an HTML page"):
        fetcher.image(data_uri(b"<!DOCTYPE html><html><body>hi</body></html>"))


def test_truncated_png():
    with pytest.raises(NotAnImage, match="could not be decoded"):
        decode_image(image_bytes(size=(64, 64))[:-40], "truncated.png", LIMITS.max_pixels)


def test_pixel_cap_applies_before_decoding():
    # A 2000x2000 PNG of one colour is a few KB: the cap must refuse it from the header alone.
    small_file = image_bytes(size=(2000, 2000))
    assert len(small_file) < 50_000
    with pytest.raises(ImageTooLarge, match="2000x2000, over the 100000-pixel cap"):
        decode_image(small_file, "bomb.png", LIMITS.max_pixels)


def test_byte_cap(fetcher):
    big = Fetcher(MemoryStorage(), FetchLimits(max_bytes=20, max_pixels=10**6, timeout_s=1))
    with pytest.raises(ImageTooLarge, match="over the 20-byte cap"):
        big.image(data_uri(image_bytes()))


def test_http_success_404_html_and_refused(fetcher):
    routes = {
        "/ok.png": (200, "image/png", image_bytes()),
        "/page": (200, "image/png", b"<html><body>not an image</body></html>"),
    }
    with http_server(routes) as base:
        assert fetcher.image(f"{base}/ok.png").size == (32, 24)
        with pytest.raises(FetchError, match="answered HTTP 404"):
            fetcher.image(f"{base}/missing.png")
        with pytest.raises(NotAnImage, match="HTML"):
            fetcher.image(f"{base}/page")
    with pytest.raises(FetchUnavailable, match="could not connect"):
        fetcher.image(base + "/ok.png")  # the server is gone: refused, transient


def test_undecodable_bytes_are_not_echoed_back(fetcher):
    secret = b"SECRET-CONTENT of an object the submitter may not own"
    with pytest.raises(NotAnImage, match=r"is not an image \(not a format kiq can decode\)") as err:
        fetcher.image(data_uri(secret))
    assert "SECRET" not in str(err.value) and str(len(secret)) not in str(err.value)


class BrokenStorage(MemoryStorage):
    def read(self, bucket, key, max_bytes, timeout_s=None):
        raise RuntimeError("the client library fell over")


def test_any_other_exception_becomes_a_fetch_error(caplog):
    fetcher = Fetcher(BrokenStorage(), LIMITS)
    with pytest.raises(FetchError, match=r"could not read s3://kiq/inputs/x\.png: RuntimeError: the client") as err:
        fetcher.image("s3://kiq/inputs/x.png")
    assert not isinstance(err.value, FetchUnavailable)
    assert "could not read s3://kiq/inputs/x.png" in caplog.text and "Traceback" in caplog.text
    with pytest.raises(FetchError, match="IndexError"):
        fetcher.raw("data:image/png;base64")  # no comma: the contract refuses it, a raw message may not


def test_decoder_crash_becomes_a_fetch_error(fetcher, monkeypatch):
    def crash(data, ref, max_pixels):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(fetch, "decode_image", crash)
    with pytest.raises(FetchError, match=r"could not read s3://kiq/inputs/cat\.png: error: unpack requires"):
        fetcher.image("s3://kiq/inputs/cat.png")


def test_kiq_errors_pass_the_boundary_unchanged(fetcher):
    with pytest.raises(ObjectNotFound):
        fetcher.raw("s3://kiq/inputs/nope.png")


def test_bad_port_and_bad_host_are_fetch_errors(fetcher):
    with pytest.raises(FetchError, match="Port out of range"):
        fetcher.image(f"http://{ALLOWED_HOST}:99999/x.png")
    with pytest.raises(FetchError, match="not a valid host name"):
        fetcher.image(f"http://{'a' * 64}.example/x.png")


def test_deadline_already_passed_reads_nothing(fetcher, monkeypatch):
    monkeypatch.setattr(fetch.safe_http, "get", lambda *a, **k: pytest.fail("fetched after the deadline"))
    with pytest.raises(FetchUnavailable, match="no time left to read"):
        fetcher.image(f"http://{ALLOWED_HOST}/x.png", deadline=time.monotonic() - 1)


def test_deadline_reaches_the_http_get():
    slow = FetchLimits(max_bytes=200_000, max_pixels=100_000, timeout_s=30, policy=LIMITS.policy)
    with http_server({"/slow.png": Reply(body=image_bytes(), drip_s=0.05)}) as base:
        started = time.monotonic()
        with pytest.raises(FetchUnavailable, match=r"0\.5 s time limit"):
            Fetcher(MemoryStorage(), slow).image(f"{base}/slow.png", deadline=started + 0.5)
        assert time.monotonic() - started < 1.0


def test_retries_do_not_sleep_past_the_deadline(monkeypatch):
    deadlines = []

    def unavailable(url, limits, policy, deadline=None):
        deadlines.append(deadline)
        raise FetchUnavailable("busy")

    monkeypatch.setattr(fetch.safe_http, "get", unavailable)
    patient = Fetcher(MemoryStorage(), FetchLimits(200_000, 100_000, 2, retries=10, policy=LIMITS.policy))
    started = time.monotonic()
    deadline = started + 0.8
    with pytest.raises(FetchUnavailable, match=r"busy|no time left"):
        patient.image(f"http://{ALLOWED_HOST}/x.png", deadline=deadline)
    # Ten retries of backoff would take seconds: it gave up rather than sleep past the deadline.
    assert time.monotonic() - started < 0.9
    assert len(deadlines) >= 1 and set(deadlines) == {deadline}
