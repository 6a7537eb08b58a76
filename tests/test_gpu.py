"""GPU behaviour of the pool: run on the device with `python -m pytest -m gpu`."""
import os

import pytest

from vlmux import GenerationSpec, ModelPool, ModelSpec, PoolConfig, PoolFull, pipeline
from vlmux.pool import vram

pytestmark = pytest.mark.gpu


def test_twenty_cycles_of_two_models_give_back_every_byte(tiny_llava, tiny_qwen, image_dir):
    images = sorted(image_dir.iterdir())
    baseline = vram.gpu_memory(0).used
    residues = []
    for cycle in range(20):
        model = tiny_llava if cycle % 2 == 0 else tiny_qwen
        with pipeline(str(model), device="cuda", max_new_tokens=8) as pipe:
            assert len(pipe(images)) == len(images)
            worker = pipe.status[0].pid
            usage = vram.process_memory(0)
            assert worker in usage and os.getpid() not in usage  # the worker holds the context, never the parent
        release = pipe.release
        residues.append(release.residue_mib)
        assert release.verified and release.process_gone, release
        assert vram.gpu_memory(0).used <= baseline, f"cycle {cycle}: {vram.gpu_memory(0).used - baseline} bytes above"
    print(f"\nNVML residue per cycle (MiB): {residues}; baseline {baseline / vram.MIB:.0f} MiB")
    assert residues == [0.0] * 20


def test_sleep_keeps_the_context_but_frees_the_weights_and_wake_answers_the_same(tiny_qwen, image_dir):
    image = sorted(image_dir.iterdir())[0]
    gen = GenerationSpec(max_new_tokens=8)
    with ModelPool(PoolConfig(spare_worker=False)) as pool:
        name = pool.load(ModelSpec(str(tiny_qwen), device="cuda"))
        before = pool.caption(name, [image], ["Describe."], gen)[0].caption
        pid = pool.status()[0].pid
        awake = vram.process_memory(0)[pid]
        pool.sleep(name)
        asleep = pool.status()[0]
        assert asleep.state == "sleeping" and asleep.holds_device_context
        assert vram.process_memory(0)[pid] <= awake
        assert 0 < asleep.device_bytes <= awake and asleep.host_bytes > 0  # the context stays; the weights are on the host
        assert pool.caption(name, [image], ["Describe."], gen)[0].caption == before  # a request wakes it
        assert pool.status()[0].state == "ready"


def test_a_budget_for_one_model_evicts_the_idle_one_first(tiny_llava, tiny_qwen):
    from vlmux.estimate import estimate

    one = max(estimate(path, "auto", 8, 64).total for path in (tiny_llava, tiny_qwen))
    with ModelPool(PoolConfig(vram_budget=int(one * 1.5), spare_worker=False)) as pool:
        first = pool.load(ModelSpec(str(tiny_llava), device="cuda"))
        pool.load(ModelSpec(str(tiny_qwen), device="cuda"))
        assert first not in pool and pool.last_release[first].verified
    with ModelPool(PoolConfig(vram_budget=one // 2, spare_worker=False)) as pool:
        with pytest.raises(PoolFull, match="Raise --vram-budget"):
            pool.load(ModelSpec(str(tiny_llava), device="cuda"))


def test_streamed_weights_caption_like_from_pretrained_on_the_gpu(tiny_models, image_dir):
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmux.backends.attention import use_fast_attention
    from vlmux.backends.transformers import TransformersBackend
    from vlmux.images import load_image

    images = [load_image(path) for path in sorted(image_dir.iterdir())]
    gen = GenerationSpec(max_new_tokens=8)
    for arch, path in tiny_models.items():
        backend = TransformersBackend(ModelSpec(str(path), device="cuda", dtype="bfloat16"), str(path))
        assert backend.loader == "stream", backend.loader
        streamed = backend.caption(images, ["Describe."] * len(images), gen)
        backend.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda:0")
        use_fast_attention(backend.model, packed_vision=backend.fast.vision_compiled)  # only the weights' way in differs
        assert backend.caption(images, ["Describe."] * len(images), gen) == streamed, arch
        backend.close()


def test_the_report_shows_gpu_memory_back_at_the_baseline_between_models(tiny_llava, tiny_qwen, image_dir, tmp_path):
    import json
    import subprocess
    import sys

    html = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "vlmux.cli", "caption", str(image_dir), "-m", str(tiny_llava),
                             "-m", str(tiny_qwen), "-o", str(tmp_path / "out.jsonl"), "--device", "cuda",
                             "--report", str(html), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(html.with_suffix(".json").read_text())
    assert data["memory_source"].startswith("GPU memory")
    baseline = data["samples"][0]["mib"]
    unloaded = next(e["seconds"] for e in data["events"] if e["event"] == "unloaded")
    next_load = next(e["seconds"] for e in data["events"] if e["event"] == "load_start" and e["seconds"] >= unloaded)
    level = [s["mib"] for s in data["samples"] if unloaded <= s["seconds"] <= next_load]
    assert level and max(level) <= baseline, (baseline, level)
    assert all(model["residue_mib"] == 0 for model in data["models"])


def test_a_pool_that_switches_keeps_a_warm_spare_and_still_gives_back_every_byte(tiny_llava, tiny_qwen, image_dir):
    import time

    image = sorted(image_dir.iterdir())[0]
    gen = GenerationSpec(max_new_tokens=8)
    baseline = vram.gpu_memory(0).used
    answers: dict[str, list[str]] = {}

    def ours() -> set[int]:  # an earlier in-process test may have left this pytest process a context of its own
        return set(vram.process_memory(0)) - {os.getpid()}

    with ModelPool(PoolConfig(warm_spare_linger=1.0)) as pool:
        current = pool.load(ModelSpec(str(tiny_llava), device="cuda"))
        answers.setdefault(current, []).append(pool.caption(current, [image], ["Describe."], gen)[0].caption)
        for model in (tiny_qwen, tiny_llava, tiny_qwen, tiny_llava):
            current, release = pool.switch(current, ModelSpec(str(model), device="cuda"))
            assert release.verified and release.process_gone and release.residue_mib == 0, release
            answers.setdefault(current, []).append(pool.caption(current, [image], ["Describe."], gen)[0].caption)
            assert pool.wait_for_spare(120)
            on_gpu = ours()
            assert pool.status()[0].pid in on_gpu and len(on_gpu) == 2, on_gpu  # the model's worker and the spare
        pool.unload(current)
        deadline = time.monotonic() + 30
        while ours() and time.monotonic() < deadline:  # the spare cools after the linger
            time.sleep(0.1)
        assert ours() == set()
        assert vram.gpu_memory(0).used <= baseline
    assert all(len(set(runs)) == 1 for runs in answers.values()), answers  # a warm spare answers like a cold one


def test_weights_a_warm_up_pinned_load_by_dma_and_caption_the_same(tiny_qwen, image_dir, monkeypatch):
    from vlmux.backends import pinned
    from vlmux.backends.transformers import TransformersBackend
    from vlmux.backends.warm import warm_up
    from vlmux.images import load_image

    spec = ModelSpec(str(tiny_qwen), device="cuda", dtype="bfloat16")
    images = [load_image(path) for path in sorted(image_dir.iterdir())]
    gen = GenerationSpec(max_new_tokens=8)
    plain = TransformersBackend(spec, str(tiny_qwen))
    assert plain.timings["stream_pinned"] == 0.0
    expected = plain.caption(images, ["Describe."] * len(images), gen)
    plain.close()
    monkeypatch.setattr(pinned, "SLICE_BYTES", 1 << 16)  # many registered slices: copies must not cross them
    timings = warm_up(spec, str(tiny_qwen), pin_weights=True)
    assert timings["pinned_gb"] > 0 and pinned.pinned_views(tiny_qwen) is not None
    backend = TransformersBackend(spec, str(tiny_qwen))
    assert backend.timings["stream_pinned"] == 1.0
    assert backend.caption(images, ["Describe."] * len(images), gen) == expected
    assert pinned.pinned_views(tiny_qwen) is not None  # nothing unpins beside the first answer
    backend.after_reply()  # the worker calls it once the answer is sent
    assert pinned.pinned_views(tiny_qwen) is None
    backend.close()
