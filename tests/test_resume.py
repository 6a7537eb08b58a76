"""Resume across outputs: an output added on a rerun is filled from the others; after any sequence of runs, kills,
added outputs and overwrites every output holds exactly one record per (image, model), and the outputs agree."""
import csv
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmux.caption.identity import model_tags
from vlmux.caption.job import CaptionJob, record, run_models
from vlmux.caption.outputs import open_output
from vlmux.caption.sinks import SidecarSink
from vlmux.caption.sources import collect_images
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.protocol import Captions, ItemResult
from vlmux.testing.cli import read_jsonl, run_caption, start_caption
from vlmux.tiny import draw_sample_images

MODELS = ["mm/x/tiny", "mm/y/tiny"]  # the same last part: tags tiny and tiny-2
OUTPUTS = ("c.jsonl", "c.parquet", "c.csv", "metadata.jsonl", "sidecar")


def test_an_output_added_on_a_rerun_is_filled_from_the_others_without_captioning(tmp_path):
    images = tmp_path / "p2"
    draw_sample_images(images, count=11, seed=3)
    out, table = tmp_path / "c.jsonl", tmp_path / "c.parquet"
    first = run_caption(str(images), "-m", "vlmux/shapes", "-o", str(out))
    assert first.returncode == 0 and "11 captioned" in first.stdout, first.stderr
    added = run_caption(str(images), "-m", "vlmux/shapes", "-o", str(out), "-o", str(table), "--sidecar", "txt")
    assert added.returncode == 0, added.stderr
    assert "0 captioned, 0 errors, 11 already done, 11 copied from other outputs" in added.stdout
    rows = {(row["file"], row["model"]): row for row in read_jsonl(out)}
    assert len(read_jsonl(out)) == len(rows) == 11
    # a table has a note column for every row; a JSONL line carries a note only when it has one
    assert {(row["file"], row["model"]): row for row in pq.read_table(table).to_pylist()} == {
        key: {"note": None, **row} for key, row in rows.items()}
    for (file, _), row in rows.items():
        assert (images / file).with_suffix(".txt").read_text() == row["caption"] + "\n"
    out.unlink()  # a lost output comes back from the others, too
    again = run_caption(str(images), "-m", "vlmux/shapes", "-o", str(out), "-o", str(table))
    assert "0 captioned" in again.stdout and {(row["file"], row["model"]): row for row in read_jsonl(out)} == rows


# -- property: runs, kills, added outputs and overwrites, through the job API with a fake model ----------------


class FakeSteps:
    """Captions `model|key|overwrites` without a model; SIGKILLs its own process after `die_after` batches, half a JSONL
    line written first, as a kill mid-write leaves it."""

    loads_first = True
    releases_after_failure = True

    def __init__(self, job: CaptionJob, run: int, die_after: int | None, half_line_in: Path | None) -> None:
        self.job, self.run, self.die_after, self.half_line_in, self.batches = job, run, die_after, half_line_in, 0

    def prepare(self, plan, todo):
        return plan

    def load(self, plan, todo):
        return 1

    def caption(self, plan, todo, report, bar):
        for start in range(0, len(todo), 2):
            if self.batches == self.die_after:
                if self.half_line_in is not None:
                    with open(self.half_line_in, "a") as f:
                        f.write('{"file": "A/sample_0')
                os.kill(os.getpid(), signal.SIGKILL)
            refs = todo[start:start + 2]
            results = [ItemResult(f"{plan.spec.model}|{ref.key}|{self.run}") for ref in refs]
            record(self.job, plan, report, refs, Captions(results, 0.0, len(refs)))
            self.batches += 1

    def release(self, plan):
        return None


def run_once(root: Path, outputs: frozenset, run: int, overwrite: bool, die_after: int | None) -> None:
    images = collect_images([str(root / "coll" / "A"), str(root / "coll" / "B")])
    sinks = [open_output(output_path(root, name), MODELS) for name in OUTPUTS if name in outputs and name != "sidecar"]
    if "sidecar" in outputs:
        sinks.append(SidecarSink("{model}.txt", MODELS, lock_at=images[0].root))
    job = CaptionJob(images, [ModelSpec(model, device="cpu") for model in MODELS], GenerationSpec(), sinks,
                     overwrite=overwrite)
    half_line = output_path(root, "c.jsonl") if "c.jsonl" in outputs else None
    try:
        run_models(job, FakeSteps(job, run, die_after, half_line), progress=False)
    finally:
        for sink in sinks:
            sink.close()


def output_path(root: Path, name: str) -> Path:
    return root / "coll" / name if name == "metadata.jsonl" else root / "out" / name


def held(root: Path, name: str) -> list[tuple[tuple[str, str], str]]:
    """((file, model), caption) per record the output holds, duplicates kept; a partial last JSONL line left out."""
    path = output_path(root, name)
    if name == "sidecar":
        by_tag = {tag: model for model, tag in model_tags(MODELS).items()}
        return [((f"{p.parent.name}/{p.name.split('.')[0]}" + next(i.suffix for i in p.parent.iterdir()
                  if i.name.startswith(p.name.split('.')[0] + ".") and i.suffix in (".png", ".jpg")),
                  by_tag[p.name.split(".", 1)[1][:-4]]), p.read_text().removesuffix("\n"))
                for p in sorted((root / "coll").glob("*/*.txt"))]
    if not path.exists():
        return []
    if name == "c.parquet":
        rows = pq.read_table(path).to_pylist()
    elif name == "c.csv":
        rows = list(csv.DictReader(path.open(newline="")))
    else:
        rows = [json.loads(line) for line in path.read_text().split("\n")[:-1]]
    if name == "metadata.jsonl":
        by_tag = {tag: model for model, tag in model_tags(MODELS).items()}
        return [((row["file_name"], by_tag[tag]), row[tag]) for row in rows for tag in by_tag if row.get(tag)]
    return [((row["file"], row["model"]), row["caption"]) for row in rows]


steps = st.lists(st.tuples(st.frozensets(st.sampled_from(OUTPUTS), min_size=1), st.booleans(),
                           st.one_of(st.none(), st.integers(0, 5))), min_size=1, max_size=5)


def check_sequence(sequence) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name in "AB":  # the same file names in both inputs
            draw_sample_images(root / "coll" / name, count=2, seed=1)
        (root / "out").mkdir()
        pairs = {(f"{d}/{p.name}", model) for d in "AB" for p in (root / "coll" / d).iterdir() for model in MODELS}
        seen: frozenset = frozenset()
        overwrites, unfinished_overwrite = 0, False
        for run, (outputs, overwrite, die_after) in enumerate(sequence):
            # A killed overwrite is finished by overwriting again (a plain run keeps what each output holds); an
            # overwrite of only some outputs would leave the others their older captions, as asked, so it names all.
            overwrite = overwrite or unfinished_overwrite
            outputs = outputs | seen if overwrite else outputs
            seen = seen | outputs
            overwrites += overwrite  # captions change only when overwritten, as a greedy model's would
            child = os.fork()
            if child == 0:  # the job runs in a child that may SIGKILL itself, as a killed `vlmux caption` would die
                try:
                    run_once(root, outputs, overwrites, overwrite, die_after)
                finally:
                    os._exit(0)
            _, status = os.waitpid(child, 0)
            killed = os.WIFSIGNALED(status)
            unfinished_overwrite = killed and overwrite
            for name in OUTPUTS:
                keys = [key for key, _ in held(root, name)]
                assert len(keys) == len(set(keys)), f"step {run}: {name} holds a pair twice"
            if killed:
                continue
            assert os.WEXITSTATUS(status) == 0
            views = {name: dict(held(root, name)) for name in outputs}
            for name, view in views.items():
                assert set(view) == pairs, f"step {run}: {name} lacks {pairs - set(view)}"
            first = next(iter(views.values()))
            assert all(view == first for view in views.values()), f"step {run}: the outputs disagree"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_outputs_hold_one_record_per_pair_and_agree_through_runs_kills_added_outputs_and_overwrites(sequence):
    check_sequence(sequence)


@pytest.mark.stress
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps.filter(bool), min_size=1, max_size=3).map(lambda parts: [s for part in parts for s in part]))
def test_outputs_hold_one_record_per_pair_and_agree_through_runs_kills_added_outputs_and_overwrites_long(sequence):
    check_sequence(sequence)


def test_a_cli_job_killed_mid_write_then_rerun_with_an_added_output_leaves_one_agreeing_record_per_pair(tmp_path):
    coll, out = tmp_path / "coll", tmp_path / "out"
    for name in "AB":
        draw_sample_images(coll / name, count=30, seed=7)
    out.mkdir()
    common = [str(coll / "A"), str(coll / "B"), "-m", "vlmux/shapes", "--batch-size", "1"]
    job = start_caption(*common, "-o", str(out / "c.jsonl"), "-o", str(out / "c.parquet"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(held(tmp_path, "c.jsonl")) < 8:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert 8 <= len(held(tmp_path, "c.jsonl")) < 60, "the kill must land mid-job"
    rerun = run_caption(*common, "-o", str(out / "c.jsonl"), "-o", str(out / "c.parquet"), "-o", str(out / "c.csv"))
    assert rerun.returncode == 0, rerun.stderr
    pairs = {(f"{d}/{p.name}", "vlmux/shapes") for d in "AB" for p in (coll / d).iterdir()}
    views = {name: held(tmp_path, name) for name in ("c.jsonl", "c.parquet", "c.csv")}
    for name, view in views.items():
        assert sorted(key for key, _ in view) == sorted(pairs), name
    assert dict(views["c.jsonl"]) == dict(views["c.parquet"]) == dict(views["c.csv"])
