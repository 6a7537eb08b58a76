"""The spare worker: warm for one placement, never handed to a load placed elsewhere."""
from vlmux.config import ModelSpec
from vlmux.pool.process import Spawner
from vlmux.protocol import Caption, Captions, Load, Loaded, Warm
from vlmux.config import GenerationSpec
from vlmux.testing.workers import CPU_ENV, NoRelease

OTHER_ENV = {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}



def test_a_warm_spare_serves_loads_placed_like_it_and_only_those(tiny_qwen, image_dir):
    spawner = Spawner(keep_spare=True)
    try:
        spec = ModelSpec(str(tiny_qwen), device="cpu")
        spawner.warm([Warm(spec, str(tiny_qwen), CPU_ENV)])
        assert spawner.wait_ready(120)
        warm = spawner.take(CPU_ENV)
        assert warm.warm_env == CPU_ENV and warm.warmed == {str(tiny_qwen)}
        assert isinstance(warm.call(Load(spec, str(tiny_qwen), CPU_ENV)), Loaded)
        reply = warm.call(Caption([str(sorted(image_dir.iterdir())[0])], ["Describe."], GenerationSpec(max_new_tokens=4), 1))
        assert isinstance(reply, Captions) and reply.results[0].error is None
        assert warm.stop(5, NoRelease()).process_gone is True

        spawner.warm([Warm(spec, str(tiny_qwen), CPU_ENV)])
        assert spawner.wait_ready(120)
        elsewhere = spawner.take(OTHER_ENV)
        assert elsewhere.warm_env is None and elsewhere.warmed == set()  # a fresh worker, not the warm one
        assert elsewhere.stop(5, NoRelease()).process_gone is True

        spawner.warm([Warm(spec, str(tiny_qwen), CPU_ENV)])
        assert spawner.wait_ready(120)
        spawner.warm(None)  # cooled: the warm one is replaced by a cold one
        assert spawner.wait_ready(120)
        cold = spawner.take(CPU_ENV)
        assert cold.warm_env is None
        assert cold.stop(5, NoRelease()).process_gone is True
    finally:
        spawner.close()


def test_a_paused_warm_up_sends_the_spare_nothing_until_it_is_resumed(tiny_qwen):
    spawner = Spawner(keep_spare=True)
    spec = ModelSpec(str(tiny_qwen), device="cpu")
    try:
        assert spawner.wait_ready(120)
        spawner.pause_warm()  # a release check reads the GPU's books now
        spawner.warm([Warm(spec, str(tiny_qwen), CPU_ENV)])
        assert not spawner.wait_ready(0.5)
        spawner.resume_warm()
        assert spawner.wait_ready(60)
        spare = spawner.take(CPU_ENV)
        assert spare.warmed == {str(tiny_qwen)}
        spare.stop(5, NoRelease())
    finally:
        spawner.close()
