"""The chat request's checks (serve/schema.py) as an OpenAI client meets them: a wrong type or a value out of range
is a 400 that names the field, never a 500 or a silent reading; `developer` is a system message; JSON output is
refused until it is honoured. Also the echo of a client's text in errors (serve/errors.py)."""
import pytest

from vlmux.serve.errors import ApiError
from vlmux.serve.schema import parse_chat
from vlmux.serve.service import Service
from vlmux.serve.settings import ModelEntry, ServeConfig

LIMIT = 4096


def body(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def refused(raw: dict) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_chat(raw, LIMIT)
    error = caught.value
    assert error.status == 400
    assert error.body()["error"]["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, -(2**63) - 1])
def test_a_seed_past_64_bits_is_a_400_naming_seed(seed):
    assert refused(body(seed=seed)).param == "seed"


@pytest.mark.parametrize("seed", [0, 2**63 - 1, -(2**63)])
def test_a_seed_within_64_bits_is_taken(seed):
    assert parse_chat(body(seed=seed), LIMIT).seed == seed


@pytest.mark.parametrize("stop", [5, {"a": 1}, 1.5, True, [1], ["a", ""], ["a", "b", "c", "d", "e"]])
def test_a_stop_of_the_wrong_type_is_a_400_naming_stop(stop):
    assert refused(body(stop=stop)).param == "stop"


@pytest.mark.parametrize("stop, read", [("x", ("x",)), (["x", "y"], ("x", "y")), (None, ()), ([], ())])
def test_a_stop_string_or_list_is_read_as_given(stop, read):
    assert parse_chat(body(stop=stop), LIMIT).stop == read


@pytest.mark.parametrize("value", ["no", "true", 1, 0, [], {}])
def test_stream_must_be_a_json_boolean(value):
    error = refused(body(stream=value))
    assert error.param == "stream" and "true or false" in error.message


def test_include_usage_must_be_a_json_boolean():
    assert refused(body(stream=True, stream_options={"include_usage": "yes"})).param == "stream_options.include_usage"
    assert parse_chat(body(stream=True, stream_options={"include_usage": True}), LIMIT).include_usage
    assert parse_chat(body(stream=None), LIMIT).stream is False


def test_a_developer_message_is_a_system_message():
    raw = {"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                      {"role": "user", "content": "hi"}]}
    assert [m.role for m in parse_chat(raw, LIMIT).messages] == ["system", "user"]


@pytest.mark.parametrize("fmt", [{"type": "json_object"},
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
                                 "json", {"type": "x" * 10_000}])
def test_json_output_is_refused_until_it_is_honoured(fmt):
    error = refused(body(response_format=fmt))
    assert error.param == "response_format" and "not supported" in error.message
    assert len(error.message) < 300


def test_a_text_response_format_is_what_is_written_anyway():
    assert parse_chat(body(response_format={"type": "text"}), LIMIT).model == "m"


@pytest.mark.parametrize("allow_any", [False, True])
def test_a_long_model_name_is_echoed_as_a_short_prefix(allow_any):
    service = Service(ServeConfig(models=(ModelEntry("qwen", "/nowhere"),), allow_any_model=allow_any), None, None)
    name = "x" * 1_000_000
    with pytest.raises(ApiError) as caught:
        service.entry(name)
    assert caught.value.status == 404
    assert len(caught.value.message) < 600 and "1000000 characters" in caught.value.message
