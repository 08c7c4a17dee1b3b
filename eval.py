"""Caption a split with a trained run, score it as the papers do, beside a baseline, and show it.

    python eval.py saved_models/demo                          # the run's test split, greedy
    python eval.py saved_models/demo --split val --limit 100 --strategy beam --num-beams 5   # into demo/eval-val/
    python eval.py saved_models/demo/last                     # the last adapter instead of the best
    python eval.py saved_models/demo --decoding-sweep         # greedy, beam 3, beam 5, nucleus: one table
    python eval.py --compare saved_models/a saved_models/b    # runs side by side, from their metrics.json
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 eval.py saved_models/demo   # N processes (CPU)
    accelerate launch -q eval.py saved_models/demo                                  # N GPUs

Scores: the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) exactly as pycocoevalcap
computes them on PTB-tokenised, lower-cased text, over the whole split (see metrics.py); plus
the rouge-score package's ROUGE-L and NLTK's BLEU-4, labelled as such. Tables print scores x100,
as papers do; metrics.json keeps pycocoevalcap's raw values (CIDEr-D 0-10, the others 0-1).

Baseline: every evaluation also captions each image with the first caption of the training image
whose CLIP feature is nearest (cosine). An adapter that does not beat it on CIDEr-D is flagged.

Writes into the run folder (or --out): metrics.json, predictions.jsonl (per-image scores and the
baseline caption), report.html (self-contained: gallery worst first, metrics, curves),
curve_loss.png and curve_val_metrics.png (from the run's train_log.jsonl), and with
--decoding-sweep decoding_sweep.json. The run folder's own are of the test split (as training's final
evaluation wrote them); another split's go into RUN/eval-val/ or RUN/eval-train/ unless --out says where.
--compare reads each run's metrics.json (evaluate a run first; nothing is re-evaluated implicitly; RUN/eval-val
for its val figures) and with --out writes comparison.md and comparison.json.
"""
from __future__ import annotations

import gc
import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly, not in a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # run_cli turns it back into KeyboardInterrupt
    gc.disable()  # until the captioner has loaded: see utils.resume_gc_after_loading

import argparse
import contextlib
import dataclasses
import html
import io
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset import (DATASETS, FLICKR30K_PARQUET, FOLDER_SPLIT_OF_OLDER_RUNS, IMAGE_SUFFIXES, SPLITS, check_data_flags,
                     dataset_from_data_dir, dataset_of_folder, dealt_names, drop_unreadable, encoder_fingerprint,
                     extract_features, file_identity, held_out_past, limit_records, load_records,
                     one_reading_per_folder, run_feature_cache, split_deal)
from demo import in_demo_cache, rebuild_cleared_demo
from metrics import COCO_METRICS, COCO_VARIANT, TOKENIZATION_DETAILS, coco_metrics, start_meteor
from model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LM_QUANTIZATIONS, AdapterConfig, DecodingConfig, load_captioner,
                   MAX_NUM_BEAMS, adapter_training, checkpoint_folder, json_kind, lm_quantization_of,
                   no_adapter_weights, not_a_run_folder)
from report import (EXTRA_METRICS, GALLERY_SIZE, LOSS_CURVE, METRIC_CURVE, REPORT_FILE, baseline_verdict,
                    collapse_line, percent, sweep_rows, write_report)
from utils import (BLEU_VARIANT, MAX_RECORDS_JSON_BYTES, ROUGE_L_VARIANT, HelpFormatter, Processes, UserError,
                   add_dtype_flag, another_process_ended, caption_diversity, caption_metrics, default_image_workers,
                   file_digest, for_terminal,
                   format_table, gpu_computes_in_bf16, ids_digest, keep_going_if_the_reader_leaves, stopping_together,
                   json_value, nearest_existing, not_a_link, not_empty, note, read_json, removed_unless_renamed,
                   replace_durably, run_cli, resume_gc_after_loading, run_folder_argument,
                   usage_errors_once_per_machine, waiting_lock, weights_digest, whole_number, write_json, write_jsonl,
                   write_text)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
SWEEP_FILE = "decoding_sweep.json"
COMPARISON_FILES = ("comparison.md", "comparison.json")
# What an evaluation writes into its folder, and deletes there when it does not write it (write_outputs_in).
EVAL_OUTPUTS = (METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE, SWEEP_FILE, LOSS_CURVE, METRIC_CURVE)
OUTPUTS_LOCK = ".eval.lock"
OUTPUTS_STAGE = ".eval-outputs.tmp"  # where write_outputs_in writes them all before any replaces an earlier one
SPLIT_FOLDER_PREFIX = "eval-"  # RUN/eval-val/: where another split than test writes without --out (outputs_folder)
# Names of a file, not of the folder --out takes: the outputs' own kinds, and tables'.
FILE_SUFFIXES = {".json", ".jsonl", ".html", ".htm", ".md", ".csv", ".tsv", ".txt", ".png"}
TRAIN_LOG = "train_log.jsonl"
BASELINE = "nearest-neighbour baseline"
BASELINE_METHOD = ("for each image, the first caption of the training image whose CLIP feature is most cosine-similar "
                   "(ties: the earliest training image)")
DECIDING_METRIC = "coco_cider_d"  # the adapter must beat the baseline on this one
# A scored image whose CLIP feature is a training image's to this cosine is taken for a copy of it (same_picture_note).
# An identical file decodes to identical pixels: its feature came out the same to within 1.2e-7 of cosine 1 (CPU,
# fp32 and bf16, in other batches; the real ViT-B/32's shape too; not measured on a GPU). Distinct demo images came
# within 4.8e-5 of 1 (a val image and a training one of the same shape, colours and place), nearer than a copy
# re-saved as JPEG (7e-5 to 4e-3, quality 95 to 20): only exact copies can be told apart, so only they are named.
SAME_FEATURE_COSINE = 1 - 1e-5
SCALE_NOTE = "raw pycocoevalcap values: CIDEr-D in 0-10, the others in 0-1; tables print x100"
# The decoding comparison: the same split, the same seed for sampling.
SWEEP_DECODINGS = (DecodingConfig(), DecodingConfig(strategy="beam", num_beams=3),
                   DecodingConfig(strategy="beam", num_beams=5),
                   DecodingConfig(strategy="sample", top_p=0.9, temperature=1.0))


# What torch.manual_seed takes, with room for eval's per-batch offsets (seed + batch index).
SEED_RANGE = (-(2**63), 2**63 - 1)
SEED_DEFAULT = 0  # --seed unless given
MAX_NEW_TOKENS = 1024  # a caption; the LM's own context bounds it further (Captioner.generate)


# The strategy-specific flags: their defaults, and the strategy each belongs to.
DECODING_DEFAULTS = {"num_beams": 3, "temperature": 0.7, "top_p": 0.9}
STRATEGY_OF = {"num_beams": "beam", "temperature": "sample", "top_p": "sample"}


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--strategy", choices=("greedy", "beam", "sample"), default=None,
                       help="decoding strategy (default: greedy, or beam given --num-beams, sample given "
                            "--temperature or --top-p)")
    group.add_argument("--num-beams", type=whole_number(2, MAX_NUM_BEAMS), default=None,
                       help=f"beam width for --strategy beam (default {DECODING_DEFAULTS['num_beams']})")
    group.add_argument("--temperature", type=float, default=None,
                       help=f"temperature for --strategy sample (default {DECODING_DEFAULTS['temperature']})")
    group.add_argument("--top-p", type=float, default=None,
                       help=f"nucleus mass for --strategy sample (default {DECODING_DEFAULTS['top_p']})")
    group.add_argument("--max-new-tokens", type=whole_number(1, MAX_NEW_TOKENS), default=None,
                       help="longest caption, in tokens (default: the run's --max-caption-tokens, EOS included, "
                            "as long as its training captions and its validation's: 40 unless it trained with another)")
    # None: left out (SEED_DEFAULT), told from a seed given where nothing samples (seed_from_args).
    group.add_argument("--seed", type=whole_number(*SEED_RANGE), default=None,
                       help=f"random seed (default {SEED_DEFAULT}; it matters for --strategy sample, where a caption "
                            "also depends on the other images in its batch)")


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading")
    group.add_argument("--lm-quantization", choices=LM_QUANTIZATIONS, default=None,
                       help="load the frozen LM in 8-bit or 4-bit NF4 through bitsandbytes, for small GPUs "
                            "(default: what the run trained with, from its run_config.json; else none)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow backbones whose checkpoints ship their own Python code to run it; off unless "
                            "given here (a checkpoint can never turn it on)")
    add_dtype_flag(group)
    group.add_argument("--clip-model", default=None, type=not_empty,
                       help="the CLIP backbone (Hub id or folder) in place of the one the checkpoint names, e.g. "
                            "after moving it; it must have the same sizes")
    group.add_argument("--lm-model", default=None, type=not_empty,
                       help="the LM and tokenizer in place of those the checkpoint names (same sizes and vocabulary)")


def loading_from_args(args, checkpoint: Path) -> dict:
    """load_captioner's options: quantisation from the flag, else the run's own; trust only from the flag."""
    lm_quantization = args.lm_quantization or run_lm_quantization(checkpoint)
    return {"lm_quantization": lm_quantization, "trust_remote_code": args.trust_remote_code,
            "clip_model": args.clip_model, "lm_model": args.lm_model}


def loaded_as_the_run_names_note(checkpoint: Path, clip_model: str | None = None, lm_model: str | None = None,
                                 data: str | None = None) -> str:
    """The line saying which backbones (and data) the run folder's config makes this script load, those the user
    did not name (`clip_model`, `lm_model`: the flags, None where left out): a run folder from someone else can
    name a Hub id, gigabytes downloaded without a word, or a folder elsewhere on this disk. The demo's own
    assets go unnamed: every demo command would print them, and they are built here, downloading nothing."""
    config = AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG)
    named = [f"{what} {name}" for what, given, name in (("CLIP", clip_model, config.clip_model),
                                                         ("LM", lm_model, config.lm_model))
             if given is None and not in_demo_cache(name)]
    parts = [f"{' and '.join(named)}, as {checkpoint / ADAPTER_CONFIG} names them"] if named else []
    if data and not in_demo_cache(data):
        parts.append(f"data {data}, as {find_run_dir(checkpoint) / 'run_config.json'} names it")
    return f"note: loading {'; '.join(parts)}" if parts else ""


def data_the_run_names(run: dict, data_dir: str | None, hub_data_files: str | None) -> str | None:
    """Where the run's own data is read from (its data folder, or the parquet files of --dataset flickr30k),
    unless --data-dir or --hub-data-files (`data_dir`, `hub_data_files`) named that very data: the split comes from
    it by default, and the baseline's training images always do."""
    if run.get("dataset") == "flickr30k":
        where = run.get("hub_data_files") or FLICKR30K_PARQUET
        return None if hub_data_files == where else where
    if data_dir is not None and same_data(run, run.get("dataset"), data_dir):
        return None
    return run.get("data_dir")


def run_lm_quantization(checkpoint: Path) -> str:
    """How the run trained its LM (run_config.json), "none" where it does not say: eval.py, inference.py
    and app.py load it so, as the captions the adapter learned to steer came from that LM. Without
    bitsandbytes here (a machine other than the one that trained it) the error says how to go on."""
    lm_quantization = (find_run_config(checkpoint).get("lm_quantization")  # else an adapter folder copied alone:
                       or json_value(checkpoint / ADAPTER_CONFIG, "training", "hyperparameters", "lm_quantization")
                       or "none")
    if lm_quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"{checkpoint} was trained over a {lm_quantization} LM, which needs bitsandbytes here "
                            "(pip install bitsandbytes); or load the LM unquantised with --lm-quantization none "
                            "(captions may differ a little)") from None
    return lm_quantization


def decoding_from_args(args, trained_caption_tokens: int = AdapterConfig.max_caption_tokens) -> DecodingConfig:
    """The decoding the flags ask for. A strategy's own flag implies it (`--num-beams 5` alone means beam
    search); one that another strategy would ignore is an error, not a silent greedy decode. Without
    --max-new-tokens, captions may be as long as the run's training captions (`trained_caption_tokens`, its
    AdapterConfig.max_caption_tokens), as its validation decoded them."""
    given = [name for name in DECODING_DEFAULTS if getattr(args, name) is not None]
    strategy = args.strategy
    if strategy is None:
        implied = {STRATEGY_OF[name] for name in given}
        if len(implied) > 1:
            raise UserError("--num-beams is for beam search, --temperature and --top-p for sampling: give one "
                            "kind, or --strategy")
        strategy = implied.pop() if implied else "greedy"
    stray = [name for name in given if STRATEGY_OF[name] != strategy]
    if stray:
        raise UserError(f"--{stray[0].replace('_', '-')} applies to --strategy {STRATEGY_OF[stray[0]]}, "
                        f"not {strategy}")
    values = {name: DECODING_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
              for name in DECODING_DEFAULTS}
    return DecodingConfig(strategy=strategy, max_new_tokens=args.max_new_tokens or trained_caption_tokens, **values)


def seed_from_args(args, decodings) -> int:
    """--seed, SEED_DEFAULT unless given. Only sampling draws random numbers: a seed given where each of
    `decodings` is greedy or beam search changes no caption, which a note says (it was taken without a word)."""
    if args.seed is None:
        return SEED_DEFAULT
    strategies = {decoding.strategy for decoding in decodings}
    if "sample" not in strategies:
        note(f"note: --seed {args.seed} changes nothing: only --strategy sample draws random numbers, not "
             f"{' or '.join(sorted(strategies))}", file=sys.stderr)
    return args.seed


def describe_decoding(decoding: DecodingConfig) -> str:
    if decoding.strategy == "beam":
        return f"beam {decoding.num_beams}"
    if decoding.strategy == "sample":
        return f"nucleus top-p {decoding.top_p:g} T {decoding.temperature:g}"
    return "greedy"


def available_devices() -> str:
    """What --device may name on this machine, for the error that says it named something else."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names += ["cuda"] + [f"cuda:{index}" for index in range(count)]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def pick_device(name: str) -> torch.device:
    """The --device flag's device, or a one-line UserError when this machine has no such device
    (torch's own errors for these are a traceback, or an assertion deep inside the first .to())."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device; use one of: {available_devices()}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device {name}: {reason}; use one of: {available_devices()}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use one of: {available_devices()}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS (Apple GPU) is not available here; "
                            f"use one of: {available_devices()}")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: these scripts run on cpu, cuda or mps; use one of: {available_devices()}")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and gpu_computes_in_bf16() else torch.float32


def chosen_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype on `device`: auto is default_dtype. bf16 on a GPU without it would be emulated at a crawl."""
    if name == "auto":
        return default_dtype(device)
    if name == "bf16" and device.type == "cuda" and not gpu_computes_in_bf16():
        raise UserError(f"--dtype bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16; use --dtype fp32 "
                        "(or auto)")
    return torch.bfloat16 if name == "bf16" else torch.float32


# ----------------------------------------------------------------------------------------------
# Captions and the baseline
# ----------------------------------------------------------------------------------------------

def clip_features(captioner, records, batch_size: int, num_workers: int, progress: bool, desc: str,
                  feature_cache: dict | None = None, on_bad_sample: str = "error",
                  bad_samples: list | None = None, processes: Processes | None = None) -> torch.Tensor:
    """CLIP features of records, through the on-disk feature cache (`feature_cache`: the run's
    {"cache_dir", "use_cache"}; default: the default cache). Several `processes` each encode a shard of
    their own at once, not taking turns at the cache as separate runs do."""
    return extract_features(captioner, records, batch_size, num_workers, progress, desc,
                            on_bad_sample=on_bad_sample, bad_samples=bad_samples,
                            take_turns=processes is None or processes.count == 1, **(feature_cache or {}))


def feature_cache_settings(run: dict) -> dict:
    """The feature cache a run trained with (run_config.json), so evaluation reads the same one."""
    use_cache = run.get("feature_cache", True)
    return {"cache_dir": run_feature_cache(run.get("feature_cache_dir"), use_cache), "use_cache": use_cache}


@torch.no_grad()
def caption_features(captioner, features: torch.Tensor, decoding: DecodingConfig, batch_size: int, seed: int = 0,
                     first_batch: int = 0, progress: bool = False, desc: str = "captioning") -> list[str]:
    """Captions for image features, in batches. Each batch is seeded by its index in the split, so
    sampling gives the same captions whichever process captions the batch."""
    from tqdm.auto import tqdm

    captions = []
    for number, start in enumerate(tqdm(range(0, len(features), batch_size), desc=desc, unit="batch",
                                        disable=not progress)):
        torch.manual_seed(seed + first_batch + number)
        captions += captioner.generate(features[start : start + batch_size], decoding)
    return captions


@dataclass
class Neighbours:
    """Each query's nearest training image: its index, and the cosine similarity of their CLIP features."""

    index: list[int]
    similarity: list[float]


def nearest_training_images(train_features: torch.Tensor, query_features: torch.Tensor,
                            chunk_size: int = 1024) -> Neighbours:
    """For each query feature, the training feature most cosine-similar (normalised here, so scale does not
    matter) and that similarity, in one pass: the baseline's caption and the copies' note (same_picture_note)
    both come from it. Deterministic: ties go to the earliest training image."""
    if len(train_features) == 0:
        raise ValueError("no training images to retrieve captions from")
    train = F.normalize(train_features.float(), dim=-1)
    index, similarity = [], []
    for start in range(0, len(query_features), chunk_size):  # never a Q x N matrix for the whole split at once
        query = F.normalize(query_features[start : start + chunk_size].float().to(train.device), dim=-1)
        scores = query @ train.T  # (chunk, N)
        nearest = scores.argmax(dim=1)  # the first index of the maximum
        index += nearest.tolist()
        similarity += scores.gather(1, nearest[:, None]).squeeze(1).tolist()
    return Neighbours(index, similarity)


def first_caption(captions) -> str:
    """A training image's caption, or the first of its list of captions."""
    return captions if isinstance(captions, str) else captions[0]


def nearest_neighbour_captions(train_features: torch.Tensor, train_captions, query_features: torch.Tensor,
                               chunk_size: int = 1024) -> list[str]:
    """For each query feature, a caption of the training image whose feature is most cosine-similar.

    train_features (N, F) and query_features (Q, F) are CLIP features; train_captions holds, per
    training image, its caption or list of captions, of which the first is returned. Ties go to the
    earliest training image (nearest_training_images).
    """
    if len(train_features) != len(train_captions):
        raise ValueError(f"{len(train_features)} training features but {len(train_captions)} caption entries")
    nearest = nearest_training_images(train_features, query_features, chunk_size).index
    return [first_caption(train_captions[index]) for index in nearest]


def check_readable(bad_samples: list[tuple[str, str]]) -> None:
    """Every image of the split must be read: each is scored against its references. (The images are
    read to the end first, so the message counts them all; the readable ones are cached meanwhile.)"""
    if bad_samples:
        _, first_reason = bad_samples[0]
        more = f" (and {len(bad_samples) - 1} more unreadable images)" if len(bad_samples) > 1 else ""
        them = "them" if more else "it"
        raise UserError(f"{first_reason}{more}: evaluation scores every image of the split, so fix {them} or "
                        f"remove {them} from the split, or leave {them} out of the scores with --on-bad-sample skip "
                        "(the scores then say so)")


def readable_split(captioner, records, batch_size: int, num_workers: int, progress: bool, feature_cache: dict | None,
                   bad_samples: list, processes: Processes) -> list:
    """The records whose images can be read (--on-bad-sample skip), the others added to `bad_samples`. Their
    features are cached on the way, so captioning reads them again from the cache, as train.py's final evaluation
    does (train.readable_records). Each process reads its shard and they pool what they found, as in
    evaluate_captioner: each read the whole split, and stored its features in the cache once per process."""
    shard = processes.shard(len(records), batch_size)
    mine = records[shard.start : shard.stop]
    found: list[tuple[str, str]] = []
    # A line one process stops on while reading (a feature cache damaged under it) stops them all here, not in the
    # gathers below: there it met the others' gather with its own, and was lost ("another process ended").
    with stopping_together(processes):
        features = clip_features(captioner, mine, batch_size, num_workers, progress,
                                 f"CLIP features (reading the split{processes.share_label(len(mine), len(records))})",
                                 feature_cache, on_bad_sample="skip", bad_samples=found, processes=processes)
    bad_samples += processes.gather(found)  # in rank order, which is the split's
    # Flags, not records, through the gather: a Hub record holds its table. (An unreadable image's row is NaN.)
    readable_flags = processes.gather((~torch.isnan(features).any(dim=1)).tolist())
    readable = [record for record, ok in zip(records, readable_flags, strict=True) if ok]
    if not readable:
        raise UserError(f"none of the {len(records)} images of the split could be read (first: {bad_samples[0][1]}): "
                        "check --data-dir")
    return readable


def skipped_images_note(bad_samples: list, scored: int, split: str, sampled: bool = False) -> str:
    """The note for metrics.json, the report and the printed table on held-out images --on-bad-sample skip left out
    of the scores (missing or unreadable files), or "": the figures are of fewer images than the split holds.
    `sampled`: a limit drew the scored images from more. The missing ones were then counted in the whole split, before
    the draw, and the unreadable ones in the sample: "1 of the 3 test images" was said of a split of 6 scored on 2."""
    if not bad_samples:
        return ""
    named = ", ".join(str(image) for image, _ in bad_samples[:3]) + (" ..." if len(bad_samples) > 3 else "")
    if sampled:
        counted = f"{len(bad_samples)} of the {split} images"
        covered = f"a limit's sample of {scored} of the others"
    else:
        counted = f"{len(bad_samples)} of the {len(bad_samples) + scored} {split} images"
        covered = f"the other {scored}"
    left = "was" if len(bad_samples) == 1 else "were"  # "1 of the 6 test images ... was left out"
    return (f"{counted} could not be read (missing or unreadable) and {left} left out (--on-bad-sample skip): "
            f"{named}; the scores cover {covered}, and compare only with scores of the same images")


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

@dataclass
class SplitResult:
    """One decoding's evaluation: what metrics.json and predictions.jsonl hold."""

    metrics: dict
    rows: list[dict]
    # (scored record, training record) pairs whose CLIP features are the same: copies (same_picture_note)
    copies: list[tuple] = dataclasses.field(default_factory=list)


def score_predictions(prediction_sets: dict[str, list[str]], references: list[list[str]], notes: list[str],
                      progress: bool = False):
    """{name: (metrics, per-image scores)}: the COCO metrics plus rouge-score ROUGE-L and NLTK BLEU-4."""
    coco = coco_metrics(prediction_sets, references, notes=notes, progress=progress)
    scored = {}
    for name, predictions in prediction_sets.items():
        extra = caption_metrics(predictions, references)
        per_image = {**coco[name].per_image, "rougeL": extra.pop("rougeL_per_image")}
        scored[name] = ({**coco[name].metrics, "rougeL": extra["rougeL"], "bleu4": extra["bleu4"]}, per_image)
    return scored


def images_digest(records) -> str:
    """Which images a split's scores cover, in a few characters: --compare tells apart two evaluations
    of the same size on different images (a --limit subset drawn with another seed, another folder's
    file names). Ids only: two folders holding the same names are not told apart."""
    return ids_digest(sorted(str(r.image_id) for r in records))


def references_digest(records) -> str:
    """Which references a split's scores are against: two data folders whose files share names
    ("images/0001.jpg", a Karpathy imgid) give one images_digest, but their captions differ, and
    --compare must not put their figures side by side in silence. A moved copy of the same data
    keeps its digest."""
    return ids_digest(sorted(str(r.image_id) + "\0" + "\0".join(r.captions) for r in records))


def adapter_identity(checkpoint: Path) -> dict:
    """Which adapter an evaluation scores: its training step and the digest of its weights. Training
    that goes on (--resume, more epochs) replaces the adapter beside an older metrics.json; --compare
    then says so rather than showing that file's figures as the folder's."""
    training = adapter_training(checkpoint, AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG).training)
    return {"step": training.get("step"), "checkpoint": training.get("checkpoint"),
            "blake2b": file_digest(checkpoint / ADAPTER_WEIGHTS)}


def what_was_scored(checkpoint: Path, dataset: str, split: str, records, options: dict | None = None) -> dict:
    """The metrics.json keys that say which adapter, data and images the figures are of, and with which other
    options (result_options: {"limit": ...} from train.py) the evaluation was made."""
    # Absolute: --compare, run from another folder, looks for the scored adapter there to tell stale figures.
    return {"split": split, "checkpoint": str(Path(checkpoint).absolute()), "dataset": dataset,
            **scored_images(records), "adapter": adapter_identity(checkpoint), "options": options or {}}


def scored_images(records) -> dict:
    """metrics.json's digests of the images scored and their references, which --compare checks agree."""
    return {"images_digest": images_digest(records), "references_digest": references_digest(records)}


# The flags besides --split and the decoding's (which metrics.json records on their own) that change what an
# evaluation writes, in the order the command to repeat it gives them. Not --trust-remote-code: only the user's own
# command line grants it, never a file (a metrics.json can be anyone's); nor where it runs (--device, workers).
RESULT_FLAGS = ("limit", "dataset", "data_dir", "hub_data_files", "lm_quantization", "dtype", "clip_model", "lm_model",
                "seed", "batch_size", "decoding_sweep", "gallery_size", "on_bad_sample")
SAMPLING_FLAGS = ("seed", "batch_size")  # a sampled caption depends on the seed and on the images in its batch


def result_options(args) -> dict:
    """metrics.json's "options": RESULT_FLAGS as given, local paths made absolute (as the command that repeats the
    evaluation may run elsewhere)."""
    options = {name: getattr(args, name) for name in RESULT_FLAGS}
    for name in ("data_dir", "clip_model", "lm_model"):
        if options[name] and Path(options[name]).expanduser().exists():  # else a Hub id, kept as it is
            options[name] = str(Path(options[name]).expanduser().resolve())
    return options


def stale_adapter_note(path: Path, metrics: dict) -> str:
    """A note if the folder whose adapter `metrics` scored now holds another adapter, else ""."""
    scored = metrics.get("adapter")
    if not isinstance(scored, dict):  # a metrics.json from before eval.py recorded the adapter
        return ""
    candidates = [path.parent if path.suffix == ".json" else path, Path(str(metrics.get("checkpoint", "")))]
    folder = next((c for c in candidates if (c / ADAPTER_WEIGHTS).is_file() and (c / ADAPTER_CONFIG).is_file()), None)
    if folder is None:  # written with --out, and the run is not where it was: nothing to check against
        return ""
    if file_digest(folder / ADAPTER_WEIGHTS) == scored.get("blake2b"):
        return ""
    now = adapter_step(folder)
    return (f"stale: {path} scored the adapter of step {scored.get('step')}, but {folder} now holds another "
            f"(step {now}): re-evaluate it ({reevaluation_command(path, metrics, folder)})")


def reevaluation_command(path: Path, metrics: dict, folder: Path) -> str:
    """The eval.py command that writes `path`'s figures again, of the adapter `folder` holds now: the same split,
    decoding and other options (--limit, data, ...) into the same folder. The bare command scored the greedy captions
    of the whole test split into the run folder: other figures, under the old ones' name."""
    command = ["python", "eval.py", str(folder)]
    if metrics.get("split") not in (None, "test"):
        command += ["--split", str(metrics["split"])]
    decoding = metrics.get("decoding") if isinstance(metrics.get("decoding"), dict) else {}
    options = metrics.get("options") if isinstance(metrics.get("options"), dict) else {}  # none before they were kept
    sampled = decoding.get("strategy") == "sample" or bool(options.get("decoding_sweep"))  # the sweep samples too
    command += decoding_flags(decoding) + option_flags(options, sampled)
    written_to = path.parent if path.suffix == ".json" else path
    split = metrics.get("split") if metrics.get("split") in SPLITS else "test"  # a file's other text: its own folder
    if written_to.resolve() != outputs_folder(folder, split, None).resolve():
        command += ["--out", str(written_to)]
    return shlex.join(command)


def decoding_flags(decoding: dict) -> list[str]:
    """The flags that ask for a decoding recorded as metrics.json's "decoding" (vars of a DecodingConfig).
    --max-new-tokens always: its default is the run's caption length, and was 30 before, so left out it could
    decode longer captions than the figures'."""
    flags = []
    if decoding.get("strategy") == "beam":
        flags += ["--strategy", "beam", "--num-beams", str(decoding.get("num_beams"))]
    elif decoding.get("strategy") == "sample":
        flags += ["--strategy", "sample", "--temperature", str(decoding.get("temperature")),
                  "--top-p", str(decoding.get("top_p"))]
    if decoding.get("max_new_tokens") is not None:
        flags += ["--max-new-tokens", str(decoding["max_new_tokens"])]
    return flags


def option_flags(options: dict, sampled: bool) -> list[str]:
    """The flags that give result_options' values again, those left at their defaults left out. --batch-size and
    --seed only where captions were sampled (elsewhere they change nothing), and --batch-size then always: its
    default depends on the machine (64 on a CPU, 128 on a GPU)."""
    defaults = build_parser()
    flags = []
    for name in RESULT_FLAGS:
        value = options.get(name)
        if name in SAMPLING_FLAGS and not sampled:
            continue
        default = SEED_DEFAULT if name == "seed" else defaults.get_default(name)  # --seed's None: left out
        if value is None or value is False or (value == default and name != "batch_size"):
            continue
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def adapter_step(folder: Path):
    try:
        return adapter_training(folder, AdapterConfig.from_json(folder / ADAPTER_CONFIG).training).get("step", "?")
    except UserError:
        return "?"


def metric_keys() -> list[str]:
    return [key for key, _ in COCO_METRICS] + [key for key, *_ in EXTRA_METRICS]


def beats_baseline(metrics: dict, baseline: dict) -> bool | None:
    """Whether the adapter scores above the baseline; None where the metric cannot tell: CIDEr-D is 0
    for everything when its document frequencies cannot weigh n-grams (one image, or identical references)."""
    if metrics[DECIDING_METRIC] == baseline[DECIDING_METRIC] == 0:
        return None
    return metrics[DECIDING_METRIC] > baseline[DECIDING_METRIC]


@torch.no_grad()
def evaluate_captioner(captioner, records, decodings: dict[str, DecodingConfig], train_records, batch_size: int = 64,
                       num_workers: int = 0, progress: bool = True, seed: int = 0, processes: Processes | None = None,
                       train_features: torch.Tensor | None = None,
                       feature_cache: dict | None = None) -> dict[str, SplitResult] | None:
    """Caption every record with each decoding, find each record's nearest training caption, and
    score all of them on the whole split against every reference.

    With several processes each captions its shard and the main process gathers and scores:
    it alone gets the results, the others None. `train_features` (of train_records) skips their
    extraction when the caller has them (train.py).
    """
    processes = processes or Processes()
    captioner.eval()
    shard = processes.shard(len(records), batch_size)
    mine = records[shard.start : shard.stop]
    whose = processes.share_label(len(mine), len(records))
    bad_samples: list[tuple[str, str]] = []
    features = clip_features(captioner, mine, batch_size, num_workers, progress, f"CLIP features{whose}",
                             feature_cache, on_bad_sample="skip", bad_samples=bad_samples, processes=processes)
    unreadable = processes.gather(bad_samples)
    if unreadable and not processes.is_main:  # the main process names them, once: not one error line per process
        return None
    check_readable(unreadable)
    if processes.is_main:
        # Its JVM loads for seconds (~8 s of CPU): let it do so while we caption, not for a split that
        # turned out unreadable or a process group that ended before its first gather.
        start_meteor()
    predictions = {}
    for name, decoding in decodings.items():
        local = caption_features(captioner, features, decoding, batch_size, seed, shard.start // batch_size,
                                 progress, f"captioning ({name}){whose}")
        predictions[name] = processes.gather(local)
    captioned = processes.gather([record.image_id for record in mine])
    if captioned != [record.image_id for record in records]:  # each image exactly once, in split order
        raise RuntimeError(f"the processes captioned {len(captioned)} images for a split of {len(records)}")
    images_per_process = processes.gather([len(mine)])
    query_features = torch.cat(processes.gather([features]))
    if train_features is None:
        train_shard = processes.shard(len(train_records), batch_size)
        # Its share named, as the split's: "448 images" read as the baseline's whole pool of 900.
        train_whose = processes.share_label(len(train_shard), len(train_records))
        train_features = torch.cat(processes.gather([clip_features(
            captioner, train_records[train_shard.start : train_shard.stop], batch_size, num_workers, progress,
            f"CLIP features (training images, for the baseline{train_whose})", feature_cache, on_bad_sample="skip",
            processes=processes)]))
    if not processes.is_main:
        return None
    readable, train_features = drop_unreadable(train_records, train_features)  # no unreadable candidates
    if len(readable) < len(train_records):  # as training skipped them; the missing ones have a note of their own
        first = next(record.image_id for record, kept in zip_longest(train_records, readable) if record is not kept)
        count = len(train_records) - len(readable)
        print(f"note: the baseline leaves out {count:,} training image{'s' if count != 1 else ''} it could not "
              f"read, as training did (first: {first})", file=sys.stderr)
    train_records = readable

    neighbours = nearest_training_images(train_features, query_features)
    baseline = [first_caption(train_records[index].captions) for index in neighbours.index]
    copies = [(record, train_records[index])
              for record, index, similarity in zip(records, neighbours.index, neighbours.similarity)
              if similarity >= SAME_FEATURE_COSINE]
    references = [record.captions for record in records]
    notes: list[str] = []
    scored = score_predictions({**predictions, BASELINE: baseline}, references, notes, progress)
    baseline_metrics, baseline_per_image = scored.pop(BASELINE)
    results = {}
    for name, (scores, per_image) in scored.items():
        metrics = {
            "num_images": len(records),
            **{key: scores[key] for key, _ in COCO_METRICS},
            "coco_tokenization": scores["coco_tokenization"],
            "coco_tokenization_detail": TOKENIZATION_DETAILS[scores["coco_tokenization"]],
            "coco_variant": COCO_VARIANT,
            "coco_scale": SCALE_NOTE,
            "rougeL": scores["rougeL"], "rougeL_variant": ROUGE_L_VARIANT,
            "bleu4": scores["bleu4"], "bleu4_variant": BLEU_VARIANT,
            "decoding_name": name,
            "decoding": vars(decodings[name]),
            "lm_quantization": lm_quantization_of(captioner.lm),
            "lm_dtype": str(captioner.lm.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "baseline": {"method": BASELINE_METHOD, "train_images": len(train_records),
                         **{key: baseline_metrics[key] for key in metric_keys()},
                         "diversity": caption_diversity(baseline)},
            "beats_baseline": beats_baseline(scores, baseline_metrics),
            "baseline_decided_by": DECIDING_METRIC,
            "diversity": caption_diversity(predictions[name]),
            "processes": {"num_processes": processes.count, "images_per_process": images_per_process},
            "notes": list(notes),  # a list of its own: main adds the printed notes to one decoding's
        }
        rows = [{"image_id": record.image_id, "prediction": predictions[name][i], "references": record.captions,
                 "baseline": baseline[i], **{key: values[i] for key, values in per_image.items()},
                 "baseline_coco_cider_d": baseline_per_image["coco_cider_d"][i]}
                for i, record in enumerate(records)]
        results[name] = SplitResult(metrics, rows, copies)
    return results


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def outputs_folder(checkpoint: Path, split: str, out: str | None) -> Path:
    """Where an evaluation writes: --out, else the checkpoint folder for the test split (the run's figures, which
    train.py's final evaluation writes and --compare RUN reads), else its eval-<split>/: `--split val` replaced the
    run's test figures there without a word."""
    if out:
        return Path(out)
    return checkpoint if split == "test" else checkpoint / f"{SPLIT_FOLDER_PREFIX}{split}"


def split_of_outputs_folder(path: Path) -> str | None:
    """The split whose evaluation `path` holds if it is a run's eval-<split>/ (outputs_folder), else None."""
    split = path.name.removeprefix(SPLIT_FOLDER_PREFIX)
    return split if split != path.name and split in SPLITS and (path.parent / ADAPTER_CONFIG).is_file() else None


def evaluation_command(path: Path) -> str:
    """The command that writes `path`'s metrics.json: a run's eval-val/ is `eval.py RUN --split val`'s, not
    `eval.py RUN/eval-val`'s (no run folder)."""
    split = split_of_outputs_folder(path)
    return f"python eval.py {path.parent} --split {split}" if split else f"python eval.py {path}"


def find_run_dir(checkpoint: Path) -> Path:
    """The run folder: the checkpoint itself, or its parent for last/."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / "run_config.json").is_file():
            return folder
    return checkpoint


def find_run_config(checkpoint: Path) -> dict:
    """The run's saved settings (train.py's run_config.json); {} for an adapter folder copied alone. Each field
    train.py knows is checked to be of its flag's kind, as --resume checks it: an edited "seed": "ten" or
    "train_limit": [5] failed deep in the data split in a traceback. Fields it does not know are left alone."""
    path = find_run_dir(checkpoint) / "run_config.json"
    if not path.is_file():
        return {}
    run = read_json(path, "run config")
    if not isinstance(run, dict):
        raise UserError(f"{path} holds {json_kind(run)}, not a run config object; restore the run's own "
                        "run_config.json")
    from train import TrainConfig, check_saved_types  # train.py imports this module too

    known = {field.name for field in dataclasses.fields(TrainConfig)}
    check_saved_types(path, {name: value for name, value in run.items() if name in known})
    return run


def data_dir_dataset(data_dir: str | None, run_dataset: str | None) -> str | None:
    """The --dataset for a --data-dir given without one: the run's, where it reads that folder (its loader says
    what is wrong with a folder that holds no caption file); else the one the folder's files ask for
    (dataset_from_data_dir), as for a caption folder given to a run trained on Flickr30k or a Karpathy folder."""
    if data_dir is None:
        return run_dataset
    found = dataset_of_folder(data_dir) if Path(data_dir).expanduser().is_dir() else None
    if run_dataset in ("karpathy", "folder") and (found is None or found[0] == run_dataset):
        return run_dataset
    return dataset_from_data_dir(data_dir)


def same_data(run: dict, dataset: str, data_dir: str | None) -> bool:
    """Whether `dataset` and `data_dir` are the data the run trained on (a folder however it is spelled)."""
    if dataset != run.get("dataset"):
        return False
    if data_dir is None or run.get("data_dir") is None:
        return data_dir == run.get("data_dir")
    return Path(data_dir).expanduser().resolve() == Path(run["data_dir"]).expanduser().resolve()


def folder_split_of(run: dict) -> str:
    """How the run's caption folder dealt its images without a split (train.py --folder-split): a run config
    saved before the flag existed is of the shuffle deal; an adapter without a run config deals as new runs do."""
    return run.get("folder_split", FOLDER_SPLIT_OF_OLDER_RUNS) if run else "hash"


def write_eval_outputs(out_dir: Path, result: SplitResult, records, run_dir: Path | None = None,
                       sweep: dict | None = None, gallery_size: int = GALLERY_SIZE) -> list[Path]:
    """metrics.json, predictions.jsonl, report.html and the curve PNGs (and decoding_sweep.json).

    All are written aside first (OUTPUTS_STAGE), then renamed into place: a full disk stops the write before
    anything of an earlier evaluation is touched. metrics.json, which --compare reads as "evaluated", goes first
    and comes back last, so a crash or Ctrl-C during the renames leaves no metrics beside other predictions.
    """
    try:
        return write_outputs_in(out_dir, result, records, run_dir, sweep, gallery_size)
    except OSError as error:  # a full disk, a read-only remount: one line, not json's or matplotlib's traceback
        # metrics.json still there: the write stopped before the renames, so the earlier evaluation is whole.
        left = (f"{out_dir} keeps the earlier evaluation's outputs as they were" if (out_dir / METRICS_FILE).exists()
                else f"the evaluation's outputs in {out_dir} are incomplete")
        raise UserError(f"cannot write {error.filename or out_dir} ({error.strerror or error}): {left}; free some "
                        "space (or give another --out) and evaluate again") from None


def say_written(paths: list[Path]) -> None:
    """The line that ends an evaluation, eval.py's or train.py's final one: where its outputs went."""
    print(for_terminal("wrote " + ", ".join(str(path) for path in paths)))


def write_outputs_in(out_dir: Path, result: SplitResult, records, run_dir: Path | None, sweep: dict | None,
                     gallery_size: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with outputs_lock(out_dir):
        stage = not_a_link(out_dir / OUTPUTS_STAGE)
        shutil.rmtree(stage, ignore_errors=True)  # what a killed evaluation left
        for name in EVAL_OUTPUTS:  # and what one of an earlier version left (it wrote NAME.tmp in place), or links
            with contextlib.suppress(OSError):  # a folder of that name is not ours to delete
                not_a_link(out_dir / f"{name}.tmp").unlink(missing_ok=True)
        stage.mkdir()
        # Deleted where the write fails: it held on to the space the error asks to free.
        with removed_unless_renamed(stage):
            write_jsonl(stage / PREDICTIONS_FILE, result.rows)
            written = [PREDICTIONS_FILE]
            if sweep is not None:
                write_json(stage / SWEEP_FILE, sweep)
                written.append(SWEEP_FILE)
            train_log = run_dir / TRAIN_LOG if run_dir is not None else None
            written += [path.name for path in
                        write_report(stage, result.metrics, result.rows, records, train_log, sweep, gallery_size)]
            write_json(stage / METRICS_FILE, result.metrics)
            put_outputs_in_place(stage, out_dir)
            stage.rmdir()
    return [out_dir / METRICS_FILE, *(out_dir / name for name in written)]


def put_outputs_in_place(stage: Path, out_dir: Path) -> None:
    """Move the staged outputs into `out_dir`, metrics.json taken away first and put back last. What an earlier
    evaluation wrote and this one did not (its decoding sweep, its curves) is deleted: it must not stay beside
    this one's predictions."""
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    for name in EVAL_OUTPUTS:
        if name == METRICS_FILE:
            continue
        if (stage / name).exists():
            replace_durably(stage / name, out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)
    replace_durably(stage / METRICS_FILE, out_dir / METRICS_FILE)


def outputs_lock(out_dir: Path):
    """One evaluation at a time writes into a folder: two at once (say val and test of one run)
    would otherwise leave one's metrics beside the other's predictions. The second waits, then
    replaces the first's files whole."""
    return waiting_lock(out_dir / OUTPUTS_LOCK, f"waiting for another evaluation to finish writing into {out_dir} ...")


def print_metrics(metrics: dict, title: str, notes: tuple[str, ...] = ()) -> None:
    """The table, the verdict against the baseline and `notes` that qualify the figures (images the run
    trained on or chose its adapter by, a run still training: before, only metrics.json said so, if anything)."""
    rows = [(name, percent(metrics[key]), percent(metrics["baseline"][key]), "COCO, " + metrics["coco_tokenization"])
            for key, name in COCO_METRICS]
    rows += [(name, percent(metrics[key]), percent(metrics["baseline"][key]), metrics[f"{key}_variant"])
             for key, name, _ in EXTRA_METRICS]
    print(f"\n{for_terminal(title)}\n" + format_table(rows, ("metric (x100)", "adapter", "NN baseline", "variant")))
    print(baseline_verdict(metrics))
    if warning := collapse_line(metrics):
        print(warning)
    for said in notes:
        print(f"note: {for_terminal(said)}")
    print()


def sweep_table(results: dict[str, SplitResult]) -> dict:
    """decoding_sweep.json: one row per decoding and one for the baseline, all on the same split."""
    first = next(iter(results.values())).metrics
    rows = [{"decoding": name, "settings": result.metrics["decoding"],
             **{key: result.metrics[key] for key in metric_keys()}, "beats_baseline": result.metrics["beats_baseline"]}
            for name, result in results.items()]
    rows.append({"decoding": BASELINE, "settings": {"method": BASELINE_METHOD},
                 **{key: first["baseline"][key] for key in metric_keys()}, "beats_baseline": None})
    return {"num_images": first["num_images"], "coco_tokenization": first["coco_tokenization"],
            "scale": SCALE_NOTE, "baseline_decided_by": DECIDING_METRIC, "rows": rows}


# ----------------------------------------------------------------------------------------------
# --compare
# ----------------------------------------------------------------------------------------------

def comparison(run_paths: list[str]) -> dict:
    """One table of runs side by side, from the metrics.json each evaluation wrote."""
    for twice in sorted({path for path in run_paths if run_paths.count(path) > 1}):
        print(f"note: {for_terminal(twice)} is given {run_paths.count(twice)} times")
    runs, stale = [], []
    for path in map(checkpoint_folder, run_paths):
        metrics_path = path if path.suffix == ".json" else path / METRICS_FILE
        if not path.exists() and not split_of_outputs_folder(path):
            raise UserError(f"--compare: {path} does not exist")
        if not metrics_path.is_file():
            raise UserError(f"{path} has no {METRICS_FILE}: evaluate it first ({evaluation_command(path)})"
                            + other_splits_hint(path))
        metrics = read_json(metrics_path, "metrics")
        if not isinstance(metrics, dict) or not {"coco_cider_d", "baseline", "beats_baseline"} <= set(metrics):
            raise UserError(f"{metrics_path} is not a metrics.json of this version of eval.py: re-evaluate it "
                            f"({evaluation_command(path)})")
        if problem := metrics_problem(metrics):
            raise UserError(f"{metrics_path} is not a metrics.json eval.py wrote ({problem}): re-evaluate it "
                            f"({evaluation_command(path)})")
        runs.append((str(path), metrics))
        if note := stale_adapter_note(path, metrics):
            stale.append(note)
    columns = [column_name(Path(p)) for p, _ in runs]
    names = [name if columns.count(name) == 1 else p for name, (p, _) in zip(columns, runs)]
    table = [[name, *(percent(m.get(key)) for _, m in runs)] for key, name in COCO_METRICS]
    table += [[name, *(percent(m.get(key)) for _, m in runs)] for key, name, _ in EXTRA_METRICS]
    table.append(["NN baseline CIDEr-D", *(percent(m["baseline"][DECIDING_METRIC]) for _, m in runs)])
    table.append(["beats baseline", *({True: "yes", False: "NO"}.get(m["beats_baseline"], "n/a") for _, m in runs)])
    for key, label in (("dataset", "dataset"), ("split", "split"), ("num_images", "images"),
                       ("decoding_name", "decoding"), ("coco_tokenization", "tokenization"),
                       ("lm_quantization", "LM quantization"), ("lm_dtype", "LM weights")):
        table.append([label, *(str(m.get(key, "?")) for _, m in runs)])
    table.append(["adapter step", *(str((m.get("adapter") or {}).get("step", "?")) for _, m in runs)])
    notes = stale
    for key in ("dataset", "split", "num_images", "coco_tokenization"):
        values = {str(m.get(key)) for _, m in runs}
        if len(values) > 1:
            notes.append(f"not comparable: the runs differ in {key} ({', '.join(sorted(values))})")
    if len(quantizations := recorded_values(runs, "lm_quantization")) > 1:
        notes.append(f"not comparable: the runs' LMs were loaded with different --lm-quantization "
                     f"({', '.join(sorted(quantizations))})")
    if len(recorded_values(runs, "images_digest")) > 1:
        notes.append("not comparable: the runs were scored on different images (another --limit subset, seed or "
                     "data folder)")
    elif len(recorded_values(runs, "references_digest")) > 1:
        notes.append("not comparable: the runs were scored on images of the same names with different captions "
                     "(another data folder or caption file)")
    if note := unrecorded_data_note(runs):
        notes.append(note)
    return {"header": ["metric (x100)", *names], "rows": table, "runs": [p for p, _ in runs], "notes": notes,
            "metrics": {p: {key: m.get(key) for key in metric_keys()} | {"baseline_" + DECIDING_METRIC:
                        m["baseline"][DECIDING_METRIC]} for p, m in runs}}


def column_name(path: Path) -> str:
    """A run's column in --compare's table: its folder's name, with its run's for a run's eval-val/ (a column
    "eval-val" did not say whose)."""
    return f"{path.parent.name}/{path.name}" if split_of_outputs_folder(path) else path.name


def other_splits_hint(run: Path) -> str:
    """"" or where `run`'s evaluations of other splits are, for --compare RUN on a run evaluated on them only."""
    folders = [str(folder) for split in SPLITS if (folder := outputs_folder(run, split, None)) != run
               and (folder / METRICS_FILE).is_file()]
    return f"; its other splits' are in {' and '.join(folders)}, which --compare takes too" if folders else ""


# The strings of a metrics.json that --compare prints or sets side by side.
METRICS_TEXTS = ("checkpoint", "dataset", "split", "decoding_name", "coco_tokenization", "lm_quantization", "lm_dtype",
                 "images_digest", "references_digest")


def metrics_problem(metrics: dict) -> str:
    """What in a metrics.json --compare cannot read, or "": a score that is not a number, a text that is not a
    string (an edited file, or one from elsewhere, was a traceback from deep inside the table)."""
    if not isinstance(metrics["baseline"], dict):
        return f"baseline is {json_kind(metrics['baseline'])}, not an object"
    scores = [(key, metrics.get(key)) for key in metric_keys()]
    for key, value in [*scores, ("baseline " + DECIDING_METRIC, metrics["baseline"].get(DECIDING_METRIC))]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} is {json_kind(value)}, not a number"
    if not isinstance(metrics["beats_baseline"], (bool, type(None))):
        return f"beats_baseline is {json_kind(metrics['beats_baseline'])}, not true, false or null"
    for key in METRICS_TEXTS:
        if not isinstance(metrics.get(key, ""), str):
            return f"{key} is {json_kind(metrics[key])}, not a string"
    if not isinstance(metrics.get("adapter", {}), (dict, type(None))):
        return f"adapter is {json_kind(metrics['adapter'])}, not an object"
    return ""


def recorded_values(runs, key: str) -> set:
    """The values of a metrics.json key among the runs whose file records it (older files lack newer keys:
    they neither match nor differ)."""
    return {m[key] for _, m in runs if m.get(key)}


def unrecorded_data_note(runs) -> str:
    """A note naming the runs whose metrics.json predates references_digest (and maybe images_digest), or "".
    recorded_values() leaves such a file out of the checks, so an older run scored on another data folder
    whose files share names (demo-v1 and demo-v2 both hold test_0000.png) was set beside a newer one with
    no note at all."""
    if len(runs) < 2:
        return ""
    older = [path for path, metrics in runs if not metrics.get("references_digest")]
    if not older:
        return ""
    return (f"cannot tell whether {', '.join(older)} {'was' if len(older) == 1 else 'were'} scored on the same images "
            "and captions as the others: an older eval.py wrote that metrics.json without recording them; "
            f"re-evaluate {'it' if len(older) == 1 else 'them'} (python eval.py {older[0]})")


def markdown_table(header, rows) -> str:
    def line(cells) -> str:  # a "|" in a cell (a run folder's name) would split it: markdown's escape keeps it
        return "| " + " | ".join(markdown_text(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)]) + "\n"


def markdown_text(value) -> str:
    """`value` as text in comparison.md: Markdown passes HTML through, so a run folder's name or a metrics.json string
    such as <img src=x onerror=...> ran in the viewers that render it; a newline would end the table's row."""
    return html.escape(for_terminal(value), quote=False)


def compare_main(args) -> int:
    table = comparison(args.compare)
    print(format_table(table["rows"], table["header"]))
    for said in table["notes"]:
        print(f"note: {for_terminal(said)}")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        notes = "".join(f"\n{markdown_text(note)}\n" for note in table["notes"])
        write_text(out_dir / COMPARISON_FILES[0], markdown_table(table["header"], table["rows"]) + notes)  # atomic
        write_json(out_dir / COMPARISON_FILES[1], table)
        print(for_terminal(f"wrote {out_dir / COMPARISON_FILES[0]} and {out_dir / COMPARISON_FILES[1]}"))
    return 0


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------

def saved_trainer_state(run_dir: Path) -> dict:
    """The run's trainer_state.json as last saved; {} before its first save."""
    from train import TRAINER_STATE, resume_state_dir  # here: train.py imports this module

    state_dir = resume_state_dir(run_dir)
    return read_json(state_dir / TRAINER_STATE, "trainer state", MAX_RECORDS_JSON_BYTES) if state_dir else {}


def trained_image_ids(state: dict, run: dict) -> set[str] | None:
    """The ids of the images a run on a caption folder trained on, as train.py keeps them in its state
    (saved_trainer_state; TrainerState.train_images); None for other data and for runs saved before they were kept."""
    if run.get("dataset") != "folder":
        return None
    return set(state.get("train_images") or ()) or None


def baseline_training_records(run: dict, dataset: str, data_dir, hub_files: str, trained_ids: set[str] | None = None):
    """The images the run trained on (its data, --train-limit and seed): the baseline retrieves their captions.
    Given `trained_ids` (trained_image_ids), exactly those images of its folder as it is now.

    Training files that are missing are left out, as train.py's default --on-bad-sample skip left them out
    (before its --train-limit draw, as here): stopping on them refused to evaluate such a run at all. A
    split whose files are all missing (a moved data folder) still stops, in load_records."""
    bad_samples: list[tuple[str, str]] = []
    if run.get("dataset"):
        seed = run.get("seed", 0)
        records = load_records(run["dataset"], "train", run.get("data_dir"),
                               run.get("hub_data_files") or FLICKR30K_PARQUET, seed, "skip", bad_samples,
                               folder_split_of(run))
        drawn = limit_records(records, run.get("train_limit", 0), seed)
        records = only_trained(records, drawn, trained_ids) if trained_ids else drawn
    else:
        records = load_records(dataset, "train", data_dir, hub_files, on_bad_sample="skip", bad_samples=bad_samples,
                               folder_split=folder_split_of(run))
    if bad_samples:
        count = f"{len(bad_samples):,} training image{'s' if len(bad_samples) != 1 else ''}"
        note(f"note: the baseline leaves out {count} with a missing file, as training did (first: "
             f"{bad_samples[0][1]})", file=sys.stderr)
    if not records:
        raise UserError("the run's training split has no images with captions: the baseline needs them")
    return records


def only_trained(records, drawn, trained_ids: set[str]):
    """The records among `trained_ids`. A caption folder grown since training holds training images the run
    never saw (and a grown folder draws another --train-limit sample): a baseline retrieving from them knew
    more than the run. `drawn`: what the baseline took before the ids were kept, for the note."""
    kept = [record for record in records if record.image_id in trained_ids]
    untrained = [record for record in drawn if record.image_id not in trained_ids]
    # A drawn image that cannot be read is one train.py skipped (listed in bad_samples.jsonl), not a change to
    # the folder. any() stops at the first readable one: a grown folder opens few images here.
    if ({record.image_id for record in kept} - {record.image_id for record in drawn}
            or any(is_readable(record) for record in untrained)):
        note(f"note: the baseline retrieves from the {len(kept):,} images the run trained on, of the "
             f"{len(records):,} in the train split now (images added, or splits changed, since)", file=sys.stderr)
    return kept


def is_readable(record) -> bool:
    try:
        record.open()
    except UserError:
        return False
    return True


def check_no_trained_image_held_out(records, trained_ids: set[str] | None, split: str, data_dir,
                                    run_dir: Path) -> None:
    """Refuse to score an image the run trained on as unseen. A caption folder whose rows name every image's
    split records no deal to compare, so a split edited in its caption file since training (train to test)
    went unnoticed; the deal's own checks miss such an edit too. --split train scores training images
    knowingly (trained_on_note)."""
    if split == "train" or not trained_ids:
        return
    trained = [record.image_id for record in records if record.image_id in trained_ids]
    if trained:
        raise UserError(f"{data_dir}: {len(trained):,} of the {len(records):,} {split} images are ones {run_dir} "
                        f"trained on (first: {trained[0]}): its caption file changed since (a split edited?), and "
                        "scored as unseen they would flatter the run; evaluate with the caption file as it was, "
                        "or train again")


def check_split_deal_unchanged(state: dict, run_dir: Path, run: dict) -> str:
    """A caption folder's images without a split are dealt one (dataset.deal_splits). Under the shuffle deal
    an image added to or removed from its caption file since training re-deals every split: the test split
    would then hold images the run trained on, scored as unseen. Under the hash deal see check_hash_deal, whose
    note on how the folder changed this returns ("" where it did not). `state`: saved_trainer_state."""
    saved = state.get("split_deal", "")
    if not saved:
        return ""  # splits named by the data, or a run saved before the deal was kept: nothing to compare
    if split_deal(run["data_dir"], run.get("seed", 0)) == saved:
        return ""
    if folder_split_of(run) == "hash":
        return check_hash_deal(run_dir, run, state.get("hash_deal", {}))
    raise UserError(f"{run['data_dir']}: its caption file lists other images than when {run_dir} trained "
                    "(added, removed or renamed since), and its images without a split are dealt one by a "
                    "shuffle of all of them, so every split has changed and may hold images the run trained "
                    "on; evaluate with the caption file as it was, or give every image a split and train again "
                    "(a new run deals them by a hash of each name, which adding images does not change)")


def check_hash_deal(run_dir: Path, run: dict, saved: dict) -> str:
    """The hash deal moves no image when others are added or removed, so the run's val and test images are
    still held out and no image it trained on has joined them; only a stand-in (where no image falls in val or
    test by its hash) can be one it trained on, once images were removed. That is refused; else the note to
    print on how the caption file changed (after check_no_trained_image_held_out, which a split edited since can
    fail). A state without the deal's record (edited) is taken to have trained on all."""
    data_dir, seed = run["data_dir"], run.get("seed", 0)
    unassigned = dealt_names(data_dir, seed)  # read once: the caption file of a large folder takes a while to parse
    suspect = held_out_past(unassigned, seed, saved.get("trained_from", 0.0))
    if suspect:
        name, split = next(iter(suspect.items()))
        raise UserError(f"{data_dir}: its caption file lists other images than when {run_dir} trained, and as no "
                        f"image's hash now falls in {split}, {name} stands in for it, an image the run may "
                        "have trained on (images were removed since?); evaluate with the caption file as it was, or "
                        "give every image a split")
    then, now = saved.get("images", 0), len(unassigned)
    return (f"note: {data_dir} lists {now:,} images without a split, {then:,} when {run_dir} trained; each is dealt "
            "by a hash of its name, so none the run trained on is in val or test")


def image_identity(record) -> tuple:
    """One image however it is reached: its file (a hard link too, dataset.file_identity), else (a Hub row) its id."""
    return file_identity(record.path) if record.path is not None else ("id", str(record.image_id))


def trained_on_note(records, train_records) -> str:
    """A note when evaluated images are among those the baseline retrieves from: there it finds each
    one's own captions, an upper bound rather than a baseline. (It was said of any --split train,
    a folder of one's own too, whose "train" images the run never saw, and of no other split.)"""
    trained = {image_identity(record) for record in train_records}
    shared = sum(image_identity(record) in trained for record in records)
    if not shared:
        return ""
    return (f"{shared:,} of the {len(records):,} images {'is' if shared == 1 else 'are'} among the run's training "
            "images: there the baseline retrieves each image's own captions, so it is an upper bound, not a baseline")


def same_picture_note(copies: list[tuple], scored: int) -> str:
    """A note when scored images have a training image's very CLIP feature (SAME_FEATURE_COSINE): byte copies
    under other names, which dataset.py does not find (it would hash every file at every load); else "". The
    same file under two names is trained_on_note's. The pairs come from the baseline's own search."""
    copies = [(record, trained) for record, trained in copies if image_identity(record) != image_identity(trained)]
    if not copies:
        return ""
    shown = ", ".join(f"{record.image_id} = {trained.image_id}" for record, trained in copies[:3])
    more = ", ..." if len(copies) > 3 else ""
    return (f"{len(copies):,} of the {scored:,} images {'has' if len(copies) == 1 else 'have'} the very CLIP feature "
            f"of a training image: copies of it, or pictures CLIP cannot tell from it ({shown}{more}); the figures on "
            "them are optimistic, the run trained on those pictures and the baseline retrieves their training captions")


def selected_on_note(records, run: dict, checkpoint: Path, run_dir: Path) -> str:
    """A note when evaluated images are among those the run's validation chose this adapter by (its best
    one, by --select-by), else "": its figures there are optimistic, which `--split val` did not say."""
    if not run.get("dataset") or checkpoint.resolve() != run_dir.resolve():  # last/ was not chosen by validation
        return ""
    seed = run.get("seed", 0)
    with contextlib.redirect_stdout(io.StringIO()):  # the split's own notes were printed as it loaded for scoring
        validation = load_records(run["dataset"], "val", run.get("data_dir"),
                                  run.get("hub_data_files") or FLICKR30K_PARQUET, seed, "skip", [],
                                  folder_split_of(run))
    chosen_by = {image_identity(record) for record in limit_records(validation, run.get("val_limit", 0), seed)}
    shared = sum(image_identity(record) in chosen_by for record in records)
    if not shared:
        return ""
    select_by = run.get("select_by", "rougeL")
    images = "is a validation image" if shared == 1 else "are validation images"
    return (f"{shared:,} of the {len(records):,} images {images} by whose {select_by} the run chose this adapter, so "
            "its figures on them are optimistic; the test split is held out")


def check_outputs_outlive_the_next_save(checkpoint: Path, run_dir: Path, out: str | None) -> None:
    """Refuse to write the outputs into a run's last/ while train.py trains there: its next save swaps a new
    last/ in while the evaluation runs, and outputs written after it would lie beside an adapter they do not
    describe (a finished run's last/ is safe: a later save keeps it, outputs and all, as last-step-N/)."""
    from train import run_being_trained  # here: train.py imports this module

    if out or run_dir == checkpoint or checkpoint.name not in ("last", "last.old") or not run_being_trained(run_dir):
        return
    raise UserError(f"{run_dir} is still being trained, and its next save replaces {checkpoint} while this evaluation "
                    "runs: give --out FOLDER for the outputs, or evaluate when training has finished")


def still_training_note(run_dir: Path, step) -> str:
    """A note when train.py still trains in the run folder, else "": the figures are then of an adapter that
    training goes on replacing (and its final evaluation rewrites metrics.json), which nothing said."""
    from train import run_being_trained  # here: train.py imports this module

    if not run_being_trained(run_dir):
        return ""
    return (f"{run_dir} is still being trained: these figures are of its adapter of step {step}, which training "
            "goes on replacing; evaluate again when it has finished")


def empty_split_message(dataset: str, split: str, data_dir, hub_files: str, seed: int, folder_split: str) -> str:
    """The error for a split with no images, naming the splits that have some: a caption folder of
    one's own often holds only some splits (all "val", say), and "no images" alone left the user to
    guess that --split was the flag to change."""

    counts = {}
    for other in SPLITS:
        if other == split:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # that split's own notes are not this error's
                counts[other] = len(load_records(dataset, other, data_dir, hub_files, seed, folder_split=folder_split))
        except UserError:
            counts[other] = 0
    where = f"{dataset} {data_dir}" if data_dir else dataset
    present = [f"--split {other} ({count:,} image{'s' if count != 1 else ''})"
               for other, count in counts.items() if count]
    advice = "pass " + " or ".join(present) if present else "no split has any: check --data-dir"
    return f"the {split} split of {where} has no images with captions; {advice}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=run_folder_argument,
                        help="run folder (best adapter) or its last/ sub-folder")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="split to caption (default: test); without --out, the outputs of val or train go into "
                             "RUN/eval-val or RUN/eval-train, leaving the run's own test figures as they are")
    parser.add_argument("--limit", type=whole_number(0, meaning=" (0 = all)"), default=0,
                        help="caption at most this many images, drawn by the run's own seed (not --seed), so every "
                             "evaluation of a run with one --limit scores the same images; 0 = all")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="data source (default: the run's own)")
    parser.add_argument("--data-dir", default=None,
                        help="data folder (default: the run's own); without --dataset, read as the run's data "
                        "set where it can be, else as its files show")
    parser.add_argument("--hub-data-files", default=None, help="parquet files for --dataset flickr30k")
    parser.add_argument("--out", default=None, type=not_empty,
                        help="folder for the outputs (default: the checkpoint folder for --split test, its "
                             "eval-val or eval-train sub-folder for --split val or train; with --compare: none, the "
                             "table is only printed)")
    parser.add_argument("--batch-size", type=whole_number(1), default=128 if torch.cuda.is_available() else 64,
                        help="images per CLIP and generation batch (default 128 on a GPU, 64 on a CPU)")
    parser.add_argument("--num-workers", type=whole_number(0, meaning=" (0 = decode in this process)"),
                        default=default_image_workers(),
                        help="DataLoader workers that decode images (default: one per CPU core, at most 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                                                         "under torchrun/accelerate launch: each process's own)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--decoding-sweep", action="store_true",
                        help="also caption with greedy, beam 3, beam 5 and nucleus sampling (top-p 0.9, T 1.0, "
                             "--seed) and write one table of all of them (decoding_sweep.json, report.html)")
    parser.add_argument("--gallery-size", type=whole_number(0, meaning=" (0 = every image)"), default=GALLERY_SIZE,
                        help="images in the report's gallery, worst first (each is a thumbnail in the page; the "
                             "metrics are of every image however many are shown); 0 = every image")
    parser.add_argument("--on-bad-sample", choices=("skip", "error"), default=None,
                        help="a missing or unreadable image of the split: stop (error), or leave it out of the scores, "
                             "which then say so and name it (skip) (default: the run's own --on-bad-sample, as its "
                             "final evaluation did; error for a run that does not record one)")
    parser.add_argument("--compare", nargs="+", metavar="RUN",
                        help="print one table of these runs side by side, from their metrics.json; no evaluation")
    add_loading_flags(parser)
    add_decoding_flags(parser)
    return usage_errors_once_per_machine(parser)


def check_out_folder(out: Path, outputs: tuple[str, ...] = EVAL_OUTPUTS, named: str = "") -> None:
    """--out must be a folder that exists or can be made: a file in its place (or in its path) would
    only fail at the end, after the whole split was captioned, with FileExistsError. An existing one must hold
    no file the `outputs` would replace but one an evaluation wrote, and no images. `named`: how errors name the
    folder (default "--out OUT")."""
    named = named or f"--out {out}"
    folder = nearest_existing(out)
    if not folder.is_dir():
        where = "is a file" if folder == out else f"is inside {folder}, which is a file"
        raise UserError(f"{named} {where}: give a folder for the outputs (it is made if need be)")
    if folder != out and out.suffix.lower() in FILE_SUFFIXES:  # `--out results.json` made a folder of that name
        raise UserError(f"{named} names a file, but the outputs are several files ({', '.join(outputs)}), "
                        "written into a folder: give a folder for them (it is made if need be)")
    if folder == out:
        check_out_holds_nothing_of_the_users(out, outputs, named)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{named}: cannot write in {folder}; give a folder you can write to")
    missing = [place for place in (out, *out.parents) if not place.exists()]  # deepest first
    try:  # made now: a place that cannot hold a folder (/proc, a full disk) fails before the work, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{named} cannot be made ({error.strerror or error}); give a folder you can write "
                        "to") from None
    # And taken away again: a command refused later (a split with no images, --out inside the data folder) left
    # empty folders behind. The outputs make it again.
    for place in missing:
        with contextlib.suppress(OSError):  # another process of a launch took it away first
            place.rmdir()


def check_out_holds_nothing_of_the_users(out: Path, outputs: tuple[str, ...], named: str) -> None:
    """An existing --out folder that no evaluation or comparison wrote into must hold no file of an output's name
    (an evaluation replaces them all, and deletes those it does not write): the user's own report.html or
    metrics.json was overwritten without a word. Nor images: among them the curve PNGs would be taken for some
    (inference.py captions a folder's every image), and a caption folder's own files be mixed with outputs."""
    if not written_by_eval(out, outputs):
        if clash := next((name for name in outputs if os.path.lexists(out / name)), None):
            raise UserError(f"{named} holds a {clash} that is no output of eval.py, and would be replaced: give "
                            "a folder of its own for the outputs (it is made if need be)")
    with os.scandir(out) as entries:
        image = next((entry.name for entry in entries if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
                      and entry.name not in (LOSS_CURVE, METRIC_CURVE)), None)
    if image is not None:
        raise UserError(f"{named} holds images (first: {image}), which the outputs' curve PNGs would be mixed "
                        "in with: give a folder of its own for the outputs (it is made if need be)")


def written_by_eval(folder: Path, outputs: tuple[str, ...]) -> bool:
    """Whether what wrote `outputs` into `folder` before was eval.py: for a comparison its comparison.json, for an
    evaluation its lock file or metrics.json. (Each its own: a comparison written beside a user's report.html
    must not make that file an evaluation's to replace.)"""
    if outputs == COMPARISON_FILES:
        return json_value(folder / COMPARISON_FILES[1], "runs") is not None
    return (folder / OUTPUTS_LOCK).exists() or json_value(folder / METRICS_FILE, "baseline_decided_by") is not None


def check_out_outside_the_data(out: str | None, data_dirs) -> None:
    """--out inside the data folder evaluated (or trained on) put the outputs among its images: the demo's
    `--out .../data/images` too, whose curve PNGs a caption folder's readers then take for images."""
    if not out:
        return
    for data_dir in filter(None, data_dirs):
        data, place = Path(data_dir).expanduser().resolve(), Path(out).expanduser().resolve()
        if place.is_relative_to(data):
            where = "the data folder" if place == data else f"inside the data folder {data_dir}"
            raise UserError(f"--out {out} is {where}: give a folder outside it for the outputs")


SAME_RUN_EVERYWHERE = ("every machine needs the run folder, the data and the backbones at the same paths, the same "
                      "files (a shared disk, or copies made whole), and the same flags")
# Flags that may differ from machine to machine: what each shows, how it reads, where its copies are
# (compared by content instead), and where process 0 alone writes.
PER_MACHINE_FLAGS = {"no_progress", "num_workers", "device", "data_dir", "hub_data_files", "clip_model", "lm_model",
                     "trust_remote_code", "out", "checkpoint"}


def checkpoint_problem(checkpoint: Path, out: str, split: str = "test", writes: bool = True) -> str:
    """Why `checkpoint` cannot be evaluated here ("" if it can): what each process checks on its machine
    (the one that `writes` the outputs, whether it can)."""
    if not checkpoint.exists():
        return f"{checkpoint} does not exist: give a run folder (python eval.py saved_models/RUN)"
    if checkpoint.is_file():
        return f"{checkpoint} is a file: eval.py takes the run folder (here {checkpoint.parent})"
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        return not_a_run_folder(checkpoint)
    try:
        if writes:
            check_outputs_can_be_written(checkpoint, out, split)
    except UserError as error:
        return str(error)
    if not (checkpoint / ADAPTER_WEIGHTS).is_file():  # else a traceback from the digest of what was scored
        return no_adapter_weights(checkpoint / ADAPTER_WEIGHTS)
    return ""


def evaluated_facts(args, checkpoint: Path, captioner, records, train_records) -> dict[str, str]:
    """What every process must have loaded alike (see utils.check_processes_agree)."""
    from train import content_digest

    return {**loaded_facts(args, checkpoint, captioner),
            "the evaluated data (a digest of image ids, captions, file sizes)": content_digest(records),
            "the baseline's training data (a digest)": content_digest(train_records)}


def loaded_facts(args, checkpoint: Path, captioner, per_machine: frozenset = frozenset()) -> dict[str, str]:
    """The flags (all but PER_MACHINE_FLAGS and `per_machine`) and the adapter and backbones loaded by their
    weights, which every process of eval.py or inference.py must hold alike."""
    flags = {f"--{name.replace('_', '-')}": repr(value) for name, value in sorted(vars(args).items())
             if name not in PER_MACHINE_FLAGS | per_machine}
    return {**flags, "the adapter's weights (a digest)": file_digest(checkpoint / ADAPTER_WEIGHTS),
            "the CLIP weights (a digest)": encoder_fingerprint(captioner),
            "the language model's weights (a digest)": weights_digest(captioner.lm)}


def check_outputs_can_be_written(checkpoint: Path, out: str, split: str = "test") -> None:
    """Before any work: the outputs' default folder (the checkpoint, or its eval-<split>/) can be written, or it
    used to fail only after the whole split was captioned (a damaged train_log.jsonl costs only the curves), and
    eval-<split>/ holds none of the user's files, as --out must not; and --out is not another run's folder."""
    if not out and not os.access(checkpoint, os.W_OK | os.X_OK):
        raise UserError(f"{checkpoint} cannot be written, and the outputs go there unless --out says otherwise: "
                        "pass --out FOLDER")
    if not out and split != "test":
        folder = outputs_folder(checkpoint, split, out)
        check_out_folder(folder, named=f"{folder} (where --split {split} writes unless --out says otherwise)")
    if out and (Path(out) / ADAPTER_CONFIG).is_file() and not Path(out).samefile(checkpoint):
        # Its metrics.json, report and predictions would then be another adapter's, under its own name
        # (and --compare would call them stale instead of saying whose they are).
        raise UserError(f"--out {out} is another run's folder: its {METRICS_FILE} would hold {checkpoint}'s figures; "
                        f"give a folder of its own (or leave out --out to write into {checkpoint})")


def check_args(args) -> None:
    """What the flags' types cannot check alone (the --out path, this machine's devices), before any
    data or model loads."""
    if args.out:
        check_out_folder(Path(args.out), COMPARISON_FILES if args.compare else EVAL_OUTPUTS)
    if not args.compare:
        pick_device(args.device)


def flags_compare_ignores(parser: argparse.ArgumentParser, args) -> list[str]:
    """Evaluation flags given with --compare, which evaluates nothing: they would silently do nothing."""
    kept = {"compare", "out", "checkpoint", "help"}
    return [action.option_strings[0] for action in parser._actions
            if action.dest not in kept and action.option_strings and getattr(args, action.dest) != action.default]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `eval.py RUN | head -1`: the reader's leaving raised BrokenPipeError at the next print, which ended the
    # evaluation before it wrote anything (minutes of captioning lost); now the work goes on, its output unread.
    with keep_going_if_the_reader_leaves(what_goes_on(args)):
        return evaluate_or_compare(parser, args)


def what_goes_on(args) -> str:
    """What still happens once the reader of standard output has gone, for ReaderMayLeave's note."""
    if args.compare:
        return f"the comparison is still written into {args.out}" if args.out else "the rest of the table is dropped"
    where = outputs_folder(Path(args.checkpoint), args.split, args.out) if args.checkpoint else args.out
    return f"the evaluation goes on and writes its files into {where}"


def evaluate_or_compare(parser: argparse.ArgumentParser, args) -> int:
    check_args(args)
    if args.compare:
        if args.checkpoint:
            raise UserError(f"give a run to evaluate ({args.checkpoint}) or --compare RUN RUN ..., not both")
        if ignored := flags_compare_ignores(parser, args):
            raise UserError(f"--compare reads the metrics.json each evaluation wrote and evaluates nothing, so "
                            f"{', '.join(ignored)} would do nothing: evaluate with them first (python eval.py RUN "
                            f"{' '.join(ignored)} ...)")
        if not Processes.first():  # started by torchrun / accelerate launch: one table, written once
            return 0
        return compare_main(args)
    if not args.checkpoint:
        raise UserError("give a run folder to evaluate (python eval.py RUN), or --compare RUN RUN ...")
    # Under a launcher the processes join before any reads the run: one that finds no run folder on its
    # machine (a disk of its own) then stops them all in one line, where the others waited for it forever.
    processes = Processes.from_environment("eval.py", args.device)
    try:  # from the first collective on: the run's check, the loading's end, the gathers
        with one_reading_per_folder():  # the split scored, the baseline's train split and the deal's checks
            return evaluate_run(args, processes)
    except RuntimeError as error:  # another process stopped (a signal, a crash) and said why: not a gather traceback
        return another_process_ended(error, "evaluation", lambda: "; nothing was written")


def evaluate_run(args, processes: Processes) -> int:
    """Evaluate the run args.checkpoint names, this process's shard of it under a launcher: the main process
    writes and prints the results."""
    checkpoint = checkpoint_folder(args.checkpoint)
    processes.agree({}, problem=checkpoint_problem(checkpoint, args.out, args.split, writes=processes.is_main),
                    advice=SAME_RUN_EVERYWHERE)
    # What every process reads alike: a line it stops on (a split with no images, a changed caption file)
    # is printed once, not once per process, or names the one process whose files differ.
    with stopping_together(processes, SAME_RUN_EVERYWHERE):
        run_dir = find_run_dir(checkpoint)
        check_outputs_outlive_the_next_save(checkpoint, run_dir, args.out)
        run = find_run_config(checkpoint)
        dataset = args.dataset or data_dir_dataset(args.data_dir, run.get("dataset"))
        if dataset is None:
            raise UserError(f"{checkpoint} does not say which data it was trained on; pass --dataset and --data-dir")
        check_data_flags(dataset, args.data_dir, args.hub_data_files)
        data_dir = args.data_dir or (run.get("data_dir") if dataset == run.get("dataset") else None)
        check_out_outside_the_data(args.out, (data_dir, run.get("data_dir")))
        hub_files = args.hub_data_files or run.get("hub_data_files") or FLICKR30K_PARQUET
        seed = run.get("seed", 0)
        decoding = decoding_from_args(args, AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG).max_caption_tokens)
        decodings = {describe_decoding(decoding): decoding}
        if args.decoding_sweep:
            for sweep_decoding in SWEEP_DECODINGS:
                sweep_decoding = dataclasses.replace(sweep_decoding, max_new_tokens=decoding.max_new_tokens)
                decodings.setdefault(describe_decoding(sweep_decoding), sweep_decoding)
        args.seed = seed_from_args(args, decodings.values())  # resolved before metrics.json's options record it

        # Chosen before any data is read: a --device or --dtype the machine lacks is refused at once.
        device = processes.device or pick_device(args.device)
        dtype = chosen_dtype(args.dtype, device)
        if announce := loaded_as_the_run_names_note(checkpoint, args.clip_model, args.lm_model,
                                                    data_the_run_names(run, args.data_dir, args.hub_data_files)):
            note(announce, file=sys.stderr)
        rebuild_cleared_demo(data_dir)
        own_data = same_data(run, dataset, data_dir)
        # The run's own folder is dealt as it was for training; another as new runs deal it, so that runs
        # old and new are scored on the same images of it.
        folder_split = folder_split_of(run) if own_data else "hash"
        # As the run's final evaluation did: `eval.py RUN` scores the images that evaluation scored. (Resolved here,
        # not in args: metrics.json's options keep the flag as given, None for the run's own, as --dataset's.)
        on_bad_sample = args.on_bad_sample or run.get("on_bad_sample", "error")
        bad_samples: list[tuple[str, str]] = []  # under skip: the split's missing, then unreadable, images
        loaded = load_records(dataset, args.split, data_dir, hub_files, seed, on_bad_sample, bad_samples, folder_split)
        records = limit_records(loaded, args.limit, seed)
        sampled = len(records) < len(loaded)  # for the note on images left out (skipped_images_note)
        if not records:
            raise UserError(empty_split_message(dataset, args.split, data_dir, hub_files, seed, folder_split))
        state = saved_trainer_state(run_dir)  # read once: it lists every training image of a caption folder
        trained_ids = trained_image_ids(state, run)
        train_records = baseline_training_records(run, dataset, data_dir, hub_files, trained_ids)
        if dataset == "folder" and own_data:
            deal_note = check_split_deal_unchanged(state, run_dir, run)
            check_no_trained_image_held_out(records, trained_ids, args.split, data_dir, run_dir)
            if deal_note:
                note(deal_note, file=sys.stderr)
        # Which adapter is scored, read before it loads: read after captioning, a run still training had put a
        # newer adapter there by then, and metrics.json named that one for the older one's figures.
        scored = what_was_scored(checkpoint, dataset, args.split, records, result_options(args))
        live = still_training_note(run_dir, scored["adapter"]["step"])
        captioner = load_captioner(checkpoint, device=device, dtype=dtype,
                                   **loading_from_args(args, checkpoint))
        resume_gc_after_loading()  # a demo evaluation of 150 images: 14.7 s with it on all along, 13.1 s so
        # Now, not at the first batch: by then the split's and the baseline's features were extracted.
        captioner.check_fits_context(decoding.max_new_tokens, "--max-new-tokens")
    if on_bad_sample == "skip":
        # Not in the block above: its processes gather here, and one that stopped in it would meet these
        # gathers with its own (stopping_together's).
        with stopping_together(processes, SAME_RUN_EVERYWHERE):
            records = readable_split(captioner, records, args.batch_size, args.num_workers,
                                     not args.no_progress and processes.is_main, feature_cache_settings(run),
                                     bad_samples, processes)
        scored.update(scored_images(records))
    if processes.count > 1:  # each machine may read a copy of its own: copies that differ would caption apart
        processes.agree(evaluated_facts(args, checkpoint, captioner, records, train_records),
                        advice=SAME_RUN_EVERYWHERE)
    results = evaluate_captioner(captioner, records, decodings, train_records, args.batch_size, args.num_workers,
                                 not args.no_progress and processes.is_main, args.seed, processes,
                                 feature_cache=feature_cache_settings(run))
    if results is None:  # not the main process: it captioned its shard and is done (or the main one reports why not)
        return 0
    result = results[describe_decoding(decoding)]
    result.metrics.update(scored)
    selected_on = selected_on_note(records, run, checkpoint, run_dir) if args.split == "val" else ""
    copied = same_picture_note(result.copies, len(records)) if args.split != "train" else ""
    skipped = skipped_images_note(bad_samples, len(records), args.split, sampled)
    printed_notes = [note for note in (skipped, trained_on_note(records, train_records), copied, selected_on, live)
                     if note]
    result.metrics["notes"] += printed_notes
    sweep = sweep_table(results) if args.decoding_sweep else None
    out_dir = outputs_folder(checkpoint, args.split, args.out)
    written = write_eval_outputs(out_dir, result, records, run_dir, sweep, args.gallery_size)
    print_metrics(result.metrics, title=f"{checkpoint} on {dataset} {args.split} ({len(records)} images, "
                                        f"{result.metrics['decoding_name']}, {result.metrics['coco_tokenization']})",
                  notes=tuple(printed_notes))
    if sweep is not None:
        header, rows = sweep_rows(sweep)
        print("Decoding comparison (x100), same split:\n" + format_table(rows, header) + "\n")
    say_written(written)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
