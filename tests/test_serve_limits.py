"""`vlmux serve`'s limits per chat request (serve/limits.py, and the worker's context check), with a tiny Qwen2-VL
in a real worker behind a served child: images per request, pixels of all images together, characters of text and
prompt tokens plus max_tokens against the model's 1,024 positions each answer 400 naming the limit and the flag that
changes it, and the next request is answered."""
import base64
import io
import subprocess
import sys

import openai
import pytest
from PIL import Image

from vlmux.serve.limits import RequestLimits
from vlmux.testing.server import served

KEY = "limits-key-1234"


@pytest.fixture(scope="module")
def client(tiny_qwen):
    with served("--model", f"qwen={tiny_qwen}", "--device", "cpu", "--api-key", KEY, "--max-tokens", "8",
                "--max-images", "2", "--max-request-pixels", "5000", "--max-chars", "600") as (_, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def images(*sizes, colour: str = "red") -> list[dict]:
    """One user message of solid PNGs of these sizes and a question."""
    parts = []
    for size in sizes:
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is in the pictures?"}]}]


def refused(client, messages, **options) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="qwen", messages=messages, **options)
    answered = client.chat.completions.create(model="qwen", messages=images((48, 40), colour="blue"))
    assert answered.choices[0].message.content  # the next request is served
    return error.value


def test_each_limit_answers_400_naming_its_flag_and_the_next_request_is_served(client):
    assert client.chat.completions.create(model="qwen", messages=images((48, 40), (48, 40))).choices[0].message.content
    many = refused(client, images((8, 8), (8, 8), (8, 8)))
    assert many.body["code"] == "too_many_images" and "3 images" in many.message and "--max-images" in many.message
    pixels = refused(client, images((60, 60), (60, 50)))  # 6,600 pixels together; each alone is under the limit
    assert pixels.body["code"] == "too_many_pixels" and "6,600" in pixels.message
    assert "--max-request-pixels" in pixels.message
    text = refused(client, [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "y" * 201}])
    assert text.body["code"] == "too_much_text" and "601" in text.message and "--max-chars" in text.message
    context = refused(client, images((48, 40)), max_tokens=1020)
    assert context.body["code"] == "context_length_exceeded" and "context length of 1,024 tokens" in context.message
    assert "max_tokens 1,020" in context.message and "--max-tokens" in context.message
    whole = refused(client, images((48, 40)), max_tokens=1024)  # the pool refuses it before a worker sees it
    assert whole.status_code == 400 and whole.body["code"] == "context_length_exceeded" and "1024" in whole.message
    with pytest.raises(openai.APIError, match="context length"):  # streamed: the error event, then the stream ends
        list(client.chat.completions.create(model="qwen", messages=images((48, 40)), max_tokens=1020,
                                            stream=True))


def test_a_limit_that_is_not_a_positive_whole_number_is_refused_naming_its_flag():
    for wrong, flag in (({"max_images": 0}, "--max-images"), ({"max_pixels": "40"}, "--max-request-pixels"),
                        ({"max_chars": True}, "--max-chars"), ({"max_seconds": 0.0}, "--request-timeout")):
        with pytest.raises(ValueError, match=flag):
            RequestLimits(**wrong)
    run = subprocess.run([sys.executable, "-m", "vlmux.cli", "serve", "--model", "x=y", "--max-images", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--max-images: a whole number of at least 1" in run.stderr
