"""bench.py's figures measure what its lines say: where the clocks are read, what each path runs, the units.

The GPU-only parts (torch.cuda's synchronize and memory counters) are stood in for, so that all of it runs
on a CPU in seconds; a fake clock makes every duration exact."""
from __future__ import annotations

import argparse
import types

import pytest
import torch

import bench

TINY_SIZE = bench.SHAPES["tiny"]["image_size"]


class Clock:
    """bench's `time` module stood in for: wall and CPU clocks that move only when told to, each read logged."""

    def __init__(self, log: list):
        self.log, self.wall, self.cpu = log, 0.0, 0.0

    def perf_counter(self) -> float:
        self.log.append("wall")
        return self.wall

    def process_time(self) -> float:
        self.log.append("cpu")
        return self.cpu

    def spend(self, wall: float, cpu: float = 0.0) -> None:
        self.wall, self.cpu = self.wall + wall, self.cpu + cpu


@pytest.fixture
def clock(monkeypatch):
    """The fake clock, and bench's sync logged beside its reads (on a GPU, sync is where queued work ends)."""
    log: list = []
    fake = Clock(log)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=fake.perf_counter,
                                                             process_time=fake.process_time))
    monkeypatch.setattr(bench, "sync", lambda device: log.append("sync"))
    return fake


def bench_args(device="cpu", **extra) -> argparse.Namespace:
    return argparse.Namespace(**{"shapes": "tiny", "device": torch.device(device), "device_name": "test", "repeats": 2,
                                 "profile": False, "compile": False, "cpu_bf16": False, "generate_batch": 2,
                                 "batches_list": [8], "records": [], "adapter_kind": "mlp", "out": "", **extra})


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return bench.make_captioner("tiny", torch.device("cpu"), torch.float32)


def test_timed_reads_the_clock_only_around_synced_timed_calls_after_the_warm_up(clock):
    def call():
        clock.log.append("call")
        clock.spend(1.0)

    seconds = bench.timed(call, torch.device("cpu"), repeats=2, warmup=1,
                          after_warmup=lambda: clock.log.append("after warm-up"))
    # A GPU runs queued work after the call returns: the clock starts once the warm-up's work has ended and
    # stops once the timed calls' has, and the warm-up (compiling) is off the clock.
    assert clock.log == ["call", "sync", "after warm-up", "wall", "call", "call", "sync", "wall"]
    assert seconds == 1.0  # per call


def test_interleaved_timing_takes_turns_between_synced_clock_reads_and_gives_medians(clock):
    walls = {"a": [0.0, 1.0, 9.0, 2.0], "b": [0.0, 4.0, 4.0, 30.0]}  # a warm-up call, then one outlier each

    def work(name):
        def call():
            clock.log.append(name)
            clock.spend(walls[name].pop(0), cpu=0.5)
        return call

    wall, cpu = bench.interleaved_medians({"a": work("a"), "b": work("b")}, torch.device("cpu"), 3, 1)
    timed_call = ["sync", "wall", "cpu", "{}", "sync", "wall", "cpu"]
    one_turn = [entry.format("a") for entry in timed_call] + [entry.format("b") for entry in timed_call]
    assert clock.log == ["a", "b"] + one_turn * 3  # warm-up, then A B A B ...: other load falls on both alike
    assert wall == {"a": 2.0, "b": 4.0}
    assert cpu == {"a": 0.5, "b": 0.5}  # the process's CPU time, not the wall clock's


class FakeStep:
    """A training step stood in for: each call spends `seconds` on the clock and, while it runs, `activations`
    GiB of simulated GPU memory; the first call also holds `compile_gib` more (compiling's trial buffers)."""

    def __init__(self, clock, memory, path, batch, seconds=0.25, activations=0.5, compile_gib=3.0):
        self.clock, self.memory, self.path, self.batch, self.calls = clock, memory, path, batch, 0
        self.seconds, self.activations, self.compile_gib = seconds, activations, compile_gib
        self.loss_function = types.SimpleNamespace(compiled=object() if "compile" in path else None)

    def __call__(self):
        self.calls += 1
        self.clock.log.append("step")
        extra = self.compile_gib if "compile" in self.path and self.calls == 1 else 0.0
        self.memory.allocate(self.activations + extra)
        self.memory.allocate(-self.activations - extra)
        self.clock.spend(self.seconds)


class Memory:
    def __init__(self, log):
        self.log, self.now, self.peak = log, 0.0, 0.0

    def allocate(self, gib: float) -> None:
        self.now += gib
        self.peak = max(self.peak, self.now)

    def reset(self, device) -> None:
        self.log.append("reset peak")
        self.peak = self.now


@pytest.fixture
def fake_gpu(monkeypatch, clock):
    """bench_train on a pretend bf16 GPU: what it builds (dtype, autocast, batch) is recorded, the steps are
    FakeSteps, GPU memory is simulated (1.25 GiB of weights once built)."""
    memory, built = Memory(clock.log), []

    def make_captioner(shapes, device, dtype, adapter_kind="mlp"):
        memory.allocate(1.25)
        return types.SimpleNamespace(dtype=dtype)

    def training_step(captioner, path, batch, image_size, device, autocast_bf16, mode=None):
        built.append({"path": path, "batch": batch, "dtype": captioner.dtype, "autocast": autocast_bf16,
                      "step": FakeStep(clock, memory, path, batch)})
        return built[-1]["step"]

    monkeypatch.setattr(bench, "gpu_computes_in_bf16", lambda: True)
    monkeypatch.setattr(bench, "make_captioner", make_captioner)
    monkeypatch.setattr(bench, "training_step", training_step)
    monkeypatch.setattr(bench, "reset_peak", memory.reset)
    monkeypatch.setattr(bench, "peak_gib", lambda device: memory.peak)
    return types.SimpleNamespace(built=built, memory=memory, log=clock.log)


def test_gpu_training_lines_give_each_paths_dtype_batch_seconds_and_samples_per_second(fake_gpu):
    args = bench_args("cuda", batches_list=[8, 16])
    bench.bench_train(args, "naive", 4)
    bench.bench_train(args, "product", 8)
    bench.bench_train(args, "product+compile", 16)
    built = {b["path"]: b for b in fake_gpu.built}
    # naive: fp32 frozen weights under bf16 autocast (what public projects do); product: weights in bf16.
    assert (built["naive"]["dtype"], built["naive"]["autocast"]) == (torch.float32, True)
    assert (built["product"]["dtype"], built["product"]["autocast"]) == (torch.bfloat16, True)
    for record in args.records:
        assert record["batch"] == built[record["path"]]["batch"], "the line names the batch the step ran"
        assert record["step_s"] == 0.25  # seconds per step
        assert record["samples_per_s"] == record["batch"] / 0.25  # samples (images), not caption tokens
        assert record["weights_dtype"] == str(built[record["path"]]["dtype"]).removeprefix("torch.")


def test_a_compiled_steps_warm_up_is_off_the_clock_and_out_of_its_peak_memory(fake_gpu):
    args = bench_args("cuda")
    bench.bench_train(args, "product+compile", 8)
    step = fake_gpu.built[0]["step"]
    timed_from = fake_gpu.log.index("wall")
    # reduce-overhead's CUDA graphs: the first call runs eagerly, the second records, the third replays.
    assert fake_gpu.log[:timed_from].count("step") == 3
    assert fake_gpu.log[timed_from:].count("step") == args.repeats == step.calls - 3
    # The first call's 3 GiB held while compiling is not the step's: weights + activations only.
    assert args.records[0]["peak_mem_gib"] == 1.25 + 0.5
    bench.bench_train(args, "product", 8)  # an eager step warms up once
    assert fake_gpu.built[1]["step"].calls == 1 + args.repeats


def test_cpu_training_lines_name_the_batch_and_the_captioner_each_step_ran(monkeypatch):
    built = []

    def make_captioner(shapes, device, dtype, adapter_kind="mlp"):
        return types.SimpleNamespace(dtype=dtype)

    def training_step(captioner, path, batch, image_size, device, autocast_bf16, mode=None):
        built.append((path, batch, captioner.dtype, autocast_bf16))
        return types.SimpleNamespace(batch=batch, loss_function=None)

    monkeypatch.setattr(bench, "make_captioner", make_captioner)
    monkeypatch.setattr(bench, "training_step", training_step)
    monkeypatch.setattr(bench, "timed_interleaved", lambda steps, device, repeats, warmup: {
        path: step.batch / 100 for path, step in steps.items()})  # each step's seconds tell its batch
    args = bench_args(cpu_bf16=True)
    bench.bench_train_interleaved(args, [4, 8], [4])
    assert {(path, batch, dtype, autocast) for path, batch, dtype, autocast in built} == {
        ("naive", 4, torch.float32, False), ("product", 4, torch.float32, False), ("product", 8, torch.float32, False),
        ("product", 4, torch.bfloat16, True), ("product", 8, torch.bfloat16, True)}  # the last two: product+bf16
    assert len(args.records) == 5
    for record in args.records:
        assert record["step_s"] == record["batch"] / 100 and record["samples_per_s"] == 100.0


def test_peak_memory_is_the_chosen_gpus_in_gib(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: asked.append(device))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    second_gpu = torch.device("cuda", 1)
    assert bench.peak_gib(second_gpu) == 3.0  # GiB, as the lines and the 16 GiB target say
    bench.reset_peak(second_gpu)
    assert asked == [second_gpu, second_gpu]  # --device cuda:1: not the current device's counters
    assert bench.peak_gib(torch.device("cpu")) is None


def test_naive_step_encodes_the_images_and_takes_full_vocabulary_logits_the_product_does_neither(captioner):
    clip_rows, head_shapes = [], []
    hooks = [captioner.clip.register_forward_hook(lambda m, args, kwargs, out: clip_rows.append(
                 len(kwargs["pixel_values"])), with_kwargs=True),
             captioner.lm.get_output_embeddings().register_forward_hook(
                 lambda m, args, out: head_shapes.append(tuple(out.shape)))]
    try:
        for path in ("naive", "product"):
            step = bench.training_step(captioner, path, 4, TINY_SIZE, torch.device("cpu"), autocast_bf16=False)
            clip_rows.clear(), head_shapes.clear()
            step()
            if path == "naive":
                assert clip_rows == [4], "naive runs CLIP on the step's images, every step"
                vocab, positions = captioner.lm.config.vocab_size, bench.PREFIX_LENGTH + bench.CAPTION_TOKENS
                assert head_shapes == [(4, positions, vocab)], "logits at every position"
            else:
                assert clip_rows == [] and head_shapes == [], "product: cached features, no full logits"
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture
def lm_ends_at_once(captioner):
    """The LM's head makes EOS the greedy choice everywhere (a real LM has an EOS and may end a caption early):
    the captions timed must still have all their new tokens, or captions/s would count shorter work."""
    eos, config = captioner.config.eos_token_id, captioner.lm.generation_config
    had = config.eos_token_id  # None: a random-init LM's config names no EOS, so `generate` never ends early
    config.eos_token_id = eos

    def eos_first(module, args, logits):
        logits = logits.clone()
        logits[..., eos] += 1e4
        return logits

    hook = captioner.lm.get_output_embeddings().register_forward_hook(eos_first)
    yield
    hook.remove()
    config.eos_token_id = had


def spy_on_decoding(monkeypatch, captioner) -> list:
    """The new tokens of every caption decoded, by path."""
    made, plain, greedy = [], bench.plain_generate, captioner.greedy_tokens

    def plain_spy(*args, **kwargs):
        tokens = plain(*args, **kwargs)
        made.append(("plain-generate", tokens.shape[1]))
        return tokens

    def greedy_spy(*args, **kwargs):
        tokens = greedy(*args, **kwargs)
        made.append(("product", tokens.shape[1]))
        return tokens

    monkeypatch.setattr(bench, "plain_generate", plain_spy)
    monkeypatch.setattr(captioner, "greedy_tokens", greedy_spy)
    return made


def test_generate_times_captions_of_24_new_tokens_and_counts_captions(captioner, lm_ends_at_once, monkeypatch):
    made = spy_on_decoding(monkeypatch, captioner)
    monkeypatch.setattr(bench, "timed_interleaved", lambda runs, device, repeats, warmup: {
        path: (run(), 0.5)[1] for path, run in runs.items()})
    args = bench_args()
    bench.bench_generate(args, captioner)
    assert sorted(made) == [("plain-generate", bench.CAPTION_TOKENS), ("product", bench.CAPTION_TOKENS)]
    for record in args.records:
        assert (record["batch"], record["new_tokens"], record["batch_s"]) == (2, bench.CAPTION_TOKENS, 0.5)
        assert record["captions_per_s"] == 2 / 0.5  # captions, not tokens


def test_latency_times_one_photo_from_its_pixels_and_reports_milliseconds(captioner, lm_ends_at_once, monkeypatch):
    made, preprocessed, generate_calls = spy_on_decoding(monkeypatch, captioner), [], []
    real_preprocess, real_generate = captioner.preprocess, captioner.lm.generate
    monkeypatch.setattr(captioner, "preprocess", lambda images: preprocessed.append(len(images)) or
                        real_preprocess(images))
    monkeypatch.setattr(captioner.lm, "generate", lambda *a, **k: generate_calls.append(1) or real_generate(*a, **k))

    def one_call_each(runs, device, repeats, warmup):
        for path, run in runs.items():
            preprocessed.clear(), generate_calls.clear()
            run()
            assert preprocessed == [1], f"{path}: preprocessing the photo is part of its latency"
            assert len(generate_calls) == (path == "plain-generate"), f"{path}: decoded by the wrong loop"
        return {path: 0.0123 for path in runs}, {path: 0.01 for path in runs}

    monkeypatch.setattr(bench, "interleaved_medians", one_call_each)
    args = bench_args()
    bench.bench_latency(args, captioner)
    assert sorted(made) == [("plain-generate", bench.CAPTION_TOKENS), ("product", bench.CAPTION_TOKENS)]
    assert {(r["path"], r["median_ms"], r["median_cpu_ms"], r["batch"]) for r in args.records} == {
        ("plain-generate", 12.3, 10.0, 1), ("product", 12.3, 10.0, 1)}


def test_extraction_counts_the_images_it_encoded(captioner, monkeypatch):
    encoded, real = [], captioner.clip_embeddings
    monkeypatch.setattr(captioner, "clip_embeddings", lambda pixels: encoded.append(len(pixels)) or real(pixels))
    monkeypatch.setattr(bench, "timed", lambda fn, device, repeats, warmup: (fn(), 0.5)[1])
    args = bench_args()
    bench.bench_extract(args, captioner)
    [record] = args.records
    assert encoded == [record["batch"]] and record["images_per_s"] == record["batch"] / 0.5



@pytest.fixture
def compile_counted(monkeypatch) -> list:
    """bench's compiled steps with a quick stand-in for the captioner's loss (the adapter's output squared)
    and a backend that generates no code; returns the graphs torch.compile builds, as they are built."""
    from model import Captioner, TrainingLoss

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(Captioner, "forward", lambda self, image_features, input_ids, labels:
                        self.adapter(image_features).float().square().mean())
    monkeypatch.setattr(bench, "TrainingLoss", lambda *args, **kwargs: TrainingLoss(
        *args, **{**kwargs, "backend": backend}))
    return graphs


def test_a_compiled_step_that_dynamo_ran_eagerly_without_an_error_says_so(compile_counted, monkeypatch):
    # Dynamo skips, without raising, a function it will not compile (past its recompile limit, a frame marked
    # not to compile): TrainingLoss keeps its compiled module, and the step runs eagerly all the same.
    from model import Captioner

    monkeypatch.setattr(Captioner, "forward", torch.compiler.disable(Captioner.forward))
    args = bench_args(repeats=1)
    bench.bench_train(args, "product+compile", 2)
    assert compile_counted == [] and args.records[-1]["compiled"] is False and args.records[-1]["samples_per_s"] > 0


def test_each_compiled_measurement_compiles_its_own_step_however_many_came_before(compile_counted, monkeypatch):
    # One process times compiled steps at several batch sizes and modes; dynamo keeps a few graphs per function
    # (8), and past that ran the next step eagerly while its line said "compiled": true.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # 1 instead of 8: 2 steps, not 9
    args = bench_args(repeats=1)
    for batch in (2, 3):
        bench.bench_train(args, "product+compile", batch)
    assert len(compile_counted) == 2 and [r["compiled"] for r in args.records] == [True, True]
