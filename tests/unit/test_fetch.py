import pytest

from kiq.errors import FetchError, FetchUnavailable, ImageTooLarge, NotAnImage, ObjectNotFound
from kiq.safe_http import AddressPolicy
from tests.helpers import ALLOWED_HOST, data_uri, http_server, image_bytes
from worker.fetch import Fetcher, FetchLimits, decode_image
from worker.storage import MemoryStorage

LIMITS = FetchLimits(max_bytes=200_000, max_pixels=100_000, timeout_s=2, policy=AddressPolicy.parse(ALLOWED_HOST))


@pytest.fixture
def fetcher():
    storage = MemoryStorage(bucket="inputs")
    storage.put("cat.png", image_bytes(), "image/png", {})
    return Fetcher(storage, LIMITS)


def test_decodes_png_jpeg_webp_to_rgb():
    for fmt in ("PNG", "JPEG", "WEBP"):
        image = decode_image(image_bytes(fmt), "ref", LIMITS.max_pixels)
        assert (image.mode, image.size) == ("RGB", (32, 24))


def test_data_uri(fetcher):
    assert fetcher.image(data_uri(image_bytes("JPEG"), "image/jpeg")).size == (32, 24)


def test_s3_reference(fetcher):
    assert fetcher.image("s3://inputs/cat.png").size == (32, 24)


def test_missing_s3_key(fetcher):
    with pytest.raises(ObjectNotFound, match=r"s3://inputs/nope\.png does not exist"):
        fetcher.image("s3://inputs/nope.png")


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
