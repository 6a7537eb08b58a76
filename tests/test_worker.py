"""The spare worker: warm for one placement, never handed to a load placed elsewhere. A worker's reader thread: an
Abort sent while a batch of chats generates stops that row, and the worker's own count of running rows drops."""
from vlmux.config import GenerationSpec, ModelSpec
from vlmux.pool.process import WorkerProcess
from vlmux.pool.spawner import Spawner
from vlmux.protocol import Caption, Captions, Chat, Chats, ChatsAnswered, Load, Loaded, Warm
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


def test_an_abort_sent_mid_batch_stops_its_row_and_the_workers_count_of_running_rows_drops(tiny_qwen):
    """Two streamed chats of 900 tokens in one call to a real worker; the parent aborts the first at its fifth
    piece, from the call's own thread, while the worker generates. The worker's count (its heartbeats) goes from 2
    to 1 while the second row still streams most of its answer, and to 0 once the call returns."""
    worker = WorkerProcess()
    try:
        assert isinstance(worker.call(Load(ModelSpec(str(tiny_qwen), device="cpu", dtype="float32"), str(tiny_qwen),
                                           CPU_ENV), 120), Loaded)
        gen = GenerationSpec(max_new_tokens=900, ignore_eos=True)
        ask = [{"role": "user", "content": [{"type": "text", "text": "Tell a story."}]}]
        chats = [Chat(ask, gen, stream=True), Chat(ask, gen, stream=True)]
        seen: list[tuple[int, int]] = []  # (row, the worker's running rows when the piece came)

        def on_text(piece) -> None:
            seen.append((piece.row, worker.running_rows))
            if [row for row, _ in seen].count(0) == 5 and piece.row == 0:
                worker.abort(chats[0].ident)

        reply = worker.call(Chats(chats), 120, on_text)
        assert isinstance(reply, ChatsAnswered), reply
        first, second = reply.replies
        assert first.finish_reason == "abort" and first.completion_tokens < 100
        assert second.finish_reason == "length" and second.completion_tokens == 900
        assert (0, 2) in seen  # both rows ran
        one = [index for index, (row, rows) in enumerate(seen) if rows == 1]
        # the first row sends no more, but for the word its streamer held, flushed as the call ends
        assert one and [row for row, _ in seen[one[0] + 1:]].count(0) <= 1
        assert len(seen) - one[0] > len(seen) // 2  # the count dropped while the second row still had most to say
        assert worker.running_rows == 0
    finally:
        worker.stop(5, NoRelease())
