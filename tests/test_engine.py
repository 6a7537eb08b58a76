"""Decode mode `engine` (backends/engine/): greedy captions equal transformers' generate (decode `dynamic`) token for
token on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, over images of different sizes and prompts of different
lengths, with end-of-sequence tokens that end rows at different steps and with `ignore_eos`; more rows than slots
are refilled into freed slots; the bundled shapes captioner is exactly as accurate."""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmux
from vlmux.backends.engine.captioner import EngineCaptioner, EngineUnsupported
from vlmux.backends.engine.config import SUPPORTED
from vlmux.backends.transformers import TransformersBackend, caption_text
from vlmux.config import DECODE_MODES, GenerationSpec, ModelSpec
from vlmux.shapes import write_dataset
from vlmux.tiny import build_tiny
from vlmux.tiny.pictures import ellipses

TOKENS = 16
PROMPTS = ("Describe the image.", "What?", "Colours and shapes, please, all of them.", "Caption.", "a b c d e f", "Hi")
SIZES = ((40, 30), (64, 64), (120, 50), (33, 90), (200, 150), (90, 90))


def pictures() -> list[Image.Image]:
    return ellipses(list(SIZES))


def common_token(path: Path) -> int:
    """A token that plain generate emits in some rows but not all, at different steps: as an extra end-of-sequence
    token, it ends rows at different times and leaves at least one running to the token limit."""
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    texts = [caption_text(processor, prompt) for prompt in PROMPTS]
    inputs = processor(text=texts, images=[[image] for image in pictures()], padding=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    rows = [row[inputs["input_ids"].shape[1]:].tolist() for row in output]
    firsts = Counter(token for row in rows for token in set(row[1:-1]))
    for token, count in firsts.most_common():
        if 2 <= count < len(rows) and len({row.index(token) for row in rows if token in row}) > 1:
            return token
    raise AssertionError("no token ends rows at different steps")


def with_generation(source: Path, target: Path, **settings) -> Path:
    """A copy of the model folder whose generation config has `settings` on top of its own."""
    shutil.copytree(source, target)
    config = json.loads((target / "generation_config.json").read_text())
    (target / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return target


@pytest.fixture(scope="session")
def qwen_models(tmp_path_factory) -> dict[str, Path]:
    """Each supported family's tiny model, with one more end-of-sequence token that ends rows early."""
    root = tmp_path_factory.mktemp("engine")
    models = {}
    for arch in SUPPORTED:
        path = build_tiny(root / arch, arch, seed=0)
        eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
        models[arch] = with_generation(path, root / f"{arch}-eos", eos_token_id=[*eos, common_token(path)])
    return models


def backend(path: Path, decode: str) -> TransformersBackend:
    return TransformersBackend(ModelSpec(str(path), device="cpu", dtype="float32", decode=decode), str(path))


def captions(model: TransformersBackend, gen: GenerationSpec) -> list[str]:
    return model.generate(model.prepare(pictures(), list(PROMPTS)), gen)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_greedy_captions_equal_generate_with_eos_and_ignoring_it(qwen_models, arch):
    reference, engine = backend(qwen_models[arch], "dynamic"), backend(qwen_models[arch], "engine")
    for gen in (GenerationSpec(max_new_tokens=TOKENS), GenerationSpec(max_new_tokens=TOKENS, ignore_eos=True)):
        expected = captions(reference, gen)
        assert captions(engine, gen) == expected
        stats = engine.engine.stats
        assert stats.rows == len(PROMPTS) and stats.prefills == 1  # as many slots as rows: no refill
        if gen.ignore_eos:
            assert len(set(expected)) == len(expected)  # the model looks at its image: a mixed-up row would show
            assert stats.answer_lengths == [TOKENS] * len(PROMPTS) and stats.widest_step == len(PROMPTS)
        else:  # rows end at different steps and leave: later steps decode fewer rows
            assert len(set(stats.answer_lengths)) > 1
            assert stats.decoded_tokens == sum(length - 1 for length in stats.answer_lengths)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_more_rows_than_slots_are_refilled_into_freed_slots(qwen_models, arch):
    reference = backend(qwen_models[arch], "dynamic")
    gen = GenerationSpec(max_new_tokens=TOKENS)
    expected = captions(reference, gen)
    engine = EngineCaptioner(reference.model, reference.pad_token_id, max_slots=2)
    tokens = engine.generate(reference.prepare(pictures(), list(PROMPTS)).inputs, gen)
    got = [text.strip() for text in reference.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    assert got == expected
    stats = engine.stats
    assert stats.widest_step == 2 and stats.prefills >= 3  # the first two rows, then refills as rows end
    assert captions(reference, gen) == expected  # the model's own modules, now views of the fused weights


def test_repetition_penalty_of_the_checkpoint_is_honoured(qwen_models, tmp_path):
    path = with_generation(qwen_models["qwen2_vl"], tmp_path / "penalised", repetition_penalty=1.5)
    gen = GenerationSpec(max_new_tokens=TOKENS)
    assert captions(backend(path, "engine"), gen) == captions(backend(path, "dynamic"), gen)


def test_sampling_follows_the_seed(qwen_models):
    engine = backend(qwen_models["qwen2_vl"], "engine")
    sampled = [captions(engine, GenerationSpec(max_new_tokens=TOKENS, do_sample=True, temperature=1.5, top_p=0.9,
                                               seed=seed)) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert sampled[0] != captions(engine, GenerationSpec(max_new_tokens=TOKENS))


def test_the_cache_grows_for_a_wider_batch_and_captions_survive_sleep_and_wake(qwen_models):
    engine = backend(qwen_models["qwen2_5_vl"], "engine")
    gen = GenerationSpec(max_new_tokens=TOKENS)
    first = engine.generate(engine.prepare(pictures()[:2], list(PROMPTS[:2])), gen)
    assert engine.engine.runner.config.slots == 2
    before = captions(engine, gen)
    assert engine.engine.runner.config.slots == len(PROMPTS) and before[:2] == first
    engine.sleep()
    engine.wake()
    assert captions(engine, gen) == before


def test_engine_is_a_decode_mode_for_the_qwen2_vl_family_only(tiny_llava):
    assert "engine" in DECODE_MODES
    with pytest.raises(ValueError, match="engine"):
        ModelSpec("m", decode="turbo")
    with pytest.raises(EngineUnsupported, match="qwen2_vl, qwen2_5_vl, qwen3_vl, not 'llava'"):
        backend(tiny_llava, "engine")


def test_the_shapes_captioner_is_as_accurate_through_the_engine():
    with tempfile.TemporaryDirectory() as folder:
        samples = write_dataset(folder, 40, seed=20_250_418)  # neither training's seeds nor eval_shapes'
        paths = [str(path) for path, _ in samples]
        answers = {}
        for decode in ("dynamic", "engine"):
            with vlmux.pipeline("vlmux/shapes", device="cpu", decode=decode, isolation="none", batch_size=8) as pipe:
                answers[decode] = pipe(paths)
    right = {decode: sum(got == want for got, (_, want) in zip(found, samples)) for decode, found in answers.items()}
    assert answers["engine"] == answers["dynamic"] and right["engine"] >= 36


@pytest.mark.gpu
def test_cuda_graph_decode_equals_generate_on_a_gpu(qwen_models):
    """The first check on a GPU: captured decode steps (several batch sizes as rows leave) give generate's captions
    (float32, so that rounding cannot tell them apart)."""
    for arch in SUPPORTED:
        path = str(qwen_models[arch])
        reference = TransformersBackend(ModelSpec(path, "cuda", "float32", decode="dynamic"), path)
        engine = TransformersBackend(ModelSpec(path, "cuda", "float32", decode="engine"), path)
        gen = GenerationSpec(max_new_tokens=TOKENS)
        assert captions(engine, gen) == captions(reference, gen)
        assert engine.engine.runner.graphs is not None and len(engine.engine.runner.graphs.graphs) > 1
