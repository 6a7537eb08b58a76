"""Image parts of a chat request (serve/images.py): schemes in any case, errors that say what was wrong without
Python object names, and a truncated image refused before a stream starts."""
import base64
import io

import pytest
from PIL import Image

from vlmux.serve.errors import ApiError
from vlmux.serve.images import ImagePolicy, image_bytes, worker_messages
from vlmux.serve.schema import parse_chat


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("url", ["HTTP://example.com/x.png", "Https://example.com/x.png"])
def test_url_schemes_are_case_insensitive(url):
    with pytest.raises(ApiError) as caught:
        image_bytes(url, ImagePolicy(local_root=None))
    assert caught.value.code == "remote_images_disabled"  # a URL, not a local path


def test_an_unreadable_image_says_what_was_wrong_without_object_names():
    with pytest.raises(ApiError) as caught:
        image_bytes(data_url(b"hello, I am text"), ImagePolicy())
    assert caught.value.status == 400
    assert "not a picture" in caught.value.message
    assert "<" not in caught.value.message and "0x" not in caught.value.message


def test_a_truncated_image_is_refused_before_a_stream_and_left_to_the_worker_otherwise():
    data = jpeg()
    half = data_url(data[: len(data) // 2])
    messages = parse_chat({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": half}}]}]}, 16).messages
    assert worker_messages(messages, ImagePolicy())[0]["content"][0]["image"] == data[: len(data) // 2]
    with pytest.raises(ApiError) as caught:
        worker_messages(messages, ImagePolicy(), decode=True)
    assert caught.value.status == 400 and caught.value.code == "invalid_image"
    assert worker_messages(parse_chat({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(data)}}]}]}, 16).messages, ImagePolicy(), decode=True)
