"""Measure the captioner's speed against the naive way of doing the same job, in one run.

    python bench.py --shapes tiny                  # under a minute on a CPU: checks the benchmark itself
    python bench.py --shapes real                  # CLIP ViT-B/32 + Qwen3-0.6B-Base shapes, random weights
    python bench.py --shapes real --only train --batches 64,256,512 --compile

Speed does not depend on weight values, so random-init backbones with the exact real configs
give the real models' speed; nothing is downloaded. Prints one JSON line per measurement, each
with the device, shapes and batch:

  train      samples/s and peak memory of a full optimizer step. naive = CLIP on every step,
             fp32 frozen weights (+ bf16 autocast on GPU), logits for the whole vocabulary at
             every position (what public prefix-captioning projects do); product = this
             project's step: cached features, frozen weights in the compute dtype, logits at
             caption tokens only, fused AdamW on GPU, and with --compile torch.compile.
  loss       the LM-head loss alone (batch x 24 caption tokens): whole fp32 logits + cross-entropy vs
             the product's chunked frozen-head loss; seconds and peak memory, each in its own process.
  extract    CLIP feature extraction images/s on 224x224 tensors.
  generate   batched greedy captions/s with 24 new tokens: plain `generate` vs this project's loop.
  latency    one image, warm: preprocess + CLIP + adapter + 24 new tokens, median of repeats.
  cold       process start to printed caption: `python inference.py` on a saved run folder.
  quantized  the product step with the frozen LM unquantised, 8-bit and 4-bit: samples/s, peak memory.
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly, not in a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # run_cli turns it back into KeyboardInterrupt

import argparse
import contextlib
import gc
import json
import os
import platform
import queue as queue_module
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eval import pick_device
from model import IGNORE_INDEX, AdapterConfig, Captioner, TrainingLoss, save_adapter
from utils import HelpFormatter, UserError, gpu_computes_in_bf16, read_jsonl, run_cli, whole_number

PREFIX_LENGTH, CAPTION_TOKENS = 10, 24  # Flickr30k captions: ~13 words ~ 17 Qwen tokens + EOS, padded
SECTIONS = ("train", "loss", "extract", "generate", "latency", "cold", "quantized")

# Exactly the configs of openai/clip-vit-base-patch32 (vision tower + projection) and
# Qwen/Qwen3-0.6B-Base (../shared/stack-notes.md); "tiny" is the offline demo's size.
SHAPES = {
    "real": {
        "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=32, image_size=224, projection_dim=512, hidden_act="quick_gelu"),
        "lm": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                   max_position_embeddings=32768, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        "image_size": 224,
    },
    "tiny": {
        "clip": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     patch_size=8, image_size=64, projection_dim=48),
        "lm": dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                   max_position_embeddings=256),
        "image_size": 64,
    },
}
DEFAULT_BATCHES = {("real", "cuda"): "64,256,512", ("real", "cpu"): "4,8", ("tiny", "cuda"): "64,256",
                   ("tiny", "cpu"): "16,64"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int, after_warmup=None) -> float:
    """Mean seconds per call after warm-up calls (which also trigger compilation); `after_warmup` runs
    between the two, off the clock."""
    for _ in range(warmup):
        fn()
    sync(device)
    if after_warmup is not None:
        after_warmup()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def timed_interleaved(functions: dict, device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (A B A B ...), so that load
    from other work on the machine falls on all of them alike; the ratio stays honest."""
    return interleaved_medians(functions, device, repeats, warmup)[0]


def interleaved_medians(functions: dict, device, repeats: int, warmup: int) -> tuple[dict, dict]:
    """timed_interleaved's wall-clock medians, and beside them the medians of this process's CPU seconds
    per call (all its threads): on a shared CPU other jobs stretch the wall time of the same work, by
    30% in one measured case, while its CPU time stays near what the work costs."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    wall, cpu = {name: [] for name in functions}, {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return ({name: statistics.median(values) for name, values in wall.items()},
            {name: statistics.median(values) for name, values in cpu.items()})


def per_second(count: int, seconds: float) -> float:
    """A rate with at least 3 significant digits: a slow one (a real-shaped step on a busy CPU, 0.039
    samples/s) must not be written as 0.0."""
    rate = count / seconds
    return round(rate, 1) if rate >= 100 else float(f"{rate:.3g}")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def emit(args, **record) -> None:
    record = {"device": args.device_name, "shapes": args.shapes, "adapter": args.adapter_kind, **record}
    args.records.append(record)
    print(json.dumps(record), flush=True)
    if getattr(args, "out", ""):  # line by line: a run stopped at a time limit keeps what it measured
        with open(args.out, "a") as out:
            out.write(json.dumps(record) + "\n")


# The targets for one H100 with the real shapes: (what, bench, key, comparison, value).
TARGETS = (
    ("training samples/s, batch 256", "train", "samples_per_s", ">=", 4000),
    ("peak GPU memory of that step, GiB", "train", "peak_mem_gib", "<=", 16),
    ("batched greedy captions/s", "generate", "captions_per_s", ">=", 1500),
    ("one caption warm, ms", "latency", "median_ms", "<=", 100),
    ("CLIP extraction images/s", "extract", "images_per_s", ">=", 3000),
)


BASELINE_PATHS = ("naive", "plain-generate", "full-logits+compile")


def best_product(records, bench: str, key: str, larger_is_better: bool, **match):
    """The product's best record of one bench (the baselines in BASELINE_PATHS are not candidates, nor
    another adapter than the default MLP, the one the targets are for)."""
    rows = [r for r in records if r["bench"] == bench and r.get("path") not in BASELINE_PATHS
            and r.get("adapter", "mlp") == "mlp"
            and all(r.get(k) == v for k, v in match.items()) and r.get(key) is not None]
    return (max if larger_is_better else min)(rows, key=lambda r: r[key]) if rows else None


def path_label(record) -> str:
    """A record's path, with its torch.compile mode, and a note where compilation fell back to eager."""
    label = record.get("path") or record["bench"]
    if record.get("compile_mode"):
        label += f" mode={record['compile_mode']}"
    if record.get("compiled") is False:
        label += ", compile failed: ran eager"
    return label


def target_table(records) -> str:
    """Markdown: each target, the product's best figure from this run, and whether it is met."""
    lines = ["| target | measured (best product path) | met? |", "|---|---|---|"]
    fastest_256 = best_product(records, "train", "samples_per_s", True, batch=256)
    for what, bench, key, comparison, value in TARGETS:
        if bench == "train":
            row = fastest_256
        else:
            row = best_product(records, bench, key, comparison == ">=")
        if row is None or row.get(key) is None:
            lines.append(f"| {what} {comparison} {value:,} | not measured | |")
            continue
        met = row[key] >= value if comparison == ">=" else row[key] <= value
        lines.append(f"| {what} {comparison} {value:,} | {row[key]:,} ({path_label(row)}, batch "
                     f"{row.get('batch', '-')}) | {'yes' if met else '**no**'} |")
    devices = sorted({str(r["device"]) for r in records if "device" in r})
    if devices:  # the targets are an H100's: a figure from another device is read against them by name
        lines.append(f"\nmeasured on: {'; '.join(devices)}")
    other_shapes = {r["shapes"] for r in records if "shapes" in r} - {"real"}
    if other_shapes:  # a tiny-shape figure met against an H100 target means nothing
        lines.append(f"\nnote: these figures are for {', '.join(sorted(other_shapes))} shapes; the targets are for "
                     "the real shapes (--shapes real) on an H100")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Backbones with the real configs and random weights
# ----------------------------------------------------------------------------------------------

def build_backbones(shapes: str, device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Qwen3Config, Qwen3ForCausalLM

    spec = SHAPES[shapes]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of 600M parameters on a CPU takes a while
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["clip"])).to(dtype).eval().requires_grad_(False)
        lm = Qwen3ForCausalLM(Qwen3Config(**spec["lm"])).to(dtype).eval().requires_grad_(False)
    return clip, lm


def image_processor(shapes: str):
    from model import clip_image_processor

    size = SHAPES[shapes]["image_size"]  # CLIPImageProcessor's defaults are ViT-B/32's preprocessing
    return clip_image_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def make_captioner(shapes: str, device, dtype, adapter_kind: str = "mlp") -> Captioner:
    clip, lm = build_backbones(shapes, device, dtype)
    config = AdapterConfig(clip_model=f"random-{shapes}-clip", lm_model=f"random-{shapes}-lm",
                           adapter_kind=adapter_kind, prefix_length=PREFIX_LENGTH,
                           image_feature_dim=clip.visual_projection.out_features, lm_hidden_dim=lm.config.hidden_size,
                           eos_token_id=0, pad_token_id=0,
                           standardize_image_features=True)  # as train.py's adapter (one op on (B, F))
    config.__post_init__()
    captioner = Captioner(config, clip, image_processor(shapes), lm, tokenizer=None)
    captioner.adapter.to(device)
    return captioner


def random_batch(captioner, batch: int, image_size: int, device) -> dict:
    input_ids = torch.randint(1, captioner.lm.config.vocab_size, (batch, CAPTION_TOKENS), device=device)
    features = F.normalize(torch.randn(batch, captioner.config.image_feature_dim, device=device), dim=-1)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "image_features": features,
            "pixel_values": torch.randn(batch, 3, image_size, image_size, device=device)}


# ----------------------------------------------------------------------------------------------
# Training step: naive vs product
# ----------------------------------------------------------------------------------------------

def naive_loss(captioner, pixel_values, input_ids, labels) -> torch.Tensor:
    """The common way: encode the images again, then the LM's own loss over all positions."""
    features = F.normalize(captioner.clip(pixel_values=pixel_values).image_embeds.float(), dim=-1)
    prefix = captioner.adapter(features)  # (B, k, D)
    tokens = captioner.lm.get_input_embeddings()(input_ids)
    embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
    ignore = torch.full((len(input_ids), prefix.shape[1]), IGNORE_INDEX, device=input_ids.device)
    return captioner.lm(inputs_embeds=embeds, labels=torch.cat([ignore, labels], dim=1)).loss


def full_logits_loss(captioner, image_features, input_ids, labels) -> torch.Tensor:
    """The product's step but with plain fp32 logits at every caption position and F.cross_entropy
    (what ../shared/tools/limit_bench.py's lean step does): a baseline for the chunked loss."""
    k = captioner.config.prefix_length
    prefix = captioner.prefix_embeds(image_features)
    embeds = torch.cat([prefix, captioner.lm.get_input_embeddings()(input_ids[:, :-1])], dim=1)
    hidden = captioner.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, k - 1 :]
    logits = captioner.lm.get_output_embeddings()(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def training_step(captioner, path: str, batch: int, image_size: int, device, autocast_bf16: bool, mode=None):
    """One full optimizer step of the given path, as a closure over its own batch and optimizer.
    Paths: naive, product, product+compile, full-logits+compile; `mode` is torch.compile's mode.
    All but naive end in the trainer's own optimizer step (train.optimizer_step: clipping, the
    non-finite check and the host sync it costs), so their figures are what train.py can reach."""
    from accelerate import Accelerator

    from train import optimizer_step

    data = random_batch(captioner, batch, image_size, device)
    optimizer = torch.optim.AdamW(captioner.adapter.parameters(), lr=1e-4, fused=device.type == "cuda")
    constant_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator = Accelerator()  # what optimizer_step asks of it (clipping, reduce) needs no prepare; autocast is ours
    loss_function = TrainingLoss(captioner, compile=path == "product+compile", mode=mode)
    if path == "full-logits+compile":
        loss_function = torch.compile(lambda **b: full_logits_loss(captioner, **b), mode=mode)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)

    def step():
        with autocast:
            if path == "naive":
                loss = naive_loss(captioner, data["pixel_values"], data["input_ids"], data["labels"])
            else:
                loss = loss_function(image_features=data["image_features"], input_ids=data["input_ids"],
                                     labels=data["labels"])
        loss.backward()
        if path == "naive":  # as public projects do: no check of the loss
            torch.nn.utils.clip_grad_norm_(captioner.adapter.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(accelerator, captioner.adapter, optimizer, constant_lr, [loss.detach()], 1.0)

    step.loss_function = loss_function
    return step


def bench_train(args, path: str, batch: int, mode: str | None = None) -> None:
    device = args.device
    gpu_bf16 = device.type == "cuda" and gpu_computes_in_bf16()
    # naive keeps fp32 weights; the product stores frozen weights in the compute dtype (bf16 on GPU).
    weights_dtype = torch.bfloat16 if (path != "naive" and gpu_bf16) else torch.float32
    captioner = step = None
    try:
        graphs_before = fresh_compile_cache() if "compile" in path else None
        captioner = make_captioner(args.shapes, device, weights_dtype, args.adapter_kind)
        step = training_step(captioner, path, batch, SHAPES[args.shapes]["image_size"], device, gpu_bf16, mode)
        # The peak counts from after the warm-up: the weights, the batch and the optimizer's state stay in it;
        # the random init does not (built in fp32, then cast to bf16: a transient 2.5 GiB on the real shapes,
        # above a small batch's whole step), nor what compiling holds for a while (autotuning's trial buffers,
        # the eager run before CUDA graphs are recorded). Compiled paths warm up 3 times: with reduce-overhead
        # the first call runs eagerly, the second records the CUDA graph, the third replays it.
        seconds = timed(step, device, args.repeats, 3 if "compile" in path else 1,
                        after_warmup=lambda: reset_peak(device))
    except Exception as error:  # one failed measurement (out of memory, a compiler error) must not end the run
        emit(args, bench="train", path=path, compile_mode=mode, batch=batch, error=one_line(error))
    else:
        emit(args, bench="train", path=path, compile_mode=mode, compiled=compile_held(path, step, graphs_before),
             batch=batch, prefix_tokens=PREFIX_LENGTH, caption_tokens=CAPTION_TOKENS,
             weights_dtype=str(weights_dtype).replace("torch.", ""), autocast_bf16=gpu_bf16,
             step_s=round(seconds, 4), samples_per_s=per_second(batch, seconds), peak_mem_gib=peak_gib(device))
        if args.profile and batch == max(args.batches_list) and "compile" in path and mode is None:
            try:
                profile_step(args, step, f"{path} batch {batch}")
            except Exception as error:  # outside the try above: a failed profile (the GPU's profiler, CUPTI)
                # would end bench.py and lose the --variants still to be timed; the step's figure is written
                print(f"profile of {path} batch {batch} failed: {one_line(error)}", flush=True)
    finally:
        del step, captioner
        gc.collect()
        reset_peak(device)


def fresh_compile_cache() -> int | None:
    """Empty torch.compile's in-process cache before a compiled measurement; returns graphs_built(). One cache
    served a run's every compiled path, and past dynamo's recompile limit (8 graphs of one function: 8 batch
    sizes) it ran the next step eagerly without a word, while the line said "compiled": true."""
    torch.compiler.reset()
    return graphs_built()


def graphs_built() -> int | None:
    """How many graphs torch.compile has built in this process: dynamo's own count, private to torch (None
    where it is missing)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return counters["stats"]["unique_graphs"]


def compile_held(path: str, step, graphs_before: int | None) -> bool | None:
    """For a compiled path, whether torch.compile held, and the line must say so where it did not: False where
    TrainingLoss fell back to eager after an error, or where no graph was built since `graphs_before` (from
    an empty cache, so the step's own): dynamo skips a function it will not compile without raising. None for
    an eager path."""
    if "compile" not in path:
        return None
    built = graphs_built()
    no_graph = None not in (built, graphs_before) and built == graphs_before
    return getattr(step.loss_function, "compiled", True) is not None and not no_graph


def one_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def profile_step(args, step, label: str) -> None:
    """What limits a step: GPU kernel time by kind, and GPU busy time against wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step(); sync(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as trace:
        for _ in range(3):
            step()
        sync(args.device)
    wall = (time.perf_counter() - start) / 3
    events = trace.key_averages()
    # Kernel events only (as the profiler's own total counts them): an op's device time is its kernels'.
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 3 / 1e6
    print(f"profile of {label}: wall {wall * 1000:.1f} ms/step, GPU kernels busy {busy * 1000:.1f} ms/step",
          flush=True)
    print(events.table(sort_by="self_device_time_total" if args.device.type == "cuda" else "self_cpu_time_total",
                       row_limit=25, max_name_column_width=70), flush=True)


def bench_train_interleaved(args, batches: list[int], naive_batches: list[int]) -> None:
    """On a CPU (shared, noisy): both paths on the same batch sizes, timed in turn. fp32, as train.py's
    --mixed-precision auto trains on a CPU; with --cpu-bf16 also the product step as `--mixed-precision bf16`
    trains it (frozen weights in bf16, bf16 autocast), which CPUs with bf16 matrix units (AMX) run faster."""
    device, size = args.device, SHAPES[args.shapes]["image_size"]
    captioner = make_captioner(args.shapes, device, torch.float32, args.adapter_kind)
    bf16_captioner = make_captioner(args.shapes, device, torch.bfloat16, args.adapter_kind) if args.cpu_bf16 else None
    for batch in sorted(set(batches) | set(naive_batches)):
        paths = (["naive"] if batch in naive_batches else []) + (["product"] if batch in batches else [])
        if args.compile and batch in batches:
            paths.append("product+compile")
        if bf16_captioner is not None and batch in batches:
            paths.append("product+bf16")

        def step_of(path):
            if path == "product+bf16":
                return training_step(bf16_captioner, "product", batch, size, device, autocast_bf16=True)
            return training_step(captioner, path, batch, size, device, False)

        try:
            graphs_before = fresh_compile_cache() if "product+compile" in paths else None
            steps = {path: step_of(path) for path in paths}
            seconds = timed_interleaved(steps, device, args.repeats, 3 if args.compile else 1)
        except Exception as error:  # as on a GPU: a failed batch size (out of memory) is a line, the run goes on
            for path in paths:
                emit(args, bench="train", path=path, compile_mode=None, batch=batch, error=one_line(error))
            continue
        for path in paths:
            # The same keys as a GPU line; `compiled` says where torch.compile fell back to eager.
            bf16 = path == "product+bf16"
            emit(args, bench="train", path=path, compile_mode=None,
                 compiled=compile_held(path, steps[path], graphs_before), batch=batch, prefix_tokens=PREFIX_LENGTH,
                 caption_tokens=CAPTION_TOKENS,
                 weights_dtype="bfloat16" if bf16 else "float32", autocast_bf16=bf16, step_s=round(seconds[path], 4),
                 samples_per_s=per_second(batch, seconds[path]), peak_mem_gib=None, timing="median, paths interleaved")


def bench_quantized(args) -> None:
    """The product step with the frozen LM in bf16/fp32, 8-bit and 4-bit (bitsandbytes): speed and
    peak memory, at the smallest --batches batch. The LM goes through a saved folder because
    bitsandbytes quantises while from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    from model import freeze, keep_4bit_weights_differentiable, lm_quantization_config

    device, batch = args.device, min(args.batches_list)
    gpu_bf16 = device.type == "cuda" and gpu_computes_in_bf16()
    dtype = compute_dtype(device)
    with tempfile.TemporaryDirectory() as folder:
        captioner = make_captioner(args.shapes, device, dtype, args.adapter_kind)
        captioner.lm.save_pretrained(folder)
        for mode in ("none", "8bit", "4bit"):
            # In this frame, not a helper's: a frame kept alive elsewhere (a logged exception's traceback holds
            # its callers) would keep a returned helper's LM, in the next mode's peak.
            captioner.lm = lm = step = None  # the previous mode's LM and optimizer must not count in this one's peak
            gc.collect()
            reset_peak(device)
            try:
                quantization = lm_quantization_config(mode, device)
                extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
                lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
                keep_4bit_weights_differentiable(lm)  # as build_captioner does: the step train.py runs
                captioner.lm = freeze(lm if quantization else lm.to(device))
                step = training_step(captioner, "product", batch, SHAPES[args.shapes]["image_size"], device, gpu_bf16)
                # Reset again after the warm-up, as bench_train does: the peak is the step's (the LM, the batch, the
                # optimizer's state), not loading's (a tensor at a time read in bf16, then quantised).
                seconds = timed(step, device, args.repeats, 1, after_warmup=lambda: reset_peak(device))
            except Exception as error:  # one mode failing (bitsandbytes' CUDA library, its int8 kernels) is a line:
                # the next mode's figure is still measured
                emit(args, bench="quantized", lm_quantization=mode, batch=batch, error=one_line(error))
                continue
            emit(args, bench="quantized", lm_quantization=mode, batch=batch, caption_tokens=CAPTION_TOKENS,
                 samples_per_s=per_second(batch, seconds), peak_mem_gib=peak_gib(device))


def head_loss_run(path: str, rows: int, shapes: str, device_type: str, repeats: int, queue) -> None:
    """In a fresh process (so that its peak memory is its own): the LM-head loss alone, forward and
    backward, for `rows` caption tokens; puts (seconds, peak GiB) on the queue."""
    import resource

    from model import frozen_head_cross_entropy

    device = torch.device(device_type)
    vocab, hidden_size = SHAPES[shapes]["lm"]["vocab_size"], SHAPES[shapes]["lm"]["hidden_size"]
    dtype = compute_dtype(device)
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden_size, device=device).mul_(0.02).to(dtype)  # in place: no transient copy
    # that would raise the peak before the measurement starts
    hidden = torch.randn(rows, hidden_size, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device=device)
    sync(device)
    reset_peak(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if path == "chunked":
            loss = frozen_head_cross_entropy(hidden, weight, labels)
        else:  # what most projects do: the whole logits in fp32, then cross-entropy
            loss = F.cross_entropy((hidden @ weight.t()).float(), labels)
        loss.backward()
        hidden.grad = None

    seconds = timed(step, device, repeats, 1)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB (Linux)
    queue.put((seconds, peak_gib(device) if device.type == "cuda" else round(rss, 2)))


def bench_loss(args) -> None:
    """The LM-head loss alone at the largest --batches batch: plain full fp32 logits vs the chunked
    frozen-head loss the product uses. Each path runs in its own process for an honest peak."""
    import multiprocessing

    rows = max(args.batches_list) * CAPTION_TOKENS
    context = multiprocessing.get_context("spawn")
    for path in ("plain", "chunked"):
        queue = context.Queue()
        child = context.Process(target=head_loss_run,
                                args=(path, rows, args.shapes, args.device.type, args.repeats, queue))
        child.start()
        result = None
        while result is None and (child.is_alive() or not queue.empty()):
            with contextlib.suppress(queue_module.Empty):
                result = queue.get(timeout=1)  # a child that dies (out of memory, a crash) puts nothing
        child.join()
        if result is None:
            emit(args, bench="loss", path=path, rows=rows, error=f"the measuring process exited with {child.exitcode}")
            continue
        seconds, peak = result
        emit(args, bench="loss", path=path, rows=rows, vocab=SHAPES[args.shapes]["lm"]["vocab_size"],
             step_s=round(seconds, 4), peak_mem_gib=peak,
             memory="peak allocated on the GPU" if args.device.type == "cuda" else "peak RSS growth of the process")


# ----------------------------------------------------------------------------------------------
# Extraction, generation, latency
# ----------------------------------------------------------------------------------------------

def compute_dtype(device):
    return torch.bfloat16 if device.type == "cuda" and gpu_computes_in_bf16() else torch.float32


def bench_extract(args, captioner) -> None:
    device, size = args.device, SHAPES[args.shapes]["image_size"]
    batch = 256 if device.type == "cuda" else 32
    pixel_values = torch.randn(batch, 3, size, size, device=device)
    seconds = timed(lambda: captioner.clip_embeddings(pixel_values), device, args.repeats, 1)
    emit(args, bench="extract", batch=batch, image_size=size, images_per_s=per_second(batch, seconds))


def plain_generate(captioner, prefix, new_tokens: int):
    attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    return captioner.lm.generate(inputs_embeds=prefix, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def generation_features(args, captioner) -> torch.Tensor:
    batch = args.generate_batch or (512 if args.device.type == "cuda" else 16)
    return F.normalize(torch.randn(batch, captioner.config.image_feature_dim, device=args.device), dim=-1)


def bench_generate(args, captioner) -> None:
    device = args.device
    features = generation_features(args, captioner)
    batch = len(features)
    with torch.no_grad():
        prefix = captioner.prefix_embeds(features)
    runs = {"plain-generate": lambda: plain_generate(captioner, prefix, CAPTION_TOKENS),
            "product": lambda: captioner.greedy_tokens(prefix, CAPTION_TOKENS, stop_at_eos=False)}
    if (twin := cpu_bf16_twin(args, captioner)) is not None:
        with torch.no_grad():
            twin_prefix = twin.prefix_embeds(features)
        runs["product+bf16"] = lambda: twin.greedy_tokens(twin_prefix, CAPTION_TOKENS, stop_at_eos=False)
    repeats = max(1, args.repeats // 2)
    with torch.no_grad():
        seconds = timed_interleaved(runs, device, repeats, 1)
    for path in runs:
        emit(args, bench="generate", path=path, batch=batch, new_tokens=CAPTION_TOKENS,
             captions_per_s=per_second(batch, seconds[path]), batch_s=round(seconds[path], 3))


def bench_generate_compiled(args, captioner) -> None:
    features = generation_features(args, captioner)
    batch = len(features)
    with torch.no_grad():
        prefix = captioner.prefix_embeds(features)
    compiled = compiled_decode_seconds(args, captioner, lambda: captioner.greedy_tokens(
        prefix, CAPTION_TOKENS, stop_at_eos=False), max(1, args.repeats // 2))
    if compiled:
        emit(args, bench="generate", path="product+compiled-decode", compiled=compiled[1], batch=batch,
             new_tokens=CAPTION_TOKENS, captions_per_s=per_second(batch, compiled[0]), batch_s=round(compiled[0], 3))


def cpu_bf16_twin(args, captioner):
    """With --cpu-bf16 on a CPU: a captioner of the same shapes and adapter with its frozen weights in bf16,
    as a run trained under --mixed-precision bf16 captions its validation images; built once. None otherwise."""
    if not (args.cpu_bf16 and args.device.type == "cpu"):
        return None
    if getattr(args, "bf16_twin", None) is None:
        args.bf16_twin = make_captioner(args.shapes, args.device, torch.bfloat16, args.adapter_kind)
        args.bf16_twin.adapter.load_state_dict(captioner.adapter.state_dict())
    return args.bf16_twin


def compiled_decode_seconds(args, captioner, run, repeats: int):
    """With --compile on a GPU: (median seconds of `run` with the compiled decoding step, whether it
    stayed compiled). None where compiled decoding does not apply."""
    if not (args.compile and captioner.enable_compiled_decoding()):
        return None
    try:
        with torch.no_grad():
            seconds = timed_interleaved({"compiled": run}, args.device, repeats, 3)["compiled"]
        return seconds, captioner.decode_step is not None  # decoding falls back to eager if it cannot compile
    finally:
        captioner.decode_step, captioner._static_caches = None, {}


def latency_image():
    """A photo-sized random RGB image: preprocessing (resize, crop) is part of the latency."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))


def caption_one(captioner, image, use_plain: bool = False):
    """One image end to end, as inference.py does it; plain generate as the baseline."""
    with torch.no_grad():
        prefix = captioner.prefix_embeds(captioner.image_features(captioner.preprocess([image])))
        if use_plain:
            return plain_generate(captioner, prefix, CAPTION_TOKENS)
        return captioner.greedy_tokens(prefix, CAPTION_TOKENS, stop_at_eos=False)


def bench_latency(args, captioner) -> None:
    """One image's caption, warm."""
    image = latency_image()
    runs = {"plain-generate": lambda: caption_one(captioner, image, use_plain=True),
            "product": lambda: caption_one(captioner, image)}
    if (twin := cpu_bf16_twin(args, captioner)) is not None:
        runs["product+bf16"] = lambda: caption_one(twin, image)
    seconds, cpu_seconds = interleaved_medians(runs, args.device, args.repeats, 2)
    for path, value in seconds.items():
        # On a CPU the process's CPU time is the steadier figure on a shared machine; on a GPU it measures
        # only the host's share of the work, so it is left out there.
        on_cpu = {"median_cpu_ms": round(1000 * cpu_seconds[path], 1)} if args.device.type == "cpu" else {}
        emit(args, bench="latency", path=path, batch=1, new_tokens=CAPTION_TOKENS, median_ms=round(1000 * value, 1),
             **on_cpu)


def bench_latency_compiled(args, captioner) -> None:
    image = latency_image()
    compiled = compiled_decode_seconds(args, captioner, lambda: caption_one(captioner, image), args.repeats)
    if compiled:
        emit(args, bench="latency", path="product+compiled-decode", compiled=compiled[1], batch=1,
             new_tokens=CAPTION_TOKENS, median_ms=round(1000 * compiled[0], 1))


def save_run_folder(captioner, folder: Path) -> Path:
    """A run folder inference.py accepts: the random backbones saved as from_pretrained folders."""
    from transformers.utils import logging as hf_logging

    from demo import build_tokenizer

    hf_logging.disable_progress_bar()
    clip_dir, lm_dir, run_dir = folder / "clip", folder / "lm", folder / "run"
    captioner.clip.save_pretrained(clip_dir)
    captioner.processor.save_pretrained(clip_dir)
    captioner.lm.save_pretrained(lm_dir)
    tokenizer = build_tokenizer(["a photo of a dog on the grass"] * 4)
    tokenizer.save_pretrained(lm_dir)
    config = captioner.config
    config.clip_model, config.lm_model, config.vocab_size = str(clip_dir), str(lm_dir), len(tokenizer)
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    save_adapter(run_dir, captioner.adapter, config)
    return run_dir


def bench_cold(args, captioner) -> None:
    """Process start to printed caption, for a fresh `python inference.py` (median of 3)."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        run_dir = save_run_folder(captioner, Path(folder))
        image = Path(folder) / "photo.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(image)
        command = [sys.executable, str(Path(__file__).with_name("inference.py")), "--checkpoint", str(run_dir),
                   str(image), "--max-new-tokens", str(CAPTION_TOKENS), "--device", args.device.type]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:  # an exception, not SystemExit: the run records it and goes on
                last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
                raise RuntimeError(f"inference.py failed: {last_line}")
    emit(args, bench="cold", command="python inference.py --checkpoint RUN photo.jpg", new_tokens=CAPTION_TOKENS,
         median_s=round(statistics.median(times), 2))


# ----------------------------------------------------------------------------------------------
# The command line: flag values are checked by their argparse types, so a bad one is one line
# before anything is built, not a traceback (or a division by zero) half-way through the run.
# ----------------------------------------------------------------------------------------------

def section_list(text: str) -> list[str]:
    sections = [s for s in text.split(",") if s]
    if not sections:
        raise argparse.ArgumentTypeError(f"name at least one of {', '.join(SECTIONS)}")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return sections


def batch_list(text: str) -> list[int]:
    """Comma-separated batch sizes, each >= 1; "" (the default) is an empty list: sizes by shapes and device."""
    try:
        batches = [int(b) for b in text.split(",")] if text else []
    except ValueError:
        batches = [0]
    if any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return batches


# torch.compile's modes, and the plain-logits baseline.
VARIANT_NAMES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "full-logits")


def variant_list(text: str) -> list[tuple[str, int | None]]:
    """NAME@BATCH,... as (NAME, BATCH); BATCH may be left out (None: the largest --batches)."""
    variants = []
    for variant in filter(None, text.split(",")):
        name, _, batch = variant.partition("@")
        if not name or (batch and not (batch.isdigit() and int(batch) >= 1)):
            raise argparse.ArgumentTypeError(f"expected NAME@BATCH with BATCH a whole number >= 1, got {variant!r}")
        if name not in VARIANT_NAMES:
            raise argparse.ArgumentTypeError(f"unknown variant {name!r}; choose from {', '.join(VARIANT_NAMES)}")
        variants.append((name, int(batch) if batch else None))
    return variants


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--shapes", choices=tuple(SHAPES), default="tiny", help="backbone shapes (random weights)")
    parser.add_argument("--only", type=section_list, default=",".join(s for s in SECTIONS if s != "quantized"),
                        help=f"comma-separated sections of {SECTIONS} (default: all but quantized)")
    parser.add_argument("--batches", type=batch_list, default="",
                        help="training batch sizes (default: by shapes and device)")
    parser.add_argument("--naive-batches", type=batch_list, default="", help="naive-path batch sizes (default: the "
                        "smallest of --batches, so both paths are compared at an equal batch)")
    parser.add_argument("--generate-batch", type=whole_number(1), default=None,
                        help="batch for captions/s (default 512 GPU, 16 CPU)")
    parser.add_argument("--repeats", type=whole_number(1), default=5, help="timed repeats per measurement")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile paths")
    parser.add_argument("--device", default="auto", help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--cpu-bf16", action="store_true", help="on a CPU, also time the product training step in "
                        "bf16, as train.py --mixed-precision bf16 trains (frozen weights in bf16, bf16 autocast), "
                        "and greedy captions with bf16 frozen weights (generate, latency): CPUs with AMX (Xeon "
                        "Sapphire Rapids and later) run them faster")
    parser.add_argument("--variants", type=variant_list, default="",
                        help="GPU only: more compiled training steps to time, as NAME@BATCH with NAME a "
                        "torch.compile mode (reduce-overhead, max-autotune, ...) or full-logits (plain fp32 "
                        "logits + F.cross_entropy instead of the chunked loss)")
    parser.add_argument("--adapter-kind", choices=("mlp", "transformer"), default="mlp",
                        help="the adapter every path trains and captions with (the targets are for mlp)")
    parser.add_argument("--profile", action="store_true", help="profile the compiled step at the largest batch")
    parser.add_argument("--targets", action="store_true", help="end with a table of the issue's H100 targets "
                        "against this run's best product figures")
    parser.add_argument("--out", default="", help="also write the JSON lines to this file")
    parser.add_argument("--targets-from", nargs="+", metavar="JSONL", default=None,
                        help="measure nothing: print the targets table from the --out files of earlier runs "
                        "(a GPU lease's runs split into several calls)")
    return parser


def targets_from(paths: list[str]) -> str:
    """The targets table over the measurements of several --out files."""
    records = []
    for path in paths:
        if Path(path).is_dir():  # "no such file" sent people looking for a folder that is there
            inside = sorted(str(found) for found in Path(path).glob("*.jsonl"))
            raise UserError(f"--targets-from {path} is a folder; give the --out files of earlier bench.py runs "
                            + (f"in it ({' '.join(inside[:3])}{' ...' if len(inside) > 3 else ''})" if inside else
                               "(it holds no .jsonl file)"))
        if not Path(path).is_file():
            raise UserError(f"--targets-from {path}: no such file; give the --out files of earlier bench.py runs")
        try:
            lines = read_jsonl(path)
        except (UserError, UnicodeDecodeError):  # e.g. the README named instead of bench.jsonl
            raise UserError(f"--targets-from {path}: not a JSON-lines file; give the --out files of earlier "
                            "bench.py runs") from None
        records += [r for r in lines if isinstance(r, dict) and "bench" in r]
    if not records:
        raise UserError(f"--targets-from {' '.join(paths)}: no measurements in these files")
    refuse_mixed_runs(paths, records)
    return target_table(records)


def refuse_mixed_runs(paths: list[str], records: list[dict]) -> None:
    """The table takes each target's best figure from any record, so files of several devices or shapes
    would pair, say, one GPU's training with another's latency, or a tiny-shape figure with a real one."""
    for key in ("device", "shapes"):
        values = sorted({str(r[key]) for r in records if key in r})
        if len(values) > 1:
            raise UserError(f"--targets-from {' '.join(paths)}: measurements of more than one {key} "
                            f"({'; '.join(values)}); give the files of one device's run at one --shapes")


# The sections each flag steers: given where --only names none of them, it changes no measurement.
FLAG_SECTIONS = {"batches": ("train", "loss", "quantized"), "naive_batches": ("train",),
                 "generate_batch": ("generate",), "compile": ("train", "latency", "generate"),
                 "variants": ("train",), "profile": ("train",), "cpu_bf16": ("train", "generate", "latency")}


def given_flags(args) -> list[str]:
    """The flags whose values differ from their defaults (as parsed), as --names."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    return [action.option_strings[0] for action in parser._actions
            if action.option_strings and action.dest != "help" and getattr(args, action.dest) != defaults[action.dest]]


def check_targets_from_alone(args) -> None:
    """--targets-from measures nothing: a measuring flag beside it was taken without a word."""
    ignored = [flag for flag in given_flags(args) if flag != "--targets-from"]
    if ignored:
        raise UserError(f"--targets-from measures nothing, so {', '.join(ignored)} would do nothing: give them to "
                        "the runs that measure, or leave them out")


def flags_that_change_nothing(args) -> list[str]:
    """Notes on flags given where they change no measurement: sections --only leaves out, and --profile, which
    profiles the compiled training step on a GPU only (each was taken without a word)."""
    notes = []
    for name, sections in FLAG_SECTIONS.items():
        if getattr(args, name) and not set(sections) & set(args.only):
            notes.append(f"note: --{name.replace('_', '-')} changes nothing: it is for the {', '.join(sections)} "
                         f"section{'s' if len(sections) > 1 else ''}, and --only names {','.join(args.only)}")
    if args.profile and "train" in args.only and not (args.compile and args.device.type == "cuda"):
        notes.append("note: --profile changes nothing: it profiles the compiled training step (--compile) on a GPU")
    return notes


def check_args(args) -> None:
    """What the flags' types cannot check alone, before anything is built."""
    args.device = pick_device(args.device)
    if args.device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: bench.py measures on cpu or cuda")
    if args.cpu_bf16 and args.device.type != "cpu":  # a GPU's lines are bf16 already where it has bf16
        print("note: --cpu-bf16 adds bf16 lines on a CPU only; on this GPU it changes nothing", file=sys.stderr)
    if args.out and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
        raise UserError(f"--out {args.out}: give a file in an existing folder (each JSON line is written "
                        "there as it is measured)")
    for line in flags_that_change_nothing(args):
        print(line, file=sys.stderr)


def run_section(args, section: str, measure) -> None:
    """One section's measurements. One that fails (out of memory, a compiler error, inference.py
    exiting) is a line with "error", as a failed training step is, and the run goes on to the next
    section. Ctrl-C and a time limit's SIGTERM are not Exceptions: they still end the run."""
    try:
        measure()
    except Exception as error:
        emit(args, bench=section, error=one_line(error))
    finally:
        gc.collect()
        reset_peak(args.device)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.targets_from:
        check_targets_from_alone(args)
        print(targets_from(args.targets_from), flush=True)
        return 0
    check_args(args)
    args.device_name = device_name(args.device)
    args.records = []
    if args.out:
        try:
            Path(args.out).write_text("")  # emit() appends each measurement as it is made
        except OSError as error:
            raise UserError(f"--out {args.out} cannot be written ({error.strerror or error}); name a writable file")
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sections = args.only
    batches = args.batches or [int(b) for b in DEFAULT_BATCHES[(args.shapes, args.device.type)].split(",")]
    args.batches_list = batches
    naive_batches = args.naive_batches or [min(batches)]  # as --help says: the smallest, whatever the order
    print(json.dumps({"torch": torch.__version__, "device": args.device_name, "shapes": args.shapes,
                      "threads": torch.get_num_threads(), "pid": os.getpid()}), flush=True)
    if "train" in sections and args.device.type == "cpu":
        if args.variants:
            print("note: --variants are measured on a GPU only; skipped on this CPU", flush=True)
        run_section(args, "train", lambda: bench_train_interleaved(args, batches, naive_batches))
    elif "train" in sections:  # a GPU: one path at a time, so each gets its own peak memory
        for batch in naive_batches:
            bench_train(args, "naive", batch)
        for batch in batches:
            bench_train(args, "product", batch)
            if args.compile:
                bench_train(args, "product+compile", batch)
        for name, batch in args.variants:  # e.g. reduce-overhead@256
            path, mode = (("full-logits+compile", None) if name == "full-logits" else ("product+compile", name))
            bench_train(args, path, batch or max(batches), mode)
    if "loss" in sections:
        run_section(args, "loss", lambda: bench_loss(args))
    if "quantized" in sections:
        run_section(args, "quantized", lambda: bench_quantized(args))
    captioner = None  # built once for the sections that share it

    def shared_captioner():
        nonlocal captioner
        if captioner is None:
            captioner = make_captioner(args.shapes, args.device, compute_dtype(args.device), args.adapter_kind)
        return captioner

    for section in (s for s in sections if s not in ("train", "loss", "quantized")):
        bench_section = {"extract": bench_extract, "generate": bench_generate, "latency": bench_latency,
                         "cold": bench_cold}[section]
        run_section(args, section, lambda: bench_section(args, shared_captioner()))
    # Compiled decoding after every eager figure: compiling leaves worker processes busy and CUDA graphs
    # hold a memory pool, which would weigh on what is timed next; latency first, the target that needs it.
    for section, bench_section in (("latency", bench_latency_compiled), ("generate", bench_generate_compiled)):
        if args.compile and section in sections:
            run_section(args, section, lambda: bench_section(args, shared_captioner()))
    if args.targets:
        print(target_table(args.records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
