"""The server's pure parts: which addresses a remote image may come from (no connection is opened), durations and
the minimum residency, the chat request checks, stop strings, and the shared chart's axes (round ticks, never below zero)."""
import argparse
import re

import pytest

from vlmux import PoolConfig
from vlmux.chart import Series, line_chart, ticks, value_range
from vlmux.serve.cli import add_commands, serve_config
from vlmux.serve.errors import ApiError
from vlmux.serve.fetch import FetchPolicy, fetch, refusal
from vlmux.serve.images import ImagePolicy, image_bytes
from vlmux.serve.schema import UNSET, StopWatch, cut_at_stop, parse_chat
from vlmux.serve.settings import ServeConfig, model_option, parse_duration, parse_residency


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
    ("172.16.5.4", "private"), ("169.254.10.10", "link-local"), ("fe80::1", "link-local"), ("fd12::1", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "address"), ("100.64.1.1", "not a public"),
])
def test_private_loopback_and_link_local_addresses_are_refused_unless_allowed(address, kind):
    assert kind in refusal(address, allow_private=False)
    assert refusal(address, allow_private=True) is None


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254"])
def test_metadata_addresses_are_refused_even_when_private_ones_are_allowed(address):
    assert "metadata" in refusal(address, allow_private=True)


def test_public_addresses_are_allowed():
    assert refusal("93.184.216.34", False) is None and refusal("2606:2800:220:1::1", False) is None


def test_a_loopback_url_is_refused_before_any_connection():
    with pytest.raises(ApiError, match="loopback address") as refused:
        fetch("http://127.0.0.1:9/cat.png", FetchPolicy())  # port 9: nothing listens; a connection would say so
    assert refused.value.status == 400 and refused.value.code == "image_url_refused"
    with pytest.raises(ApiError, match="only http"):
        fetch("ftp://127.0.0.1/cat.png", FetchPolicy())


def test_remote_images_are_off_by_default_and_local_paths_stay_under_their_folder(tmp_path):
    with pytest.raises(ApiError, match="--allow-remote-images"):
        image_bytes("https://127.0.0.1/cat.png", ImagePolicy())
    (tmp_path / "inside").mkdir()
    with pytest.raises(ApiError, match="not a file under the allowed folder"):
        image_bytes("../../etc/passwd", ImagePolicy(local_root=tmp_path / "inside"))
    with pytest.raises(ApiError, match="not a file under the allowed folder"):
        image_bytes("/etc/passwd", ImagePolicy(local_root=tmp_path / "inside"))


def test_durations_and_model_options():
    assert parse_duration("5m") == 300 and parse_duration("90s") == 90 and parse_duration(0) == 0
    assert parse_duration(-1) is None and parse_duration("-1") is None and parse_duration("1h") == 3600
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert model_option("a=/models/x").name == "a" and model_option("/models/tiny-llava/").name == "tiny-llava"


def test_min_residency_is_auto_or_a_duration_and_reaches_the_server_config():
    assert parse_residency("auto") is None and parse_residency("30s") == 30 and parse_residency("0") == 0
    for wrong in ("-1", "soon"):
        with pytest.raises(ValueError, match="--min-residency"):
            parse_residency(wrong)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    assert serve_config(parser.parse_args(["serve", "--model", "a=/m", "--min-residency", "2m"])).min_residency == 120
    assert serve_config(parser.parse_args(["serve", "--model", "a=/m"])).min_residency is None  # auto
    with pytest.raises(ValueError, match="min_residency"):
        PoolConfig(min_residency=-1)


@pytest.mark.parametrize("argv, named", [
    (["serve", "--model", "a=/m", "--vram-budget", "40"], "--vram-budget: '40': a bare number is a fraction"),
    (["serve", "--model", "a=/m", "--vram-budget", "forty"], "--vram-budget: 'forty'"),
    (["caption", "x.png", "-m", "/m", "--vram-budget", "40"], "did you mean 40GiB"),
    (["serve", "--model", "a=/m", "--keep-alive", "soon"], "--keep-alive: a duration like"),
    (["serve", "--model", "a=/m", "--min-residency", "-3"], "--min-residency: auto or a duration"),
    (["serve", "--model", "a=/m", "--port", "70000"], "--port: a port from 0"),
    (["serve", "--model", "a=/m", "--max-queue", "0"], "--max-queue: a whole number of at least 1"),
])
def test_a_flag_that_cannot_be_parsed_is_a_usage_error_naming_it_before_anything_starts(argv, named, capsys):
    from vlmux.cli import main

    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2 and named in capsys.readouterr().err


def test_the_server_takes_the_budget_forms_and_its_config_checks_them_too():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    for budget in ("0.8", "80%", "40GiB"):
        assert serve_config(parser.parse_args(["serve", "--model", "a=/m", "--vram-budget", budget])).vram_budget == budget
    assert serve_config(parser.parse_args(["serve", "--model", "a=/m", "--keep-alive", "-1"])).keep_alive is None
    with pytest.raises(ValueError, match="vram_budget '40'"):
        ServeConfig(vram_budget="40")
    with pytest.raises(ValueError, match="max_queue 0"):
        ServeConfig(max_queue=0)


def test_chat_requests_are_checked_with_the_parameter_named():
    message = [{"role": "user", "content": "hi"}]
    request = parse_chat({"model": "m", "messages": message, "stop": "x", "keep_alive": "0"}, 100)
    assert request.stop == ("x",) and request.keep_alive == 0
    assert parse_chat({"model": "m", "messages": message}, 100).keep_alive == UNSET
    for body, param in [({"messages": message}, "model"), ({"model": "m", "messages": []}, "messages"),
                        ({"model": "m", "messages": message, "n": 2}, "n"),
                        ({"model": "m", "messages": message, "max_tokens": 101}, "max_tokens"),
                        ({"model": "m", "messages": message, "temperature": 3}, "temperature"),
                        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages"),
                        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages")]:
        with pytest.raises(ApiError) as bad:
            parse_chat(body, 100)
        assert bad.value.status == 400 and bad.value.param == param


def test_stop_strings_cut_the_answer():
    assert cut_at_stop("red square. blue", (".", "blue")) == ("red square", True)
    assert cut_at_stop("red square", ("!",)) == ("red square", False)


@pytest.mark.parametrize("pieces", [["red sq", "uare. bl", "ue"], ["red square", " E", "ND", " blue"], ["r", "e", "d"],
                                    ["red squ", "are E", "N"], ["ENDING"]])
def test_a_streamed_answer_stops_where_the_whole_answer_is_cut(pieces):
    stops = (".", " END")
    watch = StopWatch(stops)
    sent = [watch.feed(piece) for piece in pieces]
    streamed = "".join(sent) + watch.rest()
    assert (streamed, watch.stopped) == cut_at_stop("".join(pieces), stops)
    assert "".join(sent[:-1]).endswith(" E") is False  # a possible start of " END" is held back, not sent


def test_the_chart_has_round_ticks_between_its_ends_and_no_negative_lower_bound():
    assert ticks(0, 10.3) == [0, 5, 10] and ticks(0, 10.3, 8) == [0, 2, 4, 6, 8, 10]
    low, high = value_range([0.2, 3.0])
    assert low == 0 and high >= 3.0
    low, high = value_range([60_000, 61_000])
    assert 59_000 <= low < 60_000 < 61_000 < high
    svg = line_chart([Series("memory", [(0, 1.0), (5, 900.0), (10, 2.0)])], x_range=(0, 10))
    y_labels = [float(v) for v in re.findall(r'text-anchor="end">([-\d.]+) MiB', svg)]
    assert len(y_labels) >= 4 and min(y_labels) == 0 and all(v >= 0 for v in y_labels)
    assert len(re.findall(r'class="x-tick"', svg)) >= 5


def test_the_command_line_listens_on_loopback_and_takes_models_from_a_config_file(tmp_path):
    """The README's serve flags as the server gets them: loopback unless --host, --config's [[model]] settings,
    --allow-any-model in place of a model list."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    (tmp_path / "models.toml").write_text("""
[[model]]
name = "small"
model = "./tiny"
keep_alive = "10m"
pinned = true

[[model]]
model = "org/other"
max_concurrent = 2
""")
    config = serve_config(parser.parse_args(["serve", "--config", str(tmp_path / "models.toml")]))
    assert config.host == "127.0.0.1" and not config.allow_any_model
    small, other = config.models
    assert (small.name, small.model, small.keep_alive, small.pinned, small.max_concurrent) == (
        "small", str(tmp_path / "tiny"), 600, True, None)
    assert (other.name, other.keep_alive, other.pinned, other.max_concurrent) == ("other", "default", False, 2)
    assert serve_config(parser.parse_args(["serve", "--allow-any-model", "--host", "0.0.0.0"])).host == "0.0.0.0"
    with pytest.raises(ValueError, match="--allow-any-model"):
        serve_config(parser.parse_args(["serve"]))
