"""`vlmux review` without a browser: every output format `vlmux caption` writes read into per-image records, the
journal (fsynced, replayed, undo, a partial last line), one server per output, views (filters, disagreement order,
search, paging), the export in every format (HF metadata loads with `datasets`), and the app's errors."""
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from vlmux import shapes
from vlmux.caption.locks import OutputBusy
from vlmux.caption.outputs import open_output
from vlmux.caption.sinks import Record, SidecarSink
from vlmux.caption.sources import ImageRef, UsageError
from vlmux.review.app import create_app
from vlmux.review.compare import marked as marks
from vlmux.review.export import export_review
from vlmux.review.journal import journal_path
from vlmux.review.records import Candidate, Item, read_output
from vlmux.review.session import ReviewSession
from vlmux.review.thumbs import Thumbnails
from vlmux.testing.server import in_thread

MODELS = ["org/shapes-a", "org/shapes-b"]


def pictures(folder: Path, count: int = 6) -> list[tuple[Path, str]]:
    return shapes.write_dataset(folder, count, seed=3)


def results(written: list[tuple[Path, str]]) -> list[tuple[ImageRef, Record]]:
    """Two models' results: A right on every picture, B with one word changed, an error on the third picture."""
    root = written[0][0].parent
    pairs = []
    for number, (path, truth) in enumerate(written):
        ref = ImageRef(path, root)
        pairs.append((ref, Record(ref.key, MODELS[0], truth, None)))
        if number == 2:
            pairs.append((ref, Record(ref.key, MODELS[1], None, "ImageError: cannot decode")))
        else:
            other = truth.replace("red", "blue") if "red" in truth else truth + " and a dot"
            pairs.append((ref, Record(ref.key, MODELS[1], other, None)))
    return pairs


def write_output(path: Path, pairs) -> Path:
    """Through caption's own sinks, so the bytes are what `vlmux caption -o PATH` writes."""
    sink = open_output(path, MODELS)
    sink.write(pairs)
    sink.close()
    return path


@pytest.fixture()
def shots(tmp_path) -> list[tuple[Path, str]]:
    return pictures(tmp_path / "images")


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv", "out.parquet", "images/metadata.jsonl", "images/metadata.csv"])
def test_every_output_format_reads_into_the_same_records(tmp_path, shots, name):
    pairs = results(shots)
    items = read_output(write_output(tmp_path / name, pairs))
    keys = sorted(path.name for path, _ in shots)
    assert [item.key for item in items] == keys
    metadata = "metadata" in name
    tags = ["shapes-a", "shapes-b"] if metadata else MODELS
    assert [c.model for c in items[0].candidates] == tags
    by_key = {item.key: item for item in items}
    for ref, record in pairs:
        candidate = by_key[ref.key].candidates[MODELS.index(record.model)]
        assert candidate.caption == record.caption
        assert (candidate.error is not None) == (record.caption is None)
        if not metadata:
            assert candidate.error == record.error
    assert [item.has_error for item in items] == [key == shots[2][0].name for key in keys]


def test_a_folder_of_sidecars_reads_as_one_model_per_tag(tmp_path, shots):
    sink = SidecarSink("{model}.txt", MODELS)
    pairs = results(shots)
    sink.write(pairs)
    items = read_output(tmp_path / "images")
    assert [c.model for c in items[0].candidates] == ["shapes-a", "shapes-b"]
    third = {item.key: item for item in items}[shots[2][0].name]
    assert third.candidates[1].caption is None and third.has_error  # B wrote no sidecar for its error


def test_a_csv_job_killed_before_its_rewrite_is_read_with_its_journal(tmp_path, shots):
    sink = open_output(tmp_path / "out.csv", MODELS)
    sink.write(results(shots))  # in the table's journal only; the job "dies" before close()
    items = read_output(tmp_path / "out.csv")
    assert len(items) == len(shots) and all(len(item.candidates) == 2 for item in items)


def test_what_vlmux_did_not_write_is_refused_by_name(tmp_path):
    for path, said in ((tmp_path / "none.jsonl", "no such file"), (tmp_path / "notes.txt", "not an output")):
        if path.suffix == ".txt":
            path.write_text("hello")
        with pytest.raises(UsageError, match=said):
            read_output(path)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,text\na.png,hi\n")
    with pytest.raises(UsageError, match="file, model, caption, error"):
        read_output(bad)


def test_decisions_survive_a_kill_undo_included_and_a_partial_last_line_is_dropped(tmp_path, shots):
    output = write_output(tmp_path / "out.jsonl", results(shots))
    session = ReviewSession(output)
    a, b, c = (item.key for item in session.items[:3])
    session.decide(a, "choose", MODELS[1])
    session.decide(b, "edit", MODELS[0], "a hand-written caption")
    session.decide(c, "reject")
    session.decide(a, "choose", MODELS[0])
    assert session.undo()["item"]["decision"]["model"] == MODELS[1]  # a's earlier choice stands again
    session.close()
    with open(journal_path(output), "a") as journal:
        journal.write('{"key": "half')  # a kill mid-write
    again = ReviewSession(output)
    decided = again.journal.decided()
    assert {k: (d.action, d.model, d.text) for k, d in decided.items()} == {
        a: ("choose", MODELS[1], session.items[0].candidates[1].caption),
        b: ("edit", MODELS[0], "a hand-written caption"), c: ("reject", None, None)}
    progress = again.progress()
    assert (progress["reviewed"], progress["rejected"], progress["per_minute"]) == (3, 1, 3.0)  # 3 within a minute
    assert progress["latest"] == again.index_of(c)  # where the page resumes
    assert again.undo()["item"]["key"] == c  # the undo stack survived the restart too
    again.close()


def test_a_second_server_on_the_same_output_is_refused(tmp_path, shots):
    output = write_output(tmp_path / "out.jsonl", results(shots))
    first = ReviewSession(output)
    with pytest.raises(OutputBusy, match="another vlmux job"):
        ReviewSession(output)
    first.close()
    ReviewSession(output).close()  # released with the first


def test_views_filter_sort_search_and_page(tmp_path):
    shots = pictures(tmp_path / "images", 12)
    session = ReviewSession(write_output(tmp_path / "out.jsonl", results(shots)))
    everything = session.view(limit=5)
    assert everything["total"] == 12 and len(everything["items"]) == 5
    assert [i["key"] for i in session.view(offset=10, limit=5)["items"]] == [item.key for item in session.items[10:]]
    errors = session.view("errors")
    assert [i["key"] for i in errors["items"]] == [shots[2][0].name]
    worst = session.view(order="disagreement", limit=12)["items"]
    scores = [i["disagreement"] for i in worst]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    first = session.items[0]
    assert session.view("unreviewed")["total"] == 12
    session.decide(first.key, "reject")
    assert first.key in [i["key"] for i in session.view("unreviewed")["items"]]  # a snapshot until fresh
    assert first.key not in [i["key"] for i in session.view("unreviewed", fresh=True)["items"]]
    assert [i["key"] for i in session.view("rejected", fresh=True)["items"]] == [first.key]
    word = session.items[4].candidates[1].caption.split()[-1]
    found = session.view(query=word.upper(), limit=100)["items"]
    assert found and all(any(word in (c["caption"] or "") for c in i["candidates"]) for i in found)
    marked = [text for text, differs in next(i for i in worst if i["key"] == session.items[0].key)["candidates"][1]["pieces"] if differs]
    assert marked and all(text not in session.items[0].candidates[0].caption.split() for text in marked)
    three = Item("x.png", (Candidate("a", "a red circle", None), Candidate("b", "a red circle", None),
                           Candidate("c", "a blue circle", None)))
    assert [[text for text, differs in pieces if differs] for pieces in marks(three)] == [[], [], ["blue"]]
    with pytest.raises(ValueError, match="filter must be one of"):
        session.view("everything")
    session.close()


@pytest.mark.parametrize("name", ["curated.jsonl", "curated.csv", "curated.parquet", "images/metadata.jsonl", "images/metadata.csv"])
def test_the_export_holds_exactly_the_decisions_in_every_format(tmp_path, shots, name):
    output = write_output(tmp_path / "out.jsonl", results(shots))
    session = ReviewSession(output, tmp_path / "images")
    keys = [item.key for item in session.items]
    session.decide(keys[0], "choose", MODELS[1])
    session.decide(keys[1], "edit", MODELS[0], "edited, with a comma and \"quotes\"")
    session.decide(keys[2], "reject")
    session.decide(keys[3], "choose", MODELS[0])  # keys[4:] not reviewed
    expected = {keys[0]: session.items[0].candidates[1].caption, keys[1]: 'edited, with a comma and "quotes"',
                keys[3]: session.items[3].candidates[0].caption}
    with open(journal_path(output), "a") as journal:
        journal.write('{"key": "in fli')  # a decision being written as the export reads
    before = journal_path(output).read_bytes()
    done = export_review(output, tmp_path / "images", tmp_path / name)  # while the review is open
    assert journal_path(output).read_bytes() == before  # the server's file: read, never cut
    session.close()
    assert (done.written, done.rejected, done.undecided) == (3, 1, len(keys) - 4)
    items = read_output(tmp_path / name)
    assert {item.key: item.candidates[0].caption for item in items} == expected
    assert {c.model for item in items for c in item.candidates} == {"text"}
    with pytest.raises(UsageError, match="exists"):
        export_review(output, tmp_path / "images", tmp_path / name)


def test_metadata_exported_loads_with_datasets_and_sidecars_are_written(tmp_path, shots):
    output = write_output(tmp_path / "out.jsonl", results(shots))
    session = ReviewSession(output, tmp_path / "images")
    for item in session.items[:4]:
        session.decide(item.key, "choose", MODELS[0])
    session.close()
    export_review(output, tmp_path / "images", tmp_path / "images" / "metadata.jsonl")
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), split="train")
    truth = {path.name: text for path, text in shots}
    assert sorted(loaded["text"]) == sorted(truth[item.key] for item in session.items[:4])
    (tmp_path / "images" / "metadata.jsonl").unlink()
    done = export_review(output, tmp_path / "images", sidecar="txt")
    assert done.written == 4
    for item in session.items:
        sidecar = tmp_path / "images" / (item.key.rsplit(".", 1)[0] + ".txt")
        assert sidecar.exists() == (item in session.items[:4])
        if sidecar.exists():
            assert sidecar.read_text() == truth[item.key] + "\n"


def test_the_app_answers_with_openai_error_bodies_and_serves_only_the_pictures_of_items(tmp_path, shots):
    pairs = results(shots)
    pairs.append((ImageRef(tmp_path / "secret.png", tmp_path), Record("../secret.png", MODELS[0], "x", None)))
    (tmp_path / "secret.png").write_bytes((tmp_path / "images" / shots[0][0].name).read_bytes())
    output = write_output(tmp_path / "images" / "out.jsonl", [(ref, r) for ref, r in pairs])
    session = ReviewSession(output)
    with in_thread(create_app(session, Thumbnails(tmp_path / "thumbs"))) as url:
        view = httpx.get(url + "/api/view", params={"limit": 100}).json()
        escaping = next(i for i in view["items"] if i["key"] == "../secret.png")
        assert httpx.get(f"{url}/image/{escaping['index']}").status_code == 404
        ordinary = next(i for i in view["items"] if i is not escaping)["index"]
        thumb = httpx.get(f"{url}/thumb/{ordinary}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert len(list((tmp_path / "thumbs").iterdir())) == 1
        assert httpx.get(f"{url}/thumb/{ordinary}").content == thumb.content
        assert httpx.get(f"{url}/image/{ordinary}").status_code == 200
        broken = next(i for i in view["items"] if i["key"] == shots[1][0].name)["index"]
        (tmp_path / "images" / shots[1][0].name).write_bytes(b"not a picture")
        refused = httpx.get(f"{url}/thumb/{broken}")
        assert refused.status_code == 422 and "cannot read the picture" in refused.json()["error"]["message"]
        for body, status, said in (({"key": "nope.png", "action": "reject"}, 404, "no image"),
                                   ({"key": view["items"][0]["key"], "action": "choose", "model": "zzz"}, 400, "no caption"),
                                   ({"key": view["items"][0]["key"], "action": "edit", "text": " "}, 400, "needs some text"),
                                   ({"action": "reject"}, 400, "key")):
            answer = httpx.post(url + "/api/decide", json=body)
            assert answer.status_code == status and said in answer.json()["error"]["message"]
        assert httpx.get(url + "/api/view", params={"limit": 0}).status_code == 400
        rebound = httpx.get(url + "/api/view", headers={"Host": "attacker.example"})  # DNS rebinding to loopback
        assert rebound.status_code == 400
    session.close()


def test_the_command_refuses_a_second_server_and_exports(tmp_path, shots):
    output = write_output(tmp_path / "out.jsonl", results(shots))
    session = ReviewSession(output)
    session.decide(session.items[0].key, "reject")
    session.decide(session.items[1].key, "choose", MODELS[0])
    refused = subprocess.run([sys.executable, "-m", "vlmux.cli", "review", str(output), "--port", "0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "another vlmux job" in refused.stderr
    session.close()
    done = subprocess.run([sys.executable, "-m", "vlmux.cli", "review", str(output), "--export", str(tmp_path / "c.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 captions written" in done.stdout and "1 rejected" in done.stdout
    assert [json.loads(line)["file"] for line in (tmp_path / "c.jsonl").read_text().splitlines()] == [session.items[1].key]



def test_two_tabs_deciding_at_once_lose_nothing(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    shots = pictures(tmp_path / "images", 40)
    output = write_output(tmp_path / "out.jsonl", results(shots))
    session = ReviewSession(output)
    keys = [item.key for item in session.items if not item.has_error]
    with in_thread(create_app(session, Thumbnails(tmp_path / "thumbs"))) as url:
        def tab(half: list[str]) -> None:
            with httpx.Client(base_url=url) as client:
                for key in half:
                    assert client.post("/api/decide", json={"key": key, "action": "choose", "model": MODELS[0]}).status_code == 200

        with ThreadPoolExecutor(2) as tabs:
            list(tabs.map(tab, [keys[0::2], keys[1::2]]))
    session.close()
    lines = journal_path(output).read_text().splitlines()
    assert len(lines) == len(keys) and all(json.loads(line)["action"] == "choose" for line in lines)  # whole lines
    again = ReviewSession(output)
    assert set(again.journal.decided()) == set(keys)
    again.close()


def test_a_caption_holding_a_line_separator_reads_as_one_record(tmp_path):
    """JSON leaves U+2028 unescaped; reading the output must split at line feeds only, as caption's own sinks do."""
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps({"file": "x.png", "model": "m", "caption": "left\u2028right", "error": None},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    [item] = read_output(out)
    assert item.key == "x.png" and item.candidates[0].caption == "left\u2028right"
