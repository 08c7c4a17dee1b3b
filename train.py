"""Train the adapter between a frozen CLIP and a frozen causal LM, under Hugging Face Accelerate.

    python train.py --demo                                  # offline demo: builds tiny backbones, trains, evaluates
    python train.py --train-limit 2000 --run-name quick     # Flickr30k from the Hub, 2,000 training images (seeded)
    python train.py --run-name quick --resume               # continue an interrupted run where it stopped
    accelerate launch -q train.py --run-name big ...        # several GPUs (DDP); -q: see README

A run folder saved_models/<run-name>/ holds the best adapter (by validation ROUGE-L, or --select-by) at its top,
the last one in last/, the resume state in resume/, run_config.json and train_log.jsonl.
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly, not in a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # run_cli turns it back into KeyboardInterrupt

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from dataset import (DATASETS, DEFAULT_SEED, FLICKR30K_PARQUET, FOLDER_SPLIT_OF_OLDER_RUNS, FOLDER_SPLITS,
                     PADDING_PAIR, CaptionPairs, EpochShuffleSampler, check_data_flags, collate_captions,
                     dataset_from_data_dir, dealt_names, drop_unreadable, encoder_fingerprint, extract_features,
                     hash_deal_record, limit_records, load_records, one_reading_per_folder, run_feature_cache,
                     split_deal)
from metrics import validation_cider_d
from model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, IGNORE_INDEX, AdapterConfig, DecodingConfig, TrainingLoss,
                   build_captioner, checkpoint_folder, let_4bit_weights_repack, load_adapter_state,
                   missing_local_folder, note_other_backbone_weights, repair_torn_export, resolve_dtype, save_adapter,
                   save_adapter_weights, value_count)
from utils import (MAX_RECORDS_JSON_BYTES, HelpFormatter, Processes, Terminated, UserError, another_process_ended,
                   append_jsonl, caption_diversity, caption_metrics,
                   check_folder_is_shared, check_processes_agree, collapse_warning, default_image_workers,
                   gpu_computes_in_bf16, ids_digest, interrupt_handled, interrupt_name, interrupted_exit_code,
                   is_whole_number, join_processes, keep_going_if_the_reader_leaves, json_text, json_value,
                   launched_on_cpu, launched_processes, library_versions, load_state, lone_cpu_launch_warning,
                   machines, nearest_existing, not_a_link, note, read_json, read_jsonl, removed_unless_renamed,
                   rng_states, run_cli, said_alike_before_joining, said_alike_by, save_state, set_rng_states,
                   stopping_together, sync_folder, sync_tree, tell_the_launcher, usage_errors_once_per_machine,
                   user_message, weights_digest, write_json, write_jsonl, write_text)

RUN_CONFIG = "run_config.json"
# --select-by: the validation record's key, and whether higher is better.
SELECT_BY = {"rougeL": ("val_rougeL", True), "cider_d": ("val_cider_d", True), "loss": ("val_loss", False)}
CIDER_MIN_VAL_IMAGES = 10  # fewer, and CIDEr-D's IDF (over the validation split) says little
# --report-to: Accelerate's trackers, and the package each needs (pip name).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
TRACKING_DIR = "tracking"  # under the run folder: where trackers that write files (TensorBoard) write
TRACKING_PROJECT = "captioner"  # the W&B project, MLflow experiment, ... (the run is named by --run-name)
WANDB_RUN_ID = "wandb_run_id.txt"  # under TRACKING_DIR: the W&B run that every start of this run logs to
MLFLOW_RUN_ID = "mlflow_run_id.txt"  # under TRACKING_DIR: the MLflow run that every start of this run logs to
TRAIN_LOG = "train_log.jsonl"
DEMO_RUN_NAMES = ["demo", *(f"demo-{i}" for i in range(2, 1000))]  # --demo takes the first free one
RUN_LOCK = ".train.lock"  # held by the process training in the folder (claim_run_folder)
TRAINER_STATE = "trainer_state.json"


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Every training flag; written to run_config.json so a run can be resumed and audited."""

    run_name: str = _help("name of the run folder under --output-dir (default: run-<date>-<time>; with --demo the "
                          "first free of demo, demo-2, ...)",
                          default="")
    output_dir: str = _help("where run folders are written", default="saved_models")
    demo: bool = _help("offline demo: build (once) and use tiny backbones and a synthetic image set (its learning "
                       "rate is 1e-2, 1e-3 with --adapter-kind transformer)", default=False)
    resume: bool = _help("continue the run named by --run-name from its last checkpoint, with its saved config",
                         default=False)
    # data
    dataset: Literal[DATASETS] = _help("flickr30k (Hub parquet export) | karpathy (local JSON + images) | folder "
                                       "(local images + captions.jsonl/.csv, or imagefolder's metadata.jsonl/.csv)",
                                       default="flickr30k")
    data_dir: str | None = _help("data folder for --dataset karpathy or folder (without --dataset, the one its files "
                                 "ask for)", default=None)
    hub_data_files: str = _help("parquet files for --dataset flickr30k", default=FLICKR30K_PARQUET)
    folder_split: Literal[FOLDER_SPLITS] = _help(
        "--dataset folder: how images whose caption rows name no split are dealt to train, val and test: hash (by "
        "a hash of --seed and each image's name, so adding or removing images moves no other image, but for a "
        "stand-in for a val or test split no image hashes into: see the README) or shuffle (a "
        "seeded shuffle of all of them, as runs before hash had; one image added deals every split again)",
        default="hash")
    train_limit: int = _help("train on at most this many images (all their captions); 0 = all", default=0)
    val_limit: int = _help("validate on at most this many images; 0 = all", default=200)
    test_limit: int = _help("final test evaluation on at most this many images; 0 = all", default=0)
    # model
    clip_model: str = _help("CLIP checkpoint (Hub id or folder)", default="openai/clip-vit-base-patch32")
    lm_model: str = _help("causal LM checkpoint with its tokenizer (Hub id or folder)", default="Qwen/Qwen3-0.6B-Base")
    clip_revision: str | None = _help("Hub revision of the CLIP checkpoint", default=None)
    lm_revision: str | None = _help("Hub revision of the LM checkpoint", default=None)
    lm_quantization: Literal["none", "8bit", "4bit"] = _help(
        "load the frozen LM in 8-bit or 4-bit NF4 through bitsandbytes, for small GPUs; eval.py and inference.py "
        "load it the same way unless told otherwise", default="none")
    trust_remote_code: bool = _help("allow backbones whose checkpoints ship their own Python code to run it "
                                    "(off unless given)", default=False)
    adapter_kind: Literal["linear", "mlp", "transformer"] = _help(
        "linear: one Linear, one prefix token; mlp: ClipCap-style MLP; transformer: ClipCap's transformer mapper "
        "(self-attention over the projected feature and learned prefix tokens)", default="mlp")
    prefix_length: int = _help("prefix tokens the mlp and transformer adapters make (linear always makes 1)",
                               default=10)
    adapter_hidden_dim: int = _help("mlp hidden size; 0 = prefix_length * LM hidden / 2 (ClipCap's rule)", default=0)
    adapter_layers: int = _help("self-attention layers of the transformer adapter (ClipCap's 8)", default=8)
    max_caption_tokens: int = _help("longer captions are cut to this many tokens, EOS included", default=40)
    standardize_image_features: bool = _help(
        "the adapter first centres and scales each CLIP feature dimension by the training set's mean and std "
        "(kept with its weights); on the demo it cut shape errors from 24 to 7 of 150 "
        "(--no-standardize-image-features: off)",
        default=True)
    # optimisation
    epochs: int = _help("passes over the (image, caption) pairs", default=3)
    max_steps: int = _help("stop after this many optimizer steps; 0 = run all epochs", default=0)
    batch_size: int = _help("pairs per micro-batch per process", default=64)
    grad_accum_steps: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak AdamW learning rate", default=3e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    warmup_ratio: float = _help("fraction of steps spent warming up before cosine decay", default=0.05)
    max_grad_norm: float = _help("gradient clipping norm; 0 = off", default=1.0)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = _help(
        "Accelerate mixed precision; auto = bf16 on a GPU that computes in it (Ampere and later), else no. On a "
        "CPU with AMX (Xeon Sapphire Rapids and later) bf16 trains the real backbones 1.5-2.4x faster (batch "
        "4-64, measured), but the demo's tiny backbones 1.4x slower (7x on a CPU without AMX): hence not the "
        "default there",
        default="auto")
    compile: bool = _help("torch.compile the training loss (falls back to eager with a note where it cannot "
                          "run); pays off on GPUs; compiles once per caption-length bucket, at most 6, to "
                          "which batches are then padded", default=False)
    frozen_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _help(
        "dtype of the frozen backbones' weights; auto = that of --mixed-precision", default="auto")
    seed: int = _help("seed for initialisation, data order and subsets", default=DEFAULT_SEED)
    max_nonfinite_steps: int = _help("a step whose loss or gradient is NaN/inf is not applied; after this many in a "
                                     "row the run stops, its last good checkpoint intact", default=5)
    on_bad_sample: Literal["skip", "error"] = _help("an unreadable or missing image (training, validation or the "
                                                    "final test): skip it (listed at the end and in "
                                                    "bad_samples.jsonl) or stop with an error", default="skip")
    # cadence
    log_every: int = _help("log training loss every N optimizer steps", default=10)
    eval_every: int = _help("validation loss, ROUGE-L and CIDEr-D every N steps (and at the end); 0 = only at "
                            "the end", default=500)
    select_by: Literal[tuple(SELECT_BY)] = _help(
        "the validation score that picks the best adapter, saved at the run's top: rougeL (rouge-score ROUGE-L "
        "F1), cider_d (pycocoevalcap CIDEr-D over the validation split, Python PTB tokenisation; wants 10 or more "
        "validation images) or loss (the lowest validation loss)", default="rougeL")
    save_every: int = _help("write last/ and the resume state every N steps (and at the end)", default=500)
    # evaluation and loading
    final_eval: bool = _help("after training, caption the test split with the best adapter and score it",
                             default=True)
    eval_batch_size: int = _help("images per generation batch", default=64)
    feature_batch_size: int = _help("images per CLIP batch when extracting features", default=64)
    feature_cache: bool = _help("keep CLIP features on disk, keyed by encoder weights and preprocessing, so each "
                                "image is encoded once across epochs and runs (--no-feature-cache re-encodes)",
                                default=True)
    feature_cache_dir: str = _help("feature cache folder (default: $CAPTIONER_HOME/features, "
                                   "~/.cache/captioner/features)", default="")
    num_workers: int = _help("DataLoader workers that decode images; by default one per CPU core, at most 8",
                             default=default_image_workers())
    progress: bool = _help("show progress bars", default=True)
    report_to: str = _help(
        "also send the log (training loss, learning rate, speed, validation and test scores) to experiment "
        f"trackers through Accelerate, comma-separated: {', '.join(TRACKERS)} (TensorBoard writes under the run "
        "folder, in tracking/); each needs its package installed; none: train_log.jsonl only", default="none")


# 16 epochs: where the demo's validation loss stopped falling (measured before features were
# standardised: 0.29-0.30 after 8 epochs, 0.25 after 16, no lower after 24; now 0.22 after 16). 1e-2
# rather than 3e-3: val loss 0.25 either way; picked on the demo's test split (CIDEr-D 675 vs 634), so
# the demo's test figures are not a blind test.
DEMO_DEFAULTS = dict(
    run_name="", dataset="folder", data_dir="", clip_model="", lm_model="", epochs=16, batch_size=32,
    learning_rate=1e-2, warmup_ratio=0.03, eval_every=250, save_every=250, val_limit=60, num_workers=0,
)
# The transformer adapter on the demo, same epochs: CIDEr-D 724.68 at 1e-3, 611.79 at the MLP's 1e-2
# (below retrieval): attention layers want a lower rate.
DEMO_TRANSFORMER_LEARNING_RATE = 1e-3


def parse_config(argv=None) -> TrainConfig:
    """The flags as a TrainConfig. `config.given_flags` (not a field, so never saved) names the
    flags written on the command line: on --resume only those may change the saved config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # The flags are the command line's only: HfArgumentParser would also read, unasked, a train.args file beside
    # the script, whose flags no line printed names and --resume could not tell from the saved run's.
    parse = partial(parser.parse_args_into_dataclasses, args=argv, return_remaining_strings=True,
                    look_for_args_file=False)
    config, unknown = parse()
    if unknown:
        raise said_alike_before_joining()(f"unknown arguments {' '.join(unknown)}; see python train.py --help")
    if config.demo:  # the demo changes defaults; flags given explicitly still win
        parser.set_defaults(**DEMO_DEFAULTS)
        config, _ = parse()
    config.given_flags = flags_named(argv)
    return config


def is_off_switch(action) -> bool:
    """HfArgumentParser's --no-X for a boolean field X that defaults to True (store_false into X)."""
    return isinstance(action, argparse._StoreFalseAction)


def build_parser():
    """TrainConfig's flags. HfArgumentParser names each field's underscore spelling first and gives
    a --no-X switch its X's help; --help lists them as the README writes them (--run-name) and says
    what each switch does."""
    from transformers import HfArgumentParser

    resolve_field_types(TrainConfig)
    # No abbreviated flags: --resume compares the flags given by their full names.
    parser = HfArgumentParser(TrainConfig, description=__doc__, allow_abbrev=False,
                              formatter_class=HelpFormatter)
    for action in parser._actions:
        action.option_strings.sort(key=lambda option: "_" in option)  # --run-name before --run_name
        if is_off_switch(action):
            action.help = f"turn off --{action.dest.replace('_', '-')}"
    return usage_errors_once_per_machine(parser)


def resolve_field_types(cls) -> None:
    """`cls`'s annotations as the types they name (they are strings here: `from __future__ import annotations`).
    HfArgumentParser looks them up in sys.modules[cls.__module__], which under `python -m cProfile train.py` (or
    -m trace) is the profiler's module, not this script: profiling a run failed with "Type resolution failed for
    <class '__main__.TrainConfig'>". This module's own globals name them wherever it runs."""
    cls.__annotations__ = typing.get_type_hints(cls, globalns=globals())


def flags_named(argv: list[str]) -> set[str]:
    """TrainConfig fields named by flags in argv (--eval-every, --eval_every=5, --no-feature-cache)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    names = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].partition("=")[0].replace("-", "_")
        if name not in fields and name.startswith("no_"):
            name = name[3:]
        if name in fields:
            names.add(name)
    return names


# Flags that may change when a run is resumed: they steer what it does from now on (how long, how
# fast, how often it reports), not what it has done. Any other flag would contradict the saved state.
RESUME_OVERRIDES = {"epochs", "max_steps", "learning_rate", "max_nonfinite_steps", "log_every", "eval_every",
                    "save_every", "final_eval", "test_limit", "eval_batch_size", "feature_batch_size",
                    "feature_cache", "feature_cache_dir", "num_workers", "compile", "on_bad_sample", "data_dir",
                    "hub_data_files", "report_to"}
# Always taken from the command line: where the run is, and what this machine may do.
RESUME_FROM_COMMAND_LINE = ("run_name", "output_dir", "progress", "trust_remote_code")
# Fields added after runs had been saved, with the value those runs trained with: a run_config.json
# without one reads as that value, and at that value it stays out of the settings digest, so their
# resume states still match.
FIELDS_ADDED_LATER = {"standardize_image_features": False, "adapter_layers": 8, "select_by": "rougeL",
                      "folder_split": FOLDER_SPLIT_OF_OLDER_RUNS}


def check_run_name(name: str) -> None:
    """A run name is one folder under --output-dir: `..`, `/abs` or `a/b` would write a run elsewhere."""
    if name and (name in (".", "..") or Path(name).name != name or "\\" in name):
        raise UserError(f"--run-name {name!r} must be a plain folder name (no '/', not '.' or '..'); "
                        "--output-dir says where run folders go")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill what the flags leave open: demo assets, a run name, a saved config on --resume."""
    check_run_name(config.run_name)
    given = {name: getattr(config, name) for name in ("data_dir", "hub_data_files")
             if name in getattr(config, "given_flags", set())}
    if config.resume:
        resumed = resumed_config(config)
        if resumed.demo:
            from demo import rebuild_cleared_demo

            rebuild_cleared_demo(resumed.clip_model, resumed.lm_model, resumed.data_dir)
        check_data_flags(resumed.dataset, given.get("data_dir"), given.get("hub_data_files"))
        check_flags_that_do_nothing(resumed, getattr(config, "given_flags", set()))
        return check_config(resumed)
    if config.demo and config.dataset != "folder":  # --demo's data is a caption folder: another would be a silent swap
        raise UserError(f"--demo trains on its own synthetic caption folder, not --dataset {config.dataset}: "
                        "drop one of the two")
    if "data_dir" in given and "dataset" not in getattr(config, "given_flags", set()) and not config.demo:
        config.dataset = dataset_from_data_dir(given["data_dir"])
    check_data_flags(config.dataset, given.get("data_dir"), given.get("hub_data_files"))
    if "folder_split" in getattr(config, "given_flags", set()) and config.dataset != "folder":  # else silently ignored
        raise UserError(f"--folder-split deals the images of a --dataset folder that name no split, and --dataset "
                        f"{config.dataset} gives every image its split; drop --folder-split")
    check_adapter_flags(config)
    if config.demo:
        from demo import ensure_demo_assets

        if config.adapter_kind == "transformer" and "learning_rate" not in getattr(config, "given_flags", set()):
            config.learning_rate = DEMO_TRANSFORMER_LEARNING_RATE
        assets = ensure_demo_assets(progress=config.progress)
        config.data_dir = config.data_dir or assets["data_dir"]
        config.clip_model = config.clip_model or assets["clip_model"]
        config.lm_model = config.lm_model or assets["lm_model"]
    # After the demo's backbones are filled in: before, its "" (Path("") is the current folder) was named as one.
    check_flags_that_do_nothing(config, getattr(config, "given_flags", set()))
    if not config.run_name and config.demo:  # demo, demo-2, ...: a rerun never stops on an existing folder
        config.run_name = next(n for n in DEMO_RUN_NAMES if not (Path(config.output_dir) / n).exists())
        config.name_picked = True
    if not config.run_name:
        config.run_name = time.strftime("run-%Y%m%d-%H%M%S")
        config.name_picked = True
    if config.mixed_precision == "auto":
        config.mixed_precision = auto_mixed_precision()
    absolute_local_paths(config)
    return check_config(config)


def moved_backbone_error(run_config: Path, names) -> UserError | None:
    """On --resume, a backbone folder no longer where the run saved it: the run cannot take another in
    its place (another model of the same shape could not be told apart), but the same one put back, or
    linked, resumes."""
    gone = next((name for name in names if missing_local_folder(name)), None)
    if gone is None:
        return None
    return UserError(f"--resume continues {run_config.parent} with the backbones {run_config} names, and {gone} "
                     f"is gone: if the folder was moved, put it back, or a link to its new place (ln -s NEW_PLACE "
                     f"{gone}), and resume without --clip-model/--lm-model")


def absolute_local_paths(config: TrainConfig) -> None:
    """Backbone and data folders given by relative paths, made absolute where they exist here (a name
    that is no folder here is a Hub id): the run's config is read again from other folders (eval.py,
    inference.py, --resume), where `tiny/clip` would name nothing, or a Hub repo. Links are kept, not
    followed: a link is how a moved folder is put back in place."""
    for name in ("clip_model", "lm_model", "data_dir"):
        value = getattr(config, name)
        if value and Path(value).expanduser().is_dir():
            setattr(config, name, str(Path(value).expanduser().absolute()))
    if config.hub_data_files and "://" not in config.hub_data_files and glob.glob(
            os.path.expanduser(config.hub_data_files)):
        config.hub_data_files = str(Path(config.hub_data_files).expanduser().absolute())


def check_adapter_flags(config: TrainConfig) -> None:
    """A size flag of another adapter kind would be silently ignored: refuse it."""
    for name, kind in (("adapter_hidden_dim", "mlp"), ("adapter_layers", "transformer")):
        if name in getattr(config, "given_flags", set()) and config.adapter_kind != kind:
            raise UserError(f"--{name.replace('_', '-')} sizes the {kind} adapter, but --adapter-kind is "
                            f"{config.adapter_kind}; drop it, or pass --adapter-kind {kind}")
    # The linear adapter makes one prefix token whatever --prefix-length says (AdapterConfig sets it to 1).
    if "prefix_length" in getattr(config, "given_flags", set()) and config.adapter_kind == "linear":
        raise UserError(f"--prefix-length {config.prefix_length}: the linear adapter always makes one prefix token; "
                        "drop it, or pass --adapter-kind mlp or transformer")


def check_flags_that_do_nothing(config: TrainConfig, given: set[str]) -> None:
    """Flags on this command line (`given`) that `config` (the new run's, or the resumed run's with this command's
    changes) makes do nothing: each was taken without a word. A note where nothing is lost by it; an error where a
    resume would not do what it was asked (its "resuming ..." line said it would)."""
    # --max-steps sets the length where it is not 0 (as its help says, and as a new run given both is meant to
    # read), but a resume that changes --epochs said "--epochs 5 (was 2)" and trained the steps it had before.
    if "epochs" in getattr(config, "resume_changes", {}) and config.max_steps > 0:
        where = "given here" if "max_steps" in given else "saved with the run"
        raise UserError(f"--epochs {config.epochs} changes nothing: --max-steps {config.max_steps} ({where}) sets the "
                        "run's length; change --max-steps instead, or give --max-steps 0 to run the epochs")
    if "test_limit" in given and not config.final_eval:
        note(f"note: --test-limit {config.test_limit} changes nothing: the final test evaluation is off "
             "(--no-final-eval)", file=sys.stderr)
    for name, model in (("clip_revision", config.clip_model), ("lm_revision", config.lm_model)):
        if name in given and getattr(config, name) and Path(model).is_dir():  # from_pretrained reads the folder as is
            note(f"note: --{name.replace('_', '-')} {getattr(config, name)} changes nothing: {model} is a local "
                 "folder, read as it is; a revision picks a commit of a Hub model", file=sys.stderr)
    if "feature_cache_dir" in given and not config.feature_cache:
        note(f"note: --feature-cache-dir {config.feature_cache_dir} changes nothing: the feature cache is off "
             "(--no-feature-cache)", file=sys.stderr)


def check_saved_types(path: Path, saved: dict) -> None:
    """Each saved value of the kind its flag takes: an edited "8" for 8 would otherwise surface as a
    refusal to change --batch-size, or deep in the loop."""
    defaults = dataclasses.asdict(TrainConfig())
    hints = typing.get_type_hints(TrainConfig)
    for name, value in saved.items():
        default = defaults[name]
        kinds = (str, type(None)) if default is None else (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)):
            kind = "str" if default is None else type(default).__name__
            raise UserError(f"{path}: {name} is {value!r}, expected {kind}; restore the run's own run_config.json")
        choices = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is Literal else ()
        if choices and value not in choices:
            raise UserError(f"{path}: {name} is {value!r}, expected one of {', '.join(choices)}; restore the run's "
                            "own run_config.json")


def resumed_config(config: TrainConfig) -> TrainConfig:
    """The run's saved config, in the folder named on this command line, with the flags given here
    that may change (RESUME_OVERRIDES) applied; `resume_changes` lists them. Trust in remote code
    comes from this command line only, never from a saved file."""
    if not config.run_name:
        resumable = resumable_runs(Path(config.output_dir))
        listed = (f"; in {config.output_dir}, newest first: {', '.join(resumable[:5])}"
                  f"{', ...' if len(resumable) > 5 else ''}" if resumable else "")
        raise UserError(f"--resume needs --run-name of the run to continue{listed}")
    saved_file = Path(config.output_dir) / config.run_name / RUN_CONFIG
    if not saved_file.is_file():
        # A folder holding only the lock: a run killed (SIGKILL, a power cut) before it saved its config.
        started = saved_file.parent.is_dir() and saved_nothing(saved_file.parent)
        raise UserError(f"nothing to resume: {saved_file} not found"
                        + ("; the run stopped before it saved anything: run the command that started it again, "
                           "without --resume" if started else ""))
    saved_fields = read_json(saved_file, "run config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved_fields, dict) or set(saved_fields) - known:
        raise UserError(f"{saved_file} is not a run config of this version of train.py (unknown fields "
                        f"{sorted(set(saved_fields) - known) if isinstance(saved_fields, dict) else saved_fields!r})")
    check_saved_types(saved_file, saved_fields)
    saved = TrainConfig(**{**FIELDS_ADDED_LATER, **saved_fields})
    if config.mixed_precision == "auto":  # a run saves what auto meant (resolve_config): compare that
        config.mixed_precision = auto_mixed_precision()
    absolute_local_paths(config)  # as the run saved them
    if config.demo and not saved.demo:  # --demo was dropped without a word: the run trains its own data
        raise UserError(f"--demo: {saved_file.parent} is not a demo run (it trains on {saved.dataset} data); drop "
                        "--demo to continue it, or give a demo run's --run-name")
    given = getattr(config, "given_flags", set()) - {"resume", "demo", *RESUME_FROM_COMMAND_LINE}
    refused = sorted(name for name in given - RESUME_OVERRIDES if getattr(config, name) != getattr(saved, name))
    backbones = [getattr(saved, name) for name in refused if name in ("clip_model", "lm_model")]
    if moved := moved_backbone_error(saved_file, backbones):
        raise moved
    if refused:
        listed = ", ".join(f"--{n.replace('_', '-')} (saved {getattr(saved, n)!r})" for n in refused)
        raise UserError(f"--resume continues {saved_file.parent} as it was saved, and {listed} cannot change; "
                        "start a new run (another --run-name) to train with other settings")
    changes = {name: getattr(config, name) for name in sorted(given & RESUME_OVERRIDES)
               if getattr(config, name) != getattr(saved, name)}
    resumed = dataclasses.replace(saved, resume=True, **changes,
                                  **{name: getattr(config, name) for name in RESUME_FROM_COMMAND_LINE})
    resumed.resume_changes = {name: (getattr(saved, name), value) for name, value in changes.items()}
    if "feature_cache_dir" not in given:
        resumed.feature_cache_dir = run_feature_cache(resumed.feature_cache_dir, resumed.feature_cache) or ""
    return resumed


def resumable_runs(output_dir: Path) -> list[str]:
    """The names of the run folders under output_dir that hold a resume state, newest first."""
    saved = []
    with contextlib.suppress(OSError):
        for folder in output_dir.iterdir():
            with contextlib.suppress(OSError, TypeError):  # TypeError: its resume/ was being swapped just now
                saved.append(((resume_state_dir(folder) / TRAINER_STATE).stat().st_mtime, folder.name))
    return [name for _, name in sorted(saved, reverse=True)]


def check_config(config: TrainConfig) -> TrainConfig:
    """Refuse values that would crash later or be silently misread, naming the flag."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in ("batch_size", "grad_accum_steps", "epochs", "eval_batch_size", "feature_batch_size", "log_every",
                 "prefix_length", "adapter_layers"):
        if getattr(config, name) < 1:
            raise UserError(f"{flag(name)} must be >= 1, got {getattr(config, name)}")
    for name in ("max_steps", "train_limit", "val_limit", "test_limit", "eval_every", "save_every", "num_workers",
                 "adapter_hidden_dim", "max_nonfinite_steps"):
        if getattr(config, name) < 0:
            raise UserError(f"{flag(name)} must be >= 0 (0 means {'none' if name == 'num_workers' else 'off or all'}, "
                            f"see --help), got {getattr(config, name)}")
    if config.max_caption_tokens < 2:
        raise UserError("--max-caption-tokens must be >= 2 (one word and EOS)")
    if not 0 <= config.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
        raise UserError(f"--seed must be from 0 to {2**32 - 1}, got {config.seed}")
    if not 0 < config.learning_rate <= 1:  # also refuses nan; AdamW moves each weight by about this much per step
        raise UserError(f"--learning-rate must be > 0 and <= 1, got {config.learning_rate}")
    for name in ("weight_decay", "max_grad_norm"):
        if not 0 <= getattr(config, name) < math.inf:
            raise UserError(f"{flag(name)} must be a finite number >= 0, got {getattr(config, name)}")
    if not 0 <= config.warmup_ratio < 1:
        raise UserError(f"--warmup-ratio must be >= 0 and < 1, got {config.warmup_ratio}")
    for name in ("output_dir", "feature_cache_dir"):
        path = Path(getattr(config, name)).expanduser() if getattr(config, name) else None
        if path is not None and path.exists() and not path.is_dir():
            raise UserError(f"{flag(name)} {path} is a file, not a folder; name a folder")
        # A path through a file (a_file/runs) "does not exist" above; the run folder's mkdir then failed with
        # a traceback, and a feature cache there quietly cached nothing.
        blocker = nearest_existing(path) if path is not None else None
        if blocker is not None and not blocker.is_dir():
            raise UserError(f"{flag(name)} {path} cannot be a folder: {blocker} is a file; name a folder elsewhere")
    if config.feature_cache_dir:  # saved absolute: eval.py run from another folder reads the same cache
        config.feature_cache_dir = str(Path(config.feature_cache_dir).expanduser().absolute())
    tracker_names(config.report_to)
    return config


def tracker_names(report_to: str) -> list[str]:
    """--report-to as Accelerate's tracker names, each checked to be known and installed (Accelerate
    itself drops a tracker whose package is missing, with a debug message no one sees)."""
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in TRACKERS]
    problem = ("none cannot be combined with trackers" if "none" in names else
               f"unknown {', '.join(unknown)}" if unknown else "empty" if not names else "")
    if problem:
        raise UserError(f"--report-to {report_to!r}: {problem}; give none or some of {', '.join(TRACKERS)}, "
                        "comma-separated")
    from accelerate.tracking import get_available_trackers

    installed = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in installed]
    if missing:
        raise UserError(f"--report-to {', '.join(missing)}: not installed here; pip install "
                        f"{' '.join(TRACKERS[name] for name in missing)}, or leave it out")
    return list(dict.fromkeys(names))


def auto_mixed_precision() -> str:
    from accelerate.utils import parse_flag_from_env

    # A GPU machine's run sent to its CPU (`accelerate launch --cpu`, ACCELERATE_USE_CPU=true torchrun)
    # trains on a CPU, where bf16 autocast is slower than fp32 but on the newest Xeons.
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return "no"
    return "bf16" if gpu_computes_in_bf16() else "no"


def frozen_dtype(config: TrainConfig) -> torch.dtype:
    if config.frozen_dtype != "auto":
        return resolve_dtype(config.frozen_dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


@dataclass
class TrainerState:
    """Where training stands: saved with the resume state, enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_score: float | None = None  # the --select-by score of the best adapter; None before any validation
    best_step: int = 0
    history: list = field(default_factory=list)  # one entry per validation
    finished: bool = False
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0  # steps not applied because of a NaN/inf loss or gradient
    # What the state belongs to, checked on --resume ("" in states saved before these were kept):
    settings: str = ""  # settings_digest of the run's config
    train_data: str = ""  # training_set_label of the data it trained on
    data_content: dict = field(default_factory=dict)  # {"train", "val": content_digest}; {} in older states
    split_deal: str = ""  # dataset.split_deal of a caption folder some of whose images get their split dealt
    hash_deal: dict = field(default_factory=dict)  # dataset.hash_deal_record under --folder-split hash; else {}
    # The ids of the images trained on, for a caption folder (which grows or is edited in place): eval.py's
    # baseline retrieves from these only, and refuses a val or test image among them. [] for other data.
    train_images: list = field(default_factory=list)
    # The training loss since the last log line (LossWindow.saved): without it, a run resumed between two
    # log lines logs the mean of only its own steps there, and the steps before the checkpoint never.
    log_window: dict = field(default_factory=dict)  # {} in older states


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save a resumable checkpoint at the next step and leave."""

    def __init__(self):
        self.signal_name: str | None = None
        self.agreed = False  # another process saw a signal (multi-process runs)
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C: the user really wants out
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------
# Pieces of the run
# ----------------------------------------------------------------------------------------------

def adapter_config_for(config: TrainConfig) -> AdapterConfig:
    return AdapterConfig(
        clip_model=config.clip_model, lm_model=config.lm_model, clip_revision=config.clip_revision,
        lm_revision=config.lm_revision, adapter_kind=config.adapter_kind, prefix_length=config.prefix_length,
        adapter_hidden_dim=config.adapter_hidden_dim, adapter_layers=config.adapter_layers,
        max_caption_tokens=config.max_caption_tokens, standardize_image_features=config.standardize_image_features,
    )


def load_split(config: TrainConfig, split: str, limit: int, bad_samples: list | None = None):
    """One split's records. Given the run's bad_samples, images whose files are missing follow
    --on-bad-sample as unreadable ones do; without it they stop the run."""
    on_bad_sample = config.on_bad_sample if bad_samples is not None else "error"
    records = load_records(config.dataset, split, config.data_dir, config.hub_data_files, config.seed,
                           on_bad_sample, bad_samples, config.folder_split)
    return limit_records(records, limit, config.seed)


def make_pairs(captioner, records, config: TrainConfig, desc: str, bad_samples: list, progress: bool = True):
    """(records that could be read, their caption pairs); unreadable images go to bad_samples."""
    features = extract_features(captioner, records, config.feature_batch_size, config.num_workers,
                                progress=config.progress and progress, desc=desc,
                                cache_dir=config.feature_cache_dir or None,
                                use_cache=config.feature_cache, on_bad_sample=config.on_bad_sample,
                                bad_samples=bad_samples)
    records, features = drop_unreadable(records, features)
    pairs = CaptionPairs(records, features, captioner.tokenizer, captioner.config.eos_token_id,
                         config.max_caption_tokens)
    return records, pairs


def bad_samples_of_every_process(accelerator, bad_samples: list) -> list:
    """The images that any process could not read (or found missing), the same list on each process.

    Each process reads the images it has no cached features for itself (all of them under
    --no-feature-cache, or with a cache of its own machine), so a flaky disk or a damaged copy on one
    machine fails on one process only. Left to itself that process would train on other pairs under the
    same indices (and on a different number of batches: a hang), and the report would list only the main
    process's images. All processes leave out every image any of them skipped."""
    first_reason = {}
    for image, why in every_process([tuple(entry) for entry in bad_samples]):
        first_reason.setdefault(image, why)  # an image every process failed on is listed once
    return list(first_reason.items())


# Flags that may differ from machine to machine: where each keeps its data, backbones and feature cache
# (compared by content instead), how it reads them, and what it shows.
PER_MACHINE_FLAGS = {"data_dir", "hub_data_files", "clip_model", "lm_model", "feature_cache", "feature_cache_dir",
                     "feature_batch_size", "num_workers", "progress", "trust_remote_code", "report_to", "compile",
                     "output_dir", "run_name"}
SHARED_RUN_FOLDER = ("A run has one run folder: process 0 writes it, and every process saves its random state into "
                     "each checkpoint and reads it back on --resume")
SAME_FILES = ("give every machine the same data and backbones (copied whole, or on a shared disk) and the same flags")


def loaded_facts(config: TrainConfig, captioner) -> dict[str, str]:
    """What every process must have loaded alike (check_processes_agree): the flags, and the backbones
    by their weights (where each machine loads its own copy: a demo built on each, another revision)."""
    flags = {f"--{name.replace('_', '-')}": json.dumps(value, default=str)
             for name, value in dataclasses.asdict(config).items() if name not in PER_MACHINE_FLAGS}
    return {**flags, "the CLIP weights (a digest)": encoder_fingerprint(captioner),
            "the language model's weights (a digest)": weights_digest(captioner.lm),
            "the tokenizer's vocabulary (a digest)": str(captioner.config.vocabulary_digest)}


def first_on_each_machine(accelerator, work):
    """`work()` on the main process first, then on the first process of each other machine, then on the
    rest: what the first writes into a cache (demo assets, CLIP features) the others read, and a machine
    whose cache is a disk of its own fills it once, not once per process. On one machine this is
    accelerate's main_process_first. Returns what `work` returned.

    A UserError in `work` on any process (a run folder that exists, demo assets that cannot be written)
    stops every process with one line, and the processes whose turn had not come skip `work`: before,
    they waited at a barrier the failed process never reached, and then each said another process had
    ended and to continue the run with --resume, a run that never began."""
    if accelerator.num_processes == 1:
        return work()
    turn = 0 if accelerator.is_main_process else 1 if accelerator.is_local_main_process else 2
    result, problem, failed = None, "", False
    for phase in range(3):  # every process passes the same three exchanges, in place of barriers
        if phase == turn and not failed:
            try:
                result = work()
            except UserError as error:
                problem = user_message(error)
        failed = anyone(accelerator, bool(problem))
    if failed:
        check_processes_agree({}, problem=problem, advice=SAME_FILES)  # raises, on every process
    return result


def anyone(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process. A collective: every process calls it."""
    return accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "max").item() > 0


def every_process(values: list) -> list:
    """The lists of every process, one after another (rank 0's first). A collective: every process calls it."""
    from accelerate.utils import gather_object

    return gather_object(list(values))


def without_images(records, pairs: CaptionPairs, image_ids: set):
    """records and their pairs without the images named (see bad_samples_of_every_process)."""
    keep = [i for i, record in enumerate(records) if record.image_id not in image_ids]
    if len(keep) == len(records):
        return records, pairs
    records = [records[i] for i in keep]
    return records, CaptionPairs(records, pairs.features[keep], pairs.tokenizer, pairs.eos_token_id, pairs.max_tokens)


COMPILED_LENGTH_BUCKETS = 6  # at most this many caption lengths, so as many graphs, under --compile


def compiled_length_multiple(max_caption_tokens: int) -> int:
    """The caption-length bucket for a compiled loss: a multiple of 8, coarse enough that every
    length up to max_caption_tokens falls in one of COMPILED_LENGTH_BUCKETS buckets.

    torch.compile builds a graph per input shape (the chunked loss's loop over rows fixes the
    shape even when dynamo tries a dynamic graph), and after 8 it silently runs eager. Exact
    dynamic padding on real captions (5 to 40+ tokens) meets that limit within the first epoch,
    having paid a compilation for each length on the way.
    """
    return 8 * math.ceil(max_caption_tokens / (8 * COMPILED_LENGTH_BUCKETS))


def make_loader(pairs: CaptionPairs, batch_size: int, pad_token_id: int, sampler=None, length_multiple: int = 1,
                full_batches: bool = False, pin_memory: bool = False):
    """Batches padded to their longest caption, rounded up to `length_multiple`; with `full_batches`
    a short last batch is filled with padding rows (see collate_captions). `pin_memory` for batches bound
    for a GPU: pinned by whether the machine had one, a GPU machine's run on its CPU (accelerate launch
    --cpu) pinned every batch for a copy that never came."""
    from torch.utils.data import DataLoader

    collate = partial(collate_captions, pad_token_id=pad_token_id, length_multiple=length_multiple,
                      rows=batch_size if full_batches else None)
    return DataLoader(pairs, batch_size=batch_size, sampler=sampler, collate_fn=collate, pin_memory=pin_memory)


def make_train_loader(pairs: CaptionPairs, config: TrainConfig, pad_token_id: int, processes: int = 1,
                      pin_memory: bool = False):
    """Shuffled training batches. Under --compile they come in only a few shapes (bucketed lengths,
    full batches: see compiled_length_multiple); eagerly, each is padded to its longest caption.
    Several processes get an epoch padded to whole rounds of batches (see EpochShuffleSampler)."""
    sampler = EpochShuffleSampler(len(pairs), config.seed, config.batch_size * processes if processes > 1 else 1)
    return make_loader(pairs, config.batch_size, pad_token_id, sampler,
                       length_multiple=compiled_length_multiple(config.max_caption_tokens) if config.compile else 1,
                       full_batches=config.compile, pin_memory=pin_memory)


def make_optimizer(captioner, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the adapter's parameters and nothing else: the backbones stay frozen."""
    return torch.optim.AdamW(captioner.adapter.parameters(), lr=config.learning_rate,
                             weight_decay=config.weight_decay, fused=torch.cuda.is_available())


def lr_schedule(optimizer, config: TrainConfig, total_steps: int, num_processes: int):
    from transformers import get_cosine_schedule_with_warmup

    # Accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    warmup = int(config.warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup * num_processes, total_steps * num_processes)


def validate(captioner, pairs: CaptionPairs, records, config: TrainConfig, accelerator) -> dict:
    """Token-weighted validation loss and greedy-caption ROUGE-L / BLEU-4 / CIDEr-D on the validation images.

    Under several processes each scores its shard and every process gets the record of all of them: the
    figures of one process, the same on each (each keeps the best score and decides by it), in about 1/N of
    the time where there are N batches of --eval-batch-size or more to share (scoring the gathered captions
    is not shared)."""
    processes = Processes.of(accelerator)
    shares = processes.gather([validation_share(captioner, pairs, config, accelerator, processes)])
    return validation_record(shares, records)


@torch.no_grad()
def validation_share(captioner, pairs: CaptionPairs, config: TrainConfig, accelerator, processes: Processes) -> dict:
    """This process's part of a validation: each of its loss batches' summed loss and caption tokens, and its
    images' greedy captions. Shards of whole --eval-batch-size batches (eval.py's), so every batch is the one
    a single process forms, and each figure the one it computes."""
    captioner.eval()
    pair_shard = processes.shard(len(pairs), config.eval_batch_size)
    image_shard = processes.shard(len(pairs.features), config.eval_batch_size)
    batch_losses, captions = [], []
    with plain_adapter(captioner, accelerator):
        for batch in make_loader(pairs, config.eval_batch_size, captioner.config.pad_token_id, sampler=pair_shard,
                                 pin_memory=accelerator.device.type == "cuda"):
            batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "pair_index"}
            with accelerator.autocast():
                loss = captioner(**batch)
            count = int((batch["labels"] != IGNORE_INDEX).sum())
            batch_losses.append((loss.item() * count, count))
        for start in range(image_shard.start, image_shard.stop, config.eval_batch_size):
            features = pairs.features[start : min(start + config.eval_batch_size, image_shard.stop)]
            captions += captioner.generate(features, greedy_decoding(config))
    captioner.train()
    return {"batch_losses": batch_losses, "captions": captions}


def greedy_decoding(config: TrainConfig) -> DecodingConfig:
    """How validation and the final test evaluation caption, as eval.py does by default: greedy, at most as many
    tokens as the training captions were cut to (EOS included). The test evaluation's 30 tokens, whatever the run
    trained on, cut captions of 31-40 tokens that validation had scored whole."""
    return DecodingConfig(max_new_tokens=config.max_caption_tokens)


@contextlib.contextmanager
def plain_adapter(captioner, accelerator):
    """The captioner with its adapter out of DDP's wrapper. DDP's first forward after a training step
    broadcasts the adapter's buffers (the feature statistics): a collective, and a process with no
    validation batch to run would skip it and leave the others waiting in it."""
    wrapped = captioner.adapter
    captioner.adapter = accelerator.unwrap_model(wrapped)
    try:
        yield
    finally:
        captioner.adapter = wrapped


def validation_record(shares: list[dict], records) -> dict:
    """The validation figures of every process's share, given in rank order (the split's order)."""
    batch_losses = [terms for share in shares for terms in share["batch_losses"]]
    predictions = [caption for share in shares for caption in share["captions"]]
    if len(predictions) != len(records):  # each image captioned exactly once
        raise RuntimeError(f"the processes captioned {len(predictions)} validation images of {len(records)}")
    # Summed batch by batch in the split's order, as one process sums them: the same float, not a sum of sums.
    loss_sum, tokens = 0.0, 0
    for batch_sum, count in batch_losses:
        loss_sum, tokens = loss_sum + batch_sum, tokens + count
    references = [r.captions for r in records]
    metrics = caption_metrics(predictions, references)
    diversity = caption_diversity(predictions)
    return {"val_loss": loss_sum / max(tokens, 1), "val_rougeL": metrics["rougeL"], "val_bleu4": metrics["bleu4"],
            "val_cider_d": validation_cider_d(predictions, references),
            "val_distinct_captions": diversity["distinct_captions"],
            "val_top_caption_share": round(diversity["top_caption_share"], 4),
            "example": predictions[0] if predictions else "",
            "warning": collapse_warning(diversity, len(records), what="validation images")}


def export_metadata(config: TrainConfig, state: TrainerState, kind: str) -> dict:
    return {
        "checkpoint": kind,
        "step": state.step,
        "hyperparameters": dataclasses.asdict(config),
        "best": {"by": SELECT_BY[config.select_by][0], SELECT_BY[config.select_by][0]: state.best_score,
                 "step": state.best_step},
        "history": state.history,
        "library_versions": library_versions(),
    }


def save_export(directory: Path, accelerator, adapter, captioner, config, state, kind: str) -> None:
    """adapter.safetensors + adapter_config.json; a separate folder (last/) is written aside and
    swapped in whole, the best adapter at the run root file by file (each file atomically)."""
    if accelerator.is_main_process:
        adapter_config = dataclasses.replace(captioner.config, training=export_metadata(config, state, kind))
        if kind == "best":
            save_adapter(directory, accelerator.unwrap_model(adapter), adapter_config)
        else:
            tmp = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(not_a_link(tmp), ignore_errors=True)  # rmtree leaves a link, to be written through
            with removed_unless_renamed(tmp):  # a full disk: the half-written copy gives its space back
                save_adapter(tmp, accelerator.unwrap_model(adapter), adapter_config)
                kept = swap_in(directory, tmp, keep_others=True)
            if kept:
                say(accelerator, kept_aside_note(directory, kept, state.step))


def swap_in(folder: Path, tmp: Path, keep_others: bool = False) -> Path | None:
    """Replace `folder` by the finished `tmp`: the old one stays whole until the new one is, on the
    disk too (a power cut soon after the renames must not leave empty files where the old ones were;
    see utils.replace_durably). With `keep_others`, an old one holding files this save does not write is
    kept (kept_aside), not deleted: where it went, else None."""
    # A link at either name is none of the run's (utils.not_a_link): rmtree refuses a link, which stayed behind.
    old = not_a_link(folder.with_name(folder.name + ".old"))
    had_folder = not_a_link(folder).exists()  # if not, a crash between the renames left `old` the only good copy
    written = {path.name for path in tmp.iterdir()}
    kept = None
    if had_folder:
        kept = discard_replaced(old, written, keep_others)
    sync_tree(tmp)
    if had_folder:
        folder.rename(old)
    tmp.rename(folder)
    sync_folder(folder.parent)
    return discard_replaced(old, written, keep_others) or kept


def discard_replaced(old: Path, written: set[str], keep_others: bool) -> Path | None:
    """Delete the replaced `old` checkpoint, unless (`keep_others`) it holds files the save did not write:
    eval.py RUN/last writes its outputs into last/ (as the README says), and the next save (a --resume with
    more epochs) deleted them without a word. Then the whole folder is renamed to last-step-N/ (kept_aside)
    instead: the outputs stay beside the adapter they describe, which moved out alone they would not."""
    if keep_others and old.is_dir() and others_in(old, written):
        return kept_aside(old)
    shutil.rmtree(old, ignore_errors=True)
    return None


def kept_aside(old: Path) -> Path:
    """Rename the replaced last/ (last.old/) to the first free of last-step-N, last-step-N-2, ... (N: its
    adapter's step) and return that."""
    step = json_value(old / ADAPTER_CONFIG, "training", "step")
    name = f"last-step-{step}" if is_whole_number(step) else "last-kept"
    kept = next(old.with_name(candidate) for candidate in later_names(name, demo=False)
                if not os.path.lexists(old.with_name(candidate)))
    old.rename(kept)
    sync_folder(kept.parent)
    return kept


def others_in(folder: Path, written: set[str]) -> list[str]:
    """The names in `folder` besides `written` (a save's own) and eval.py's lock, which it leaves there empty."""
    from eval import OUTPUTS_LOCK  # here, as train() imports eval.py: a save keeps its imports few

    return sorted(path.name for path in folder.iterdir() if path.name not in written | {OUTPUTS_LOCK})


def kept_aside_note(directory: Path, kept: Path, step: int) -> str:
    others = others_in(kept, {ADAPTER_WEIGHTS, ADAPTER_CONFIG})
    named = ", ".join(others[:5]) + (f" and {len(others) - 5:,} more" if len(others) > 5 else "")
    return (f"note: {directory} held files train.py does not write ({named}): kept with the adapter "
            f"they describe in {kept}; {directory} now holds step {step}'s")


def save_resume_state(run_dir: Path, accelerator, adapter, optimizer, scheduler, state: TrainerState) -> None:
    """Adapter, optimizer, scheduler, every process's RNG, and where the data stands.

    safetensors + JSON only (loading never unpickles). Written aside, then renamed, so a crash
    mid-save leaves the previous state usable.
    """
    final, tmp = run_dir / "resume", run_dir / "resume.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(not_a_link(tmp), ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # A save that fails (a full disk) deletes resume.tmp/: left, it held on to the space the error asked to free.
    with removed_unless_renamed(tmp) if accelerator.is_main_process else contextlib.nullcontext():
        save_state(tmp, f"rng_{accelerator.process_index}", rng_states())
        if accelerator.is_main_process:
            save_adapter_weights(tmp / ADAPTER_WEIGHTS, accelerator.unwrap_model(adapter))
            save_state(tmp, "optimizer", optimizer.state_dict())
            save_state(tmp, "scheduler", scheduler.scheduler.state_dict())
            if accelerator.scaler is not None:
                save_state(tmp, "grad_scaler", accelerator.scaler.state_dict())
            write_json(tmp / TRAINER_STATE, dataclasses.asdict(state))  # last: its presence marks a whole state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            swap_in(final, tmp)
    accelerator.wait_for_everyone()


def processes_that_saved(resume_dir: Path) -> int:
    """How many processes saved a resume state: each writes its own random generators' file (0: none did)."""
    return len(list(resume_dir.glob("rng_*.json")))


def load_resume_state(run_dir: Path, accelerator, adapter, optimizer, scheduler,
                      config: TrainConfig | None = None) -> TrainerState:
    resume_dir = resume_state_dir(run_dir)
    if resume_dir is None:
        if (run_dir / ADAPTER_WEIGHTS).is_file():
            # Killed after a validation saved the best adapter, before the first checkpoint: "delete the folder"
            # threw away the only adapter the run had trained (as what_an_early_stop_left says after a signal).
            raise UserError(f"{run_dir} has no resume state (resume/{TRAINER_STATE}): it stopped before its first "
                            f"checkpoint and cannot be continued, but {best_adapter_kept(run_dir)}")
        raise UserError(f"{run_dir} has no resume state (resume/{TRAINER_STATE}): it stopped before its first "
                        "checkpoint and cannot be continued; start it again under another --run-name (or delete "
                        "the folder)")
    if pickled_resume_state(resume_dir):
        raise UserError(f"{resume_dir} is in the resume format of an older version of this project (pickled "
                        "optimizer.bin, random_states_*.pkl), which this version does not read (it never unpickles): "
                        "start a new run (another --run-name) to train further; the run's adapter still works with "
                        "eval.py and inference.py")
    rng_file = resume_dir / f"rng_{accelerator.process_index}.json"
    saved_by = processes_that_saved(resume_dir)
    if saved_by and saved_by != accelerator.num_processes:
        # The global batch, the steps per epoch and each process's place in the epoch depend on it.
        # With the command that does (given the run's config), as a stop names it: the launcher and its count.
        command = f": {resume_command_for(config, saved_by, accelerator.device.type == 'cpu')}" if config else ""
        raise UserError(f"{resume_dir} was saved by {saved_by} process{'es' if saved_by > 1 else ''}, not "
                        f"{accelerator.num_processes}; resume with the same number of processes ({saved_by}){command}")
    if not rng_file.is_file():
        raise UserError(f"{rng_file} is missing: the resume state is damaged; resume from a copy or start again")

    values = value_count(accelerator.unwrap_model(adapter))
    restore(resume_dir / ADAPTER_WEIGHTS, lambda: accelerator.unwrap_model(adapter).load_state_dict(
        load_adapter_state(resume_dir / ADAPTER_WEIGHTS, values, run_dir / RUN_CONFIG)))
    restore(resume_dir / "optimizer.json", lambda: optimizer.load_state_dict(load_state(resume_dir, "optimizer")))
    restore(resume_dir / "scheduler.json",
            lambda: scheduler.scheduler.load_state_dict(load_state(resume_dir, "scheduler")))
    if accelerator.scaler is not None and (resume_dir / "grad_scaler.json").is_file():
        restore(resume_dir / "grad_scaler.json",
                lambda: accelerator.scaler.load_state_dict(load_state(resume_dir, "grad_scaler")))
    restore(rng_file, lambda: set_rng_states(load_state(resume_dir, f"rng_{accelerator.process_index}")))
    return restore(resume_dir / TRAINER_STATE,
                   lambda: trainer_state_from(read_json(resume_dir / TRAINER_STATE, "trainer state",
                                                        MAX_RECORDS_JSON_BYTES)))


def pickled_resume_state(resume_dir: Path) -> bool:
    """Whether resume_dir holds the first versions' resume state (accelerator.save_state: pickled
    optimizer.bin, random_states_0.pkl), not ours (JSON + safetensors): it was reported as "damaged",
    with advice to resume from a copy, which would be as old."""
    return not processes_that_saved(resume_dir) and (
        (resume_dir / "optimizer.bin").is_file() or any(resume_dir.glob("random_states_*.pkl")))


def trainer_state_from(saved: dict) -> TrainerState:
    """A TrainerState from its JSON. States saved before --select-by kept the best val ROUGE-L as
    best_rougeL, -1 before any validation."""
    if isinstance(saved, dict) and "best_rougeL" in saved and "best_score" not in saved:
        saved = {**saved, "best_score": saved["best_rougeL"] if saved["best_rougeL"] >= 0 else None}
        del saved["best_rougeL"]
    state = TrainerState(**saved)
    check_state_types(state)
    return state


def check_state_types(state: TrainerState) -> None:
    """Each field of the kind the trainer writes (a ValueError, which restore() names the file by): an
    edited "26" for 26 would fail deep in the loop, and a negative step would silently train again
    steps the run has taken, on a schedule at another place."""
    defaults = TrainerState()
    for name, value in dataclasses.asdict(state).items():
        default = getattr(defaults, name)
        if name == "best_score":
            fits, kind = value is None or isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, bool):
            fits, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            fits, kind = is_whole_number(value) and value >= 0, "a whole number >= 0"
        else:
            fits, kind = isinstance(value, type(default)), f"a {type(default).__name__}"
        if not fits:
            raise ValueError(f"{name} is {value!r}, expected {kind}")


def restore(what: Path, load):
    """load(), with a resume-state file that reads but does not fit (edited, from another run or
    version) reported in one line naming it, not as a traceback from deep inside torch."""
    try:
        return load()
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{what} does not fit this run ({type(error).__name__}: {first}); the resume state is "
                        "damaged or from another run: resume from a copy or start again") from None


def set_peak_learning_rate(optimizer, scheduler, learning_rate: float) -> None:
    """A resumed run with another --learning-rate: the schedule keeps its shape and position, scaled
    to the new peak (the loaded scheduler state carries the old one)."""
    schedule = scheduler.scheduler
    schedule.base_lrs = [learning_rate] * len(schedule.base_lrs)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = learning_rate, learning_rate * factor(schedule.last_epoch)


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run restarts from."""
    if path.is_file():
        records = read_jsonl(path)
        if odd := next((r for r in records if not isinstance(r, dict) or not is_whole_number(r.get("step", 0))), None):
            raise UserError(f"{path} holds a line train.py does not write ({json_text(odd)[:80]}); fix or delete "
                            "that line")
        write_jsonl(path, [r for r in records if r.get("step", 0) <= step])


def check_run_folder(run_dir: Path, config: TrainConfig) -> None:
    """Before anything loads: the run folder can be written, and a new run does not land on an old one."""
    folder = nearest_existing(run_dir)  # where the first write will happen
    if folder.is_dir() and not os.access(folder, os.W_OK):
        fix = "copy the run somewhere writable and resume it there" if config.resume else "choose another --output-dir"
        raise UserError(f"{folder} cannot be written (a read-only disk or no permission); {fix}")
    if config.resume:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; choose another --run-name")
    if resume_state_dir(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-name")
    if (run_dir / ADAPTER_WEIGHTS).exists() or (run_dir / "last").exists():
        raise UserError(f"{run_dir} holds a run that stopped before its first resumable checkpoint, so it cannot be "
                        "continued; delete or rename that folder, or choose another --run-name")
    if run_dir.is_dir() and any(p.name != RUN_LOCK for p in run_dir.iterdir()):  # a new run would rewrite a
        # config, cut a log, mix in files
        held = "a run that stopped before its first save (its config and log)" if (run_dir / RUN_CONFIG).exists() \
            else "files that are not a run"
        raise UserError(f"{run_dir} holds {held}; delete or rename that folder, or choose another --run-name")


class RunInUse(Exception):
    """The run folder is locked by another training process (its pid and host are the message)."""


def check_new_run_folder(run_dir: Path, config: TrainConfig) -> None:
    """check_run_folder for a process that does not hold the folder's lock yet: a folder refused because
    it holds a run that another process is training now raises RunInUse naming that process, not advice
    (delete the folder, --resume it) that fits only a run that has stopped."""
    try:
        check_run_folder(run_dir, config)
    except UserError:
        if holder := lock_holder(run_dir):
            raise RunInUse(holder) from None
        raise


def lock_holder(run_dir: Path) -> str | None:
    """The pid and host of the process holding run_dir's lock, or None where none does (or there is no flock).
    Never creates the lock file; its shared lock is held only for the look."""
    try:
        import fcntl

        with open(run_dir / RUN_LOCK) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
    except (ImportError, OSError):  # no lock file, or no flock here: nobody is known to hold it
        pass
    return None


def lock_run_folder(run_dir: Path):
    """The open lock file of run_dir, holding an exclusive advisory lock (flock) for as long as this
    process trains there; the system lets go of it however the process ends, kill -9 included. None
    where there is no flock (Windows). Raises RunInUse, naming the holder, where another process has it."""
    try:
        import fcntl
    except ImportError:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(not_a_link(run_dir / RUN_LOCK), "a+")  # it is truncated: never through a link
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunInUse(holder) from None
        except OSError:  # a file system without locks (some network mounts): train unguarded, as on Windows
            handle.close()
            return None
        if lock_file_is_current(handle, run_dir / RUN_LOCK):
            break
        handle.close()  # its holder deleted it as we opened it (release_run_folder): lock the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def run_being_trained(folder: Path) -> bool:
    """Whether a train.py process holds the run folder's lock, i.e. trains there now. The probe takes a
    shared lock for an instant; a training start in that instant picks the next demo name."""
    return lock_holder(folder) is not None


def lock_file_is_current(handle, path: Path) -> bool:
    """Whether the locked file is still the one at `path` (a file deleted meanwhile guards nothing)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def claim_run_folder(config: TrainConfig):
    """Lock the run's folder for this training process (the main one), so that two starts cannot
    train into one folder: a --resume while the run still trains in another terminal, or two runs
    given (or picking) the same name at once, would cut each other's log and interleave checkpoints.
    Where train.py picked the name (demo, demo-2, ...; run-DATE), a taken one moves on to the next."""
    picked = getattr(config, "name_picked", False)
    for name in later_names(config.run_name, config.demo) if picked else [config.run_name]:
        config.run_name = name
        run_dir = Path(config.output_dir) / name
        try:
            check_new_run_folder(run_dir, config)  # before creating the folder: a new run does not land on an old one
            handle = lock_run_folder(run_dir)
        except RunInUse as holder:
            if picked:
                continue
            wait = ("wait for it to finish, or stop it (Ctrl-C saves a checkpoint) and then --resume"
                    if config.resume else "choose another --run-name")
            raise UserError(f"{run_dir} is being trained by another process ({holder}); {wait}") from None
        except UserError:
            if picked and run_dir.exists():  # another start wrote it since the name was picked
                continue
            raise
        try:
            check_run_folder(run_dir, config)  # again, under the lock: another start may have written it since
        except UserError:
            release_run_folder(handle, run_dir)
            if picked:
                continue
            raise
        return handle
    raise UserError(f"every run name from {config.run_name} on is taken under {config.output_dir}; pass --run-name")


def later_names(name: str, demo: bool) -> list[str]:
    """The name train.py picked and the ones to try after it: demo, demo-2, ...; run-DATE, run-DATE-2, ..."""
    if demo:
        return DEMO_RUN_NAMES[DEMO_RUN_NAMES.index(name):] if name in DEMO_RUN_NAMES else [name]
    return [name, *(f"{name}-{i}" for i in range(2, 1000))]


def release_run_folder(handle, run_dir: Path) -> None:
    """Let go of the run folder's lock, deleting its file (a finished run's folder holds the run only);
    a start that stopped before writing anything leaves no folder, as it did before the lock (else the
    next --demo would pass over an empty demo/)."""
    if handle is None:
        return
    with contextlib.suppress(OSError):
        (run_dir / RUN_LOCK).unlink()  # while still held: a start that opened it meanwhile sees it gone
    handle.close()  # closing the only descriptor releases the flock
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only if empty


def settings_digest(config: TrainConfig) -> str:
    """A digest of the settings a resumed run cannot change (all but RESUME_OVERRIDES and where the run
    is): a resume state copied in from another run does not match its folder's run_config.json."""
    fixed = {name: value for name, value in dataclasses.asdict(config).items()
             if name not in RESUME_OVERRIDES | {*RESUME_FROM_COMMAND_LINE, "resume"}
             and not (name in FIELDS_ADDED_LATER and value == FIELDS_ADDED_LATER[name])}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_set_label(train_records, train_pairs) -> str:
    """The training set in a few words plus a digest of its image ids: --data-dir may point a resumed
    run to its data moved elsewhere (same ids), never to other data (another position in another epoch)."""
    digest = ids_digest(r.image_id for r in train_records)
    return f"{len(train_records):,} images, {len(train_pairs):,} pairs, ids {digest}"


def content_digest(records) -> str:
    """A digest of a split's images as a run uses them: ids, captions and file sizes (not times, nor
    where the folder is: a copy or move of the data keeps them). Captions edited in place, or an image
    re-saved under its name, change it while the ids stay."""
    digest = hashlib.sha256()
    for record in records:
        size = record.path.stat().st_size if record.path is not None else ""
        digest.update(json.dumps([record.image_id, record.captions, size]).encode())
    return digest.hexdigest()[:16]


def check_resume_belongs(state: "TrainerState", run_dir: Path, config: TrainConfig, train_data: str,
                         data_content: dict) -> None:
    if state.settings and state.settings != settings_digest(config):
        raise UserError(f"{run_dir / 'resume'} does not belong to this run: it was saved with other settings than "
                        f"{run_dir / RUN_CONFIG} (copied in from another run?); resume that run in its own folder or "
                        "start again")
    if state.train_data and state.train_data != train_data:
        raise UserError(f"--resume: the training data is not the run's (saved: {state.train_data}; now: {train_data}); "
                        "--data-dir may name the same data moved elsewhere, not other data: start a new run for that")
    # The same ids with other captions or image files would train the rest of the run on other pairs, and
    # other validation data would pick the best adapter by scores of two different sets.
    for split, what in (("train", "training images' captions or files"),
                        ("val", "validation images, their captions or files")):
        if state.data_content.get(split, data_content[split]) != data_content[split]:
            raise UserError(f"--resume: the {what} changed since {run_dir} was saved; put the data back as it was, "
                            "or start a new run (another --run-name) to train on it as it is now")


def resume_state_dir(run_dir: Path) -> Path | None:
    """resume/, or resume.old/ after a crash between the two renames of a save; None before the first save."""
    return next((run_dir / name for name in ("resume", "resume.old") if (run_dir / name / TRAINER_STATE).is_file()),
                None)


def say(accelerator, text: str, every_machine: bool = False) -> None:
    """A line of the run's own (the banner, validations, checkpoints), printed by the main process only:
    accelerate's print prints on the first process of every machine, so each line came once per machine.
    A line `every_machine` must see (a stop, and the command each runs to resume) is printed by each one's first."""
    if accelerator.is_main_process or (every_machine and accelerator.is_local_main_process):
        print(text)


def length_line(config, steps_per_epoch: int, total_steps: int) -> str:
    """The banner's line on the run's length: by --epochs, or by --max-steps where it is given (then the epochs
    that makes; the line said "epochs = 16" of a run --max-steps ended within the first)."""
    epochs = (f"epochs = {config.epochs}" if not config.max_steps
              else f"epochs = {total_steps / max(steps_per_epoch, 1):.3g} (--max-steps {config.max_steps:,})")
    return f"{epochs}   steps per epoch = {steps_per_epoch:,}   total optimizer steps = {total_steps:,}"


def banner(accelerator, config, train_pairs, train_records, steps_per_epoch, total_steps, trainable) -> None:
    say(accelerator, (
        "***** Running training *****\n"
        f"  run folder = {Path(config.output_dir) / config.run_name}\n"
        f"  images = {len(train_records):,}   (image, caption) pairs = {len(train_pairs):,}\n"
        f"  {length_line(config, steps_per_epoch, total_steps)}\n"
        f"  batch per process = {config.batch_size}   processes = {accelerator.num_processes}   "
        f"accumulation = {config.grad_accum_steps}   "
        f"global batch = {config.batch_size * config.grad_accum_steps * accelerator.num_processes}\n"
        f"  trainable parameters = {trainable:,} (adapter only)   device = {accelerator.device}   "
        f"mixed precision = {config.mixed_precision}"
        + (f"   frozen LM = {config.lm_quantization} (bitsandbytes)" if config.lm_quantization != "none" else "")
    ))
    if accelerator.is_local_main_process and not accelerator.is_main_process:  # another machine's console
        first, last = accelerator.process_index, accelerator.process_index + accelerator.num_processes // machines() - 1
        which = f"process {first}" if first == last else f"processes {first}-{last}"  # not "processes 1-1"
        print(f"this machine trains {which} of the run's {accelerator.num_processes}; the banner, progress bar and "
              "messages are printed by process 0's machine, which writes the run folder")


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One training run once it is set up: what train() built (the prepared adapter, optimizer,
    schedule and loader, the data, the state) and what the loop does with them besides stepping."""

    config: TrainConfig
    accelerator: object
    run_dir: Path
    captioner: object
    adapter: object  # accelerator-prepared (DDP-wrapped under several processes)
    optimizer: object
    scheduler: object
    train_loader: object
    train_records: list
    train_pairs: CaptionPairs
    val_records: list
    val_pairs: CaptionPairs
    test_split: tuple | None  # loaded before training so that missing test images stop the run early
    bad_samples: list
    steps_per_epoch: int
    total_steps: int
    state: TrainerState
    last_validated: int = -1  # the step of the latest validation
    window: "LossWindow | None" = None  # the training loss since the last log line, while train_steps runs

    def log(self, record: dict) -> None:
        """A record for train_log.jsonl, and for the --report-to trackers."""
        if self.accelerator.is_main_process:
            with self.writing():
                append_jsonl(self.run_dir / TRAIN_LOG, {**record, "time": round(time.time(), 3)})
            if self.accelerator.trackers:
                self.accelerator.log(tracker_values(record), step=record["step"])

    def save_export(self, kind: str) -> None:
        directory = self.run_dir if kind == "best" else self.run_dir / "last"
        with self.writing():
            save_export(directory, self.accelerator, self.adapter, self.captioner, self.config, self.state, kind)

    def save_checkpoint(self) -> None:
        if self.window is not None:  # every process: saved() reduces over them
            self.state.log_window = self.window.saved()
        self.save_export("last")
        with self.writing():
            save_resume_state(self.run_dir, self.accelerator, self.adapter, self.optimizer, self.scheduler, self.state)

    @contextlib.contextmanager
    def writing(self):
        """A write into the run folder that fails (a full disk, a read-only remount, an I/O error) stops the
        run in one line naming the file and the cause, not a traceback from inside safetensors or json:
        every save is written aside and renamed, so the last complete checkpoint is still whole."""
        try:
            yield
        except OSError as error:
            raise UserError(unsaved_run_message(error, self.run_dir, self.config, self.accelerator)) from None

    def validate(self) -> None:
        """Score the adapter on the validation images, and keep it at the run's top if --select-by's score improved."""
        state, accelerator = self.state, self.accelerator
        self.last_validated = state.step
        if not self.val_records:  # nothing to choose by: the latest adapter is the best there is
            state.best_step = state.step
            self.save_export("best")
            return
        result = validate(self.captioner, self.val_pairs, self.val_records, self.config, accelerator)
        key, higher_is_better = SELECT_BY[self.config.select_by]
        # A tie counts only at the kept step itself: a resumed run re-validating the newer best it adopted
        # (within float noise: another --eval-batch-size sums the same loss in another order).
        improved = (state.best_score is None or math.isnan(state.best_score)
                    or (result[key] > state.best_score if higher_is_better else result[key] < state.best_score)
                    or (state.step == state.best_step and math.isclose(result[key], state.best_score, rel_tol=1e-6)))
        if improved:
            state.best_score, state.best_step = result[key], state.step
        result["best"] = improved  # so the report marks the adapter that was kept
        state.history.append({"step": state.step,
                              **{k: v for k, v in result.items() if k not in ("example", "warning")}})
        self.log({"type": "eval", "step": state.step, "epoch": state.epoch, **result})
        if improved:  # before the line that says so: a run killed during the save had said "saved" of it
            self.save_export("best")
        say(accelerator, f"step {state.step}: val loss {result['val_loss']:.4f}  val ROUGE-L "
                         f"{result['val_rougeL']:.4f}  CIDEr-D {result['val_cider_d']:.4f}"
                         f"{'  (best so far, saved)' if improved else ''}  e.g. {result['example']!r}")
        if result["warning"]:
            say(accelerator, f"step {state.step}: {result['warning']}")

    def skip_nonfinite_step(self, window_losses: list, grad_norm: float, pair_indices: list) -> None:
        """Log a step that was not applied (NaN/inf) with its images; stop the run after too many in a row."""
        state, config = self.state, self.config
        state.nonfinite_in_a_row += 1
        state.nonfinite_steps += 1
        if self.accelerator.num_processes > 1:  # the main process logs the step: the NaN may be another's batch
            window_losses, pair_indices = every_process(window_losses), every_process(pair_indices)
        images = sorted({self.train_records[self.train_pairs.image_index(i)].image_id for i in pair_indices
                         if i != PADDING_PAIR})
        self.log({"type": "nonfinite", "step": state.step, "epoch": state.epoch, "losses": window_losses,
                  "grad_norm": grad_norm, "image_ids": images})
        say(self.accelerator, f"step {state.step}: non-finite loss or gradient (losses {window_losses}, grad norm "
                              f"{grad_norm}); the step was not applied ({state.nonfinite_in_a_row} in a row)")
        if config.max_nonfinite_steps and state.nonfinite_in_a_row >= config.max_nonfinite_steps:
            lower_rate = f"{config.learning_rate / 10:g}"
            if resume_state_dir(self.run_dir) is None:
                raise UserError(
                    f"{state.nonfinite_in_a_row} non-finite steps in a row (up to step {state.step}), before the run's "
                    f"first checkpoint: start again with a lower learning rate (--learning-rate "
                    f"{lower_rate}) under another --run-name, or check the batches named in "
                    f"{self.run_dir / TRAIN_LOG}")
            raise UserError(
                f"{state.nonfinite_in_a_row} non-finite steps in a row (up to step {state.step}): the run stopped "
                f"and its last good checkpoint in {self.run_dir / 'resume'} is intact; continue it with a lower "
                f"learning rate ({resume_command(config, self.accelerator, '--learning-rate', lower_rate)})"
                f" or check the batches named in {self.run_dir / TRAIN_LOG}"
            )


def unsaved_run_message(error: OSError, run_dir: Path, config: TrainConfig, accelerator) -> str:
    what = f"cannot write {error.filename or run_dir} ({error.strerror or error})"
    if (resume_dir := resume_state_dir(run_dir)) is None:
        return (f"{what}: the run stopped before its first checkpoint; free some space (or make {run_dir.parent} "
                f"writable) and start it again under another --run-name")
    return (f"{what}: the run stopped and its last complete checkpoint in {resume_dir} is intact; free "
            f"some space (or make the folder writable) and continue it with {resume_command(config, accelerator)}")


class LossWindow:
    """The training loss and real samples since the last log line, kept on the device: reading them
    back costs a host sync, paid only every --log-every steps."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.loss = torch.zeros((), device=accelerator.device)
        self.samples = torch.zeros((), dtype=torch.long, device=accelerator.device)  # real rows, not padding
        self.steps, self.start = 0, time.perf_counter()
        self.samples_before = 0  # of a window a resumed checkpoint saved (restore), every process's summed

    def add_step(self, step_loss: torch.Tensor) -> None:
        self.loss += step_loss  # the accumulation window's mean over the caption tokens of every process
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Validating and saving are not training: their time is kept out of samples/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - started

    def saved(self) -> dict:
        """The window so far, for the resume state; the same on every process."""
        samples = int(self.accelerator.reduce(self.samples.clone(), "sum").item()) + self.samples_before
        return {"loss": self.loss.item(), "steps": self.steps, "samples": samples}

    def restore(self, saved: dict) -> None:
        """Continue the window a checkpoint saved (exactly: the float32 loss round-trips through JSON). Every
        process holds the same loss (each step's is the mean over all of them). The samples taken before
        the checkpoint count in the next line's `samples` but not in its samples/s, which is timed from here."""
        if saved:
            self.loss.fill_(saved["loss"])
            self.steps = saved["steps"]
            self.samples_before = saved["samples"]

    def leave_out_warm_up(self) -> None:
        """Time the window from here: the first step of a start (or of a resume) compiles with --compile, and
        on a GPU also sets up kernels and memory pools, so it took many times a step's time; counted in, the
        first line's samples/s would understate the run's pace (by 10x and more with --compile). Its samples
        still count in the line's `samples`. One host sync, once per start."""
        self.samples_before += int(self.accelerator.reduce(self.samples.clone(), "sum").item())
        self.samples.zero_()
        self.start = time.perf_counter()

    def flush(self) -> dict:
        """Mean loss and samples/s over every process since the last flush; then start a new window."""
        mean_loss = self.accelerator.reduce(self.loss, "mean").item() / self.steps
        samples = self.accelerator.reduce(self.samples, "sum").item()
        speed = samples / (time.perf_counter() - self.start)
        total = samples + self.samples_before
        self.loss.zero_()
        self.samples.zero_()
        self.steps, self.start, self.samples_before = 0, time.perf_counter(), 0
        return {"loss": mean_loss, "samples": total, "samples_per_s": speed}


def train(config: TrainConfig, on_step=None) -> dict:
    """Train (or continue) one run; returns a summary. `on_step(step)` is called after every step."""
    config, accelerator, lock = start(config)
    interrupted = False
    try:
        with one_reading_per_folder():  # its train, val and test splits and its deal's record from one reading
            run = set_up_run(config, accelerator)
        with StopRequest() as stop:
            if not train_steps(run, stop, on_step):
                interrupted = True
                return {"run_dir": str(run.run_dir), "interrupted": True, "step": run.state.step}
            # Still under StopRequest: a signal now waits until the finished run is saved.
            if run.last_validated != run.state.step:
                run.validate()
            run.state.finished = True
            run.save_checkpoint()
            report_bad_samples(run.run_dir, run.bad_samples, accelerator)
            stopped = stop_requested(stop, accelerator)
        summary = finish(run, stopped, stop.signal_name)
        interrupted = summary["interrupted"]
    except Exception:
        close_trackers(accelerator, failed=True)
        raise
    finally:
        close_trackers(accelerator, interrupted=interrupted)  # (none left after a failure)
        release_run_folder(lock, Path(config.output_dir) / config.run_name)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def start(config: TrainConfig):
    """The resolved config and the Accelerator; every process agrees on the run's name."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list

    processes = Processes()
    if launched_processes() > 1:
        # Joined first, and the run folder checked, before any process reads from it: on machines with
        # disks of their own, one that finds no run to resume would leave the others waiting forever.
        joined = join_processes()
        processes = Processes(joined.process_index, joined.num_processes, joined.device)
        check_folder_is_shared(config.output_dir, "--output-dir", SHARED_RUN_FOLDER)
    if config.resume:  # every process reads the same saved config: a refusal is one line, not one per process
        with stopping_together(processes):
            config = resolve_config(config)  # the saved config, precision and accumulation included
    elif config.mixed_precision == "auto":
        config.mixed_precision = auto_mixed_precision()
    # Trackers that write files need a folder now; it becomes the run's own once the run is named.
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum_steps,
                              log_with=tracker_names(config.report_to) or None,
                              project_config=ProjectConfiguration(logging_dir=config.output_dir))
    if accelerator.num_processes == 1 and (warning := lone_cpu_launch_warning("train.py")):
        print(warning, file=sys.stderr)
    # The main process builds demo assets, picks the run name and claims the run folder first; the others
    # then find the assets cached (or build them once per machine, where its CAPTIONER_HOME is its own) and
    # take the main process's name (a free "demo-N" could differ). A refusal stops all of them in one line.
    def resolve_and_claim():
        resolved = config if config.resume else resolve_config(config)  # a resumed one is resolved above
        return resolved, (claim_run_folder(resolved) if accelerator.is_main_process else None)

    config, lock = first_on_each_machine(accelerator, resolve_and_claim)
    if not config.resume:
        config.run_name = broadcast_object_list([config.run_name])[0]
    return config, accelerator, lock


def load_backbones_and_data(config: TrainConfig, run_dir: Path, device, bad_samples: list):
    """The captioner and the train, val and (with --final-eval) test records; missing files stop the run now.
    The data first: a data set that cannot train stops in seconds, not after the backbones' minute of loading."""
    train_records = load_split(config, "train", config.train_limit, bad_samples)
    val_records = load_split(config, "val", config.val_limit, bad_samples)
    test_split = load_test_split(config) if config.final_eval else None
    if not train_records:
        raise UserError(f"no training images with captions found in {config.dataset} {config.data_dir or ''}")
    try:
        captioner = build_captioner(adapter_config_for(config), dtype=frozen_dtype(config), device=device,
                                    lm_quantization=config.lm_quantization, trust_remote_code=config.trust_remote_code)
    except UserError:
        backbones = (config.clip_model, config.lm_model)
        if config.resume and (moved := moved_backbone_error(run_dir / RUN_CONFIG, backbones)):
            raise moved from None
        raise
    # Training reads prefix + caption and validation decodes as many tokens: both must fit the LM, checked
    # before the features and the first step rather than at the first validation, under the wrong flag's name.
    captioner.check_fits_context(config.max_caption_tokens, "--max-caption-tokens")
    return captioner, train_records, val_records, test_split


def total_optimizer_steps(max_steps: int, epochs: int, steps_per_epoch: int) -> int:
    """--max-steps where given (not 0), else --epochs of the training set."""
    return max_steps or epochs * steps_per_epoch


def set_up_run(config: TrainConfig, accelerator) -> Run:
    """Backbones, data, features, optimizer and schedule, prepared by Accelerate; on --resume the
    saved state loaded into them. Writes the run's config, prints the banner."""
    from accelerate.utils import set_seed

    run_dir = Path(config.output_dir) / config.run_name
    check_run_folder(run_dir, config)
    set_seed(config.seed)
    bad_samples: list[tuple[str, str]] = []
    with stopping_together(Processes.of(accelerator), SAME_FILES):  # one line, not one per process
        captioner, train_records, val_records, test_split = load_backbones_and_data(config, run_dir, accelerator.device,
                                                                                   bad_samples)
    if accelerator.num_processes > 1:  # before the features: other backbones are found before an hour of work
        check_processes_agree(loaded_facts(config, captioner), advice=SAME_FILES)
    # The main process fills the feature cache first, then the first process of each other machine (whose
    # cache may be a disk of its own); the rest then read it instead of encoding.
    def extract():
        return (make_pairs(captioner, train_records, config, "CLIP features (train)", bad_samples,
                           progress=accelerator.is_local_main_process),
                make_pairs(captioner, val_records, config, "CLIP features (val)", bad_samples,
                           progress=accelerator.is_local_main_process))

    (train_records, train_pairs), (val_records, val_pairs) = first_on_each_machine(accelerator, extract)
    if accelerator.num_processes > 1:  # outside first_on_each_machine: a collective inside it would deadlock
        bad_samples[:] = bad_samples_of_every_process(accelerator, bad_samples)
        unreadable = {image for image, _ in bad_samples}
        train_records, train_pairs = without_images(train_records, train_pairs, unreadable)
        val_records, val_pairs = without_images(val_records, val_pairs, unreadable)
    data_content = {"train": content_digest(train_records), "val": content_digest(val_records)}
    if accelerator.num_processes > 1:  # each machine may read a copy of its own
        check_processes_agree({"the training data (a digest of image ids, captions, file sizes)": data_content["train"],
                               "the validation data (a digest)": data_content["val"]}, advice=SAME_FILES)
    # Every process holds the same records and bad samples by now: one line, not one per process.
    if not train_pairs:
        raise said_alike_by()(f"none of the training images could be read (first: {bad_samples[0][1]})")
    if config.select_by == "cider_d" and len(val_records) == 1:  # before anything is written
        raise said_alike_by()("--select-by cider_d weighs words by how few validation images use them, and with 1 "
                        "validation image every weight is 0: give --val-limit 0 (all) or more validation images, "
                        "or --select-by rougeL or loss")

    train_loader = make_train_loader(train_pairs, config, captioner.config.pad_token_id, accelerator.num_processes,
                                     pin_memory=accelerator.device.type == "cuda")
    adapter = captioner.adapter
    if config.standardize_image_features:  # every process holds all training features: the same statistics
        adapter.set_feature_statistics(train_pairs.features)  # (a resumed run's saved ones replace them)
    optimizer = make_optimizer(captioner, config)
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / config.grad_accum_steps)
    total_steps = total_optimizer_steps(config.max_steps, config.epochs, steps_per_epoch)
    scheduler = lr_schedule(optimizer, config, total_steps, accelerator.num_processes)
    adapter, optimizer, train_loader, scheduler = accelerator.prepare(adapter, optimizer, train_loader, scheduler)
    captioner.adapter = adapter
    run = Run(config, accelerator, run_dir, captioner, adapter, optimizer, scheduler, train_loader, train_records,
              train_pairs, val_records, val_pairs, test_split, bad_samples, steps_per_epoch, total_steps,
              TrainerState())

    train_data = training_set_label(train_records, train_pairs)
    if config.resume:
        resume(run, train_data, data_content)
    run.state.settings, run.state.train_data = settings_digest(config), train_data
    run.state.data_content = data_content
    if config.dataset == "folder":  # for eval.py: a re-dealt folder's test split holds trained images
        unassigned = dealt_names(config.data_dir, config.seed)  # read once: COCO's caption file takes seconds
        run.state.split_deal = split_deal(config.data_dir, config.seed, unassigned)
        if config.folder_split == "hash":
            run.state.hash_deal = hash_deal_record(config.data_dir, config.seed, unassigned)
        run.state.train_images = sorted(record.image_id for record in train_records)
    run.last_validated = run.state.history[-1]["step"] if run.state.history else -1
    open_run_folder(run)
    trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    banner(accelerator, config, train_pairs, train_records, steps_per_epoch, total_steps, trainable)
    if not val_records:
        say(accelerator, "note: no validation images, so no validation scores; adapter.safetensors will be the "
                         "last step's adapter")
    elif config.select_by == "cider_d" and len(val_records) < CIDER_MIN_VAL_IMAGES:
        say(accelerator, f"note: CIDEr-D weighs words by how few of the {len(val_records)} validation images use "
                         "them, which says little with so few; --val-limit 0 (all) or --select-by rougeL is safer")
    return run


def open_run_folder(run: Run) -> None:
    """The main process cuts the log back to the checkpoint, the trackers start and the main process writes the
    run's config. A refusal on the way (a damaged log, a tracker that cannot start) stops every process with its
    line: the others had gone on to their first step, and there said another process had ended and to --resume."""
    run_dir, accelerator = run.run_dir, run.accelerator
    with stopping_together(Processes.of(accelerator)):
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            # First: a damaged log stops a resume before the config changes.
            truncate_log(run_dir / TRAIN_LOG, run.state.step)
        start_trackers(run)  # before the config is written: a tracker that cannot start leaves it as it was
        if accelerator.is_main_process:
            write_json(run_dir / RUN_CONFIG, dataclasses.asdict(run.config))


def start_trackers(run: Run) -> None:
    """--report-to: start Accelerate's trackers with the run's settings. A resumed run goes on in the
    same TensorBoard folder, where what was logged after its checkpoint is hidden (purge_step), as
    train_log.jsonl is cut back to the checkpoint, and in the same W&B and MLflow run."""
    if not run.accelerator.log_with:
        return
    tracking = run.run_dir / TRACKING_DIR
    if run.accelerator.is_main_process:
        not_a_link(tracking)  # the trackers' files go into the run folder, not where a link there points
    run.accelerator.project_configuration.logging_dir = str(tracking)
    settings = {name: value if isinstance(value, (bool, int, float, str)) else str(value)
                for name, value in dataclasses.asdict(run.config).items()}
    init_kwargs = {"wandb": {"name": run.config.run_name}, "mlflow": {"run_name": run.config.run_name}}
    if run.state.step:
        init_kwargs["tensorboard"] = {"purge_step": run.state.step + 1}
    try:
        wanted = {str(tracker) for tracker in run.accelerator.log_with}  # already checked: see start()
        has_hparams = tensorboard_has_hparams(tracking)  # before this start writes its events
        if "wandb" in wanted and run.accelerator.is_main_process:
            init_kwargs["wandb"].update(wandb_run(tracking))
        if "mlflow" in wanted and run.accelerator.is_main_process:
            init_kwargs["mlflow"].update(use_mlflow_store(run.accelerator, tracking))
        # The settings go to each tracker below, not through init_trackers(config=...), which would
        # add them again at every start: see store_settings.
        run.accelerator.init_trackers(TRACKING_PROJECT, init_kwargs=init_kwargs)
        for tracker in run.accelerator.trackers if run.accelerator.is_main_process else []:
            store_settings(tracker, settings, has_hparams)
            if tracker.name == "mlflow":
                keep_run_id(tracking / MLFLOW_RUN_ID, tracker.active_run.info.run_id)
    except Exception as error:  # a tracker's own start: a folder, a server, a login
        close_trackers(run.accelerator)
        if not run.config.resume and run.accelerator.is_main_process:  # so the same command can run again
            shutil.rmtree(tracking, ignore_errors=True)
            with contextlib.suppress(OSError):
                run.run_dir.rmdir()  # only if nothing else is in it
        raise UserError(f"--report-to {run.config.report_to}: a tracker could not start ({tracker_error(error)}); "
                        "fix that, or run without it (--report-to none; it may change on --resume)") from None


def tracker_error(error: Exception) -> str:
    """A tracker's start error in a few words: its first line, cut short, or what to do where that
    would be cut before saying it (MLflow 3.7+ refusing its folder store, the only one mlflow-skinny
    has without SQLAlchemy, names its opt-out after 400 characters)."""
    if "MLFLOW_ALLOW_FILE_STORE" in str(error):
        return ("MLflow refuses its folder store, mlruns/, the only one it has without SQLAlchemy: pip install "
                "sqlalchemy alembic, or set MLFLOW_ALLOW_FILE_STORE=true, or MLFLOW_TRACKING_URI to a server")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return f"{type(error).__name__}: {first}"


def tensorboard_has_hparams(tracking: Path) -> bool:
    """Whether an earlier start of this run already gave TensorBoard its settings (Accelerate writes
    them with an hparams.yml, in a sub-folder named by the time)."""
    return any((tracking / TRACKING_PROJECT).glob("*/hparams.yml"))


def store_settings(tracker, settings: dict, has_hparams: bool) -> None:
    """The run's settings, once per run where a tracker would keep each start's: TensorBoard's HParams
    tab shows one row per add_hparams call (a sub-run each), and MLflow refuses a setting logged again
    with another value (a resume, a longer --max-steps), so both keep the first start's settings. W&B
    updates its one config in place, so it takes each start's (a changed --max-steps shows there)."""
    if tracker.name == "tensorboard" and has_hparams:
        return
    if tracker.name == "mlflow" and tracker.active_run.data.params:  # a run it goes on in
        return
    tracker.store_init_configuration(settings)


def keep_run_id(id_file: Path, run_id: str) -> None:
    """Keep the tracker's run id for the next start, unless one is kept (a run id the user set for one
    start, MLFLOW_RUN_ID, is kept only where none was)."""
    if not id_file.is_file() or not id_file.read_text().strip():
        write_text(id_file, run_id + "\n")


def mlflow_store_uri(tracking: Path) -> str | None:
    """Where MLflow keeps this run: in the run's tracking/ folder, not in mlflow.db or mlruns/ wherever
    the command was run (MLflow's default); None where the user chose a store (MLFLOW_TRACKING_URI).
    The SQLite store where SQLAlchemy is installed (MLflow's own default; mlflow-skinny lacks it),
    else the folder store (which MLflow 3.7+ refuses unless MLFLOW_ALLOW_FILE_STORE=true)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    import importlib.util

    if importlib.util.find_spec("sqlalchemy") is not None:
        return f"sqlite:///{(tracking / 'mlflow.db').absolute()}"
    return (tracking / "mlruns").absolute().as_uri()


def mlflow_run(tracking: Path, store_uri: str | None) -> dict:
    """MLflowTracker's arguments for the one MLflow run of this run folder: the run id kept in tracking/
    at its first start, so that a resumed run goes on in it (MLFLOW_RUN_ID, where set, wins: Accelerate
    reads it), and, in a store of the run's own (`store_uri`), its artifacts in tracking/ too."""
    id_file = tracking / MLFLOW_RUN_ID
    stored = id_file.read_text().strip() if id_file.is_file() else ""
    kwargs = {"run_id": stored} if stored else {}
    if store_uri:
        kwargs["logging_dir"] = (tracking / "mlartifacts").absolute().as_uri()
    return kwargs


def use_mlflow_store(accelerator, tracking: Path) -> dict:
    """Point MLflow at this run's store (see mlflow_store_uri) for as long as the run's trackers are
    open; close_trackers puts back MLflow's default. The MLflowTracker arguments (mlflow_run)."""
    tracking.mkdir(parents=True, exist_ok=True)
    if uri := mlflow_store_uri(tracking):
        import mlflow

        mlflow.set_tracking_uri(uri)  # (it also sets MLFLOW_TRACKING_URI, for child processes)
        accelerator.mlflow_store_set = True
    return mlflow_run(tracking, uri)


def wandb_run(tracking: Path) -> dict:
    """wandb.init's arguments for the one W&B run of this run folder: its id, drawn at the first start
    and kept in tracking/, so that a resumed run goes on in it rather than starting another (W&B
    cannot rewind a run, so it keeps what it was first sent for the steps a resumed run repeats);
    W&B's own files in tracking/ too, not in a wandb/ folder wherever the command was run.
    WANDB_RUN_ID, where set, names the run of this start instead (and is kept if none was)."""
    tracking.mkdir(parents=True, exist_ok=True)
    id_file = tracking / WANDB_RUN_ID
    stored = id_file.read_text().strip() if id_file.is_file() else ""
    if not stored:
        stored = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)  # 8 characters, as W&B draws its own
        write_text(id_file, stored + "\n")  # whole or not at all: an empty id would start another W&B run
    return {"id": os.environ.get("WANDB_RUN_ID") or stored, "resume": "allow", "dir": str(tracking)}


def tracker_values(record: dict) -> dict:
    """A train_log.jsonl record as tracker scalars: its numbers, named "<type>/<name>" (val/rougeL,
    train/loss, nonfinite/grad_norm); the step, epoch and time are the trackers' own."""
    kind = {"eval": "val"}.get(record["type"], record["type"])
    return {f"{kind}/{name.removeprefix('val_')}": value for name, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and name not in ("step", "epoch", "time") and math.isfinite(value)}


def close_trackers(accelerator, failed: bool = False, interrupted: bool = False) -> None:
    """Flush and close the trackers however the run ends (an interrupted or failed run included);
    end_training() then finds none left to close again. A run that `failed` (an error, not a signal's
    orderly stop) is closed as failed where the tracker keeps a run's state: W&B's own exit hook would
    mark it so, but finds it already closed, and a plain finish() shows a crashed run as finished.
    MLflow shows a run a signal stopped (saved, to go on with --resume) as KILLED, its word for a run
    stopped from outside; resuming sets it running again, and the end FINISHED."""
    trackers, accelerator.trackers = accelerator.trackers, []
    for tracker in trackers:
        with contextlib.suppress(Exception):  # one that never started has nothing to close
            if failed and tracker.name == "wandb":
                tracker.run.finish(exit_code=1)
            elif (failed or interrupted) and tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED" if failed else "KILLED")
            else:
                tracker.finish()
    if getattr(accelerator, "mlflow_store_set", False):  # MLflow's default again, for a later run in this process
        import mlflow

        mlflow.set_tracking_uri(None)
        accelerator.mlflow_store_set = False


def resume(run: Run, train_data: str, data_content: dict) -> None:
    """Load the run's resume state into the prepared pieces, after checking it is this run's, and
    apply the flags that changed (a longer run, another peak learning rate)."""
    config, accelerator = run.config, run.accelerator
    changes = getattr(config, "resume_changes", {})
    # Every process reads the same state and refuses it alike (another process count, another run's state): one
    # line, not one per process.
    with stopping_together(Processes.of(accelerator)):
        state = run.state = load_resume_state(run.run_dir, accelerator, run.adapter, run.optimizer, run.scheduler,
                                              config)
        check_resume_belongs(state, run.run_dir, config, train_data, data_content)
        if {"epochs", "max_steps"} & set(changes) and run.total_steps <= state.step:
            raise UserError(f"{run.run_dir} is at step {state.step}, and with the new --epochs/--max-steps the run "
                            f"has {run.total_steps} steps: nothing to continue; give more steps than {state.step}")
    if {"learning_rate", "epochs", "max_steps"} & set(changes):
        # The optimizer comes back with the old schedule's last rate (0 where that schedule ended):
        # the first step must take the rate of the new schedule at this step, as every later one does.
        set_peak_learning_rate(run.optimizer, run.scheduler, config.learning_rate)
    state.finished = state.finished and state.step >= run.total_steps  # a finished run given more steps goes on
    note_other_weights_on_resume(run)
    adopt_newer_best(run)
    changed = "".join(f", --{name.replace('_', '-')} {new} (was {old})" for name, (old, new) in changes.items())
    say(accelerator, f"resuming {run.run_dir} at step {state.step} (epoch {state.epoch}, "
                     f"batch {state.batches_in_epoch}){changed}")
    if state.finished:  # it said "resuming at step N", printed the banner, and ended: what had it done?
        left = "only its test evaluation runs again" if config.final_eval else "nothing is left to do"
        say(accelerator, f"it had finished training at step {state.step}: {left}; to train on, give --resume a "
                         "larger --max-steps or --epochs")


def note_other_weights_on_resume(run: Run) -> None:
    """load_captioner's note where a backbone's weights files are not those the run trained with so far (its last
    export's record): the adapter would go on training against other weights."""
    trained = checkpoint_folder(run.run_dir / "last", quiet=True) / ADAPTER_CONFIG
    try:
        recorded = AdapterConfig.from_json(trained)
    except UserError:  # none yet (a run stopped before its first checkpoint cannot resume anyway), or damaged
        return
    loaded = run.captioner.config
    note_other_backbone_weights(recorded, trained, loaded.clip_model, loaded.lm_model, loaded.clip_revision,
                                loaded.lm_revision)


def adopt_newer_best(run: Run) -> None:
    """A run killed (SIGKILL, a power cut) after it saved a new best adapter but before its next
    checkpoint resumes from a state that knows only an older best (whose weights the newer ones
    replaced). On the schedule that adapter was trained on, the resumed run retraces its steps, so
    it stays the best unless a later validation beats it, rather than being overwritten by the first
    one that beats the older score. On another schedule (--max-steps, --epochs or --learning-rate
    changed since, on this resume or an earlier one) it came from steps this run no longer takes,
    like the log lines cut after the checkpoint: the first validation from here on replaces it."""
    kept = newer_saved_best(run)
    if kept is None:
        return
    step, score, schedule = kept
    now = (run.total_steps, run.config.learning_rate)
    if schedule != now:
        run.state.best_score = None
        say(run.accelerator, f"note: the best adapter in {run.run_dir} is from step {step}, after this checkpoint, "
                             f"of another schedule ({describe_schedule(schedule)}; now {describe_schedule(now)}); "
                             "the first validation from here on replaces it")
        return
    run.state.best_step, run.state.best_score = step, score
    say(run.accelerator, f"note: the best adapter in {run.run_dir} is from step {step} "
                         f"({SELECT_BY[run.config.select_by][0]} {score:.4f}), after this checkpoint; it stays the "
                         "best unless a later validation beats it")


def describe_schedule(schedule: tuple) -> str:
    steps, learning_rate = schedule
    return f"{steps} steps, peak learning rate {learning_rate}"


def newer_saved_best(run: Run) -> tuple[int, float, tuple] | None:
    """(step, score, schedule) of the best adapter at the run's top where it is from a step after the
    resume state's, else None; the same on every process. The main process reads it (first repairing
    a config torn from its weights) and tells the others."""
    from accelerate.utils import broadcast_object_list

    kept = [None]
    if run.accelerator.is_main_process:
        if repair_torn_export(run.run_dir):
            print(f"note: {run.run_dir / ADAPTER_CONFIG} was rewritten from the copy inside {ADAPTER_WEIGHTS}: "
                  "the run had stopped between saving the two")
        kept = [saved_best(run.run_dir / ADAPTER_CONFIG, SELECT_BY[run.config.select_by][0], run.steps_per_epoch)]
    if run.accelerator.num_processes > 1:
        kept = broadcast_object_list(kept)
    return kept[0] if kept[0] is not None and kept[0][0] > run.state.step else None


def saved_best(path: Path, key: str, steps_per_epoch: int) -> tuple[int, float, tuple] | None:
    """(step, score, schedule) of the best adapter an adapter_config.json records, the schedule being
    (total optimizer steps, peak learning rate) of the settings it was trained with; None where it
    records no best by this score (before the first validation, no validation images, another version)."""
    training = json_value(path, "training")
    try:
        step, score = training["best"]["step"], training["best"][key]
        settings = training["hyperparameters"]
        schedule = (total_optimizer_steps(settings["max_steps"], settings["epochs"], steps_per_epoch),
                    settings["learning_rate"])
    except (KeyError, TypeError):
        return None
    numbers = is_whole_number(step) and isinstance(score, (int, float)) and not isinstance(score, bool)
    return (step, float(score), schedule) if numbers and math.isfinite(score) else None


def train_steps(run: Run, stop: StopRequest, on_step=None) -> bool:
    """Optimizer steps from the state's position to the run's end, validating, saving and logging
    at their cadence. Returns False when a signal stopped it (a resumable checkpoint is then saved)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total_steps, initial=run.state.step, desc="training", unit="step",
               disable=not (run.config.progress and run.accelerator.is_main_process))
    try:
        return take_steps(run, stop, bar, on_step)
    finally:  # however the steps end: left open, the bar had an error's line (a process lost, a full disk) on its own
        bar.close()


def take_steps(run: Run, stop: StopRequest, bar, on_step=None) -> bool:
    """train_steps' loop, `bar` counting its steps."""
    config, accelerator, state = run.config, run.accelerator, run.state
    window = run.window = LossWindow(accelerator)
    window.restore(state.log_window)
    step_losses, step_tokens, step_pairs = [], [], []  # the micro-batches of the optimizer step being accumulated
    # Losses are back-propagated summed over tokens, in units of a full micro-batch's tokens: about the size
    # of a mean, which fp16's loss scale is tuned to (a plain sum would overflow it for its first steps).
    token_unit = config.batch_size * config.max_caption_tokens
    # Where one micro-batch of one process makes each step, its mean already is the step's mean over
    # caption tokens: it is back-propagated as it is (no rescaling, so no rounding: the same numbers as a
    # plain loop, and as every demo figure in the README).
    shared_step = accelerator.num_processes > 1 or config.grad_accum_steps > 1
    loss_function = TrainingLoss(run.captioner, compile=config.compile)
    run.captioner.train()
    first_step = state.step + 1  # of this start: it compiles and warms up (LossWindow.leave_out_warm_up)
    while state.step < run.total_steps and not state.finished:
        run.train_loader.set_epoch(state.epoch)
        batches = (accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
                   if state.batches_in_epoch else run.train_loader)
        for batch in batches:
            step_pairs.append(batch.pop("pair_index"))  # read back only for a skipped step: no sync here
            with accelerator.accumulate(run.adapter):
                with accelerator.autocast():
                    loss = loss_function(**batch)
                caption_positions = batch["labels"] != IGNORE_INDEX
                tokens = caption_positions.sum()
                # A shared step divides by the window's tokens (average_over_tokens, below).
                accelerator.backward(loss * tokens / token_unit if shared_step else loss)
                window.samples += caption_positions.any(dim=1).sum()
                step_losses.append(loss.detach())
                step_tokens.append(tokens)
                if accelerator.sync_gradients:
                    step_loss = (average_over_tokens(accelerator, run.adapter, step_losses, step_tokens,
                                                     config.grad_accum_steps * token_unit)
                                 if shared_step else loss.detach())
                    step_lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses; the schedule then moves on
                    outcome = optimizer_step(accelerator, run.adapter, run.optimizer, run.scheduler, step_losses,
                                             config.max_grad_norm)
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            record_step(run, outcome, step_loss, step_losses, step_pairs, window)
            step_losses, step_tokens, step_pairs = [], [], []
            log_now = state.step % config.log_every == 0 or state.step == run.total_steps
            if state.step == first_step and not log_now:  # this start's first step: a line with more steps times it
                window.leave_out_warm_up()
            if log_now and window.steps:
                logged = window.flush()
                bar.set_postfix(loss=f"{logged['loss']:.4f}", samples_per_s=f"{logged['samples_per_s']:,.0f}")
                run.log({"type": "train", "step": state.step, "epoch": state.epoch, "loss": logged["loss"],
                         "lr": step_lr, "samples": logged["samples"],
                         "samples_per_s": logged["samples_per_s"]})
            with window.paused():
                if config.eval_every and state.step % config.eval_every == 0:
                    run.validate()
                if config.save_every and state.step % config.save_every == 0:
                    run.save_checkpoint()
            if on_step is not None:
                on_step(state.step)
            if stop_requested(stop, accelerator) or state.step >= run.total_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        if stop.signal_name or stop.agreed:
            bar.close()
            run.save_checkpoint()
            line = (f"{stop.signal_name or 'signal'}: saved a checkpoint at step {state.step}; "
                    f"continue with {resume_command(config, accelerator)}")
            say(accelerator, line, every_machine=True)
            # A launcher whose processes stop so sums them up last; a machine the signal never reached showed
            # a link on how to record tracebacks there, not where the run stands.
            tell_the_launcher(line)
            return False
    return True


def record_step(run: Run, outcome: "StepOutcome", step_loss: torch.Tensor, step_losses: list, step_pairs: list,
                window: LossWindow) -> None:
    """Count an optimizer step that was applied (its loss: the window's mean over caption tokens), or log why
    it was not (with each micro-batch's loss)."""
    if outcome.applied:
        run.state.nonfinite_in_a_row = 0
        window.add_step(step_loss)
    elif outcome.nonfinite:
        run.skip_nonfinite_step([float(x) for x in step_losses], outcome.grad_norm, torch.cat(step_pairs).tolist())
    else:  # fp16's loss scaler skipped an overflowing step and lowered its scale
        run.log({"type": "overflow", "step": run.state.step, "epoch": run.state.epoch,
                 "loss_scale": outcome.loss_scale})


def finish(run: Run, stopped: bool, signal_name: str | None) -> dict:
    """The finished run's summary, after the test evaluation (main process, --final-eval) unless a
    signal came (to this process: `signal_name`, or to another) while the run was being finished."""
    config, state, run_dir = run.config, run.state, run.run_dir
    summary = {"run_dir": str(run_dir), "interrupted": stopped, "step": state.step,
               "best": {"by": SELECT_BY[config.select_by][0], "score": state.best_score, "step": state.best_step},
               "nonfinite_steps": state.nonfinite_steps, "bad_samples": len(run.bad_samples)}
    if stopped:
        say(run.accelerator, f"{signal_name or 'signal'}: training finished and is saved in {run_dir}; the test "
                             f"evaluation was skipped: python eval.py {run_dir}", every_machine=True)
        return summary
    say(run.accelerator, finished_line(run_dir, config, state))
    if config.final_eval:
        # The others wait for the main process's verdict: a refusal stops them with its line, where they had
        # said another process had ended and to --resume a run that had finished.
        with stopping_together(Processes.of(run.accelerator)):
            if run.accelerator.is_main_process:
                evaluate_on_test_split(run, summary)
    return summary


def finished_line(run_dir: Path, config: TrainConfig, state: TrainerState) -> str:
    """Where a finished run's adapters are and what comes next. A run named for the user (run-<date>-<time>,
    demo-2) ended with its last validation line, and with --no-final-eval nothing named its folder."""
    key = SELECT_BY[config.select_by][0]
    score = f", {key} {state.best_score:.4f}" if state.best_score is not None else ""
    best = (f"training finished: the best adapter (step {state.best_step}{score}) is in {run_dir}, the last in "
            f"{run_dir / 'last'}")
    if config.final_eval:
        return f"{best}; scoring it on the test split"
    return f"{best}; score it on the test split: python eval.py {run_dir}"


def evaluate_on_test_split(run: Run, summary: dict) -> None:
    """--final-eval: the test scores into `summary`. However it stops, the finished run is saved, and the line
    says so: the test split's own error (an unreadable image) read as if the run had been lost."""
    run_dir = run.run_dir
    try:
        summary["test"] = final_evaluation(run.captioner, run.accelerator.unwrap_model(run.adapter), run_dir,
                                           run.config, run.test_split, run.train_records, run.train_pairs.features)
        if run.accelerator.trackers:
            run.accelerator.log(tracker_values({"type": "test", **summary["test"]}), step=run.state.step)
    except KeyboardInterrupt:
        interrupt_handled()
        print(f"interrupted: training finished and is saved in {run_dir}; the test evaluation was not "
              f"completed: python eval.py {run_dir}", file=sys.stderr)
        summary["interrupted"] = True
    except UserError as error:
        raise UserError(f"training finished and is saved in {run_dir}, but the test evaluation stopped (python "
                        f"eval.py {run_dir} runs it again): {user_message(error)}") from None


def resume_command(config: TrainConfig, accelerator, *extra: str) -> str:
    """The command that continues this run, as its processes were launched."""
    return resume_command_for(config, accelerator.num_processes, accelerator.device.type == "cpu", *extra)


def launched_resume_command(config: TrainConfig, resume_dir: Path) -> str:
    """resume_command where no Accelerator was made (a stop during start-up): as many processes as saved
    `resume_dir` (not as this launch started: a resume launched with another count, stopped before its check,
    echoed that count back, which the state then refused), and the device Accelerator would have chosen."""
    saved_by = processes_that_saved(resume_dir)
    processes = saved_by if saved_by and saved_by % machines() == 0 else launched_processes()
    return resume_command_for(config, processes, launched_on_cpu())


def resume_command_for(config: TrainConfig, processes: int, cpu: bool, *extra: str) -> str:
    """The command that continues this run. A run saved by N processes resumes only with N (its state
    holds each one's RNG), so with several the hint names a launcher and the count, not python: on
    CPUs torchrun, as `accelerate launch --cpu` starts several processes only through mpirun."""
    args = shlex.join(["train.py", "--run-name", config.run_name, "--output-dir", str(config.output_dir),
                       "--resume", *extra])
    count = machines()
    if processes == 1:
        return f"python {args}"
    if count == 1:
        launcher = (f"ACCELERATE_USE_CPU=true torchrun --nproc_per_node {processes}" if cpu
                    else f"accelerate launch -q --num_processes {processes}")
        return (f"{launcher} {args} (or the launcher this run was started with, again with {processes} processes "
                "in all)")
    address, port = os.environ.get("MASTER_ADDR", "IP"), os.environ.get("MASTER_PORT", "PORT")
    launcher = (f"ACCELERATE_USE_CPU=true torchrun --nnodes {count} --nproc_per_node {processes // count} "
                f"--node_rank R --master_addr {address} --master_port {port}" if cpu
                else f"accelerate launch -q --multi_gpu --num_machines {count} --num_processes {processes} "
                     f"--machine_rank R --main_process_ip {address} --main_process_port {port}")
    return (f"{launcher} {args} on each of the {count} machines, R being its rank (0 to {count - 1}) (or another "
            f"launch of {processes} processes in all, on as many machines as you like)")


@dataclass
class StepOutcome:
    """What optimizer_step did. `nonfinite`: a skipped step that counts toward --max-nonfinite-steps."""
    applied: bool
    nonfinite: bool = False
    grad_norm: float | None = None
    loss_scale: float | None = None  # fp16's loss scale after the step, when a step was skipped under it


def optimizer_step(accelerator, adapter, optimizer, scheduler, window_losses: list,
                   max_grad_norm: float) -> StepOutcome:
    """Clip and apply one optimizer step unless a loss or the gradient is NaN/inf on any process.

    The check costs one host sync per optimizer step; all processes decide together, so they stay
    in step. The schedule advances either way, so step counts and learning rates stay aligned.

    Under fp16 a loss scaler (accelerator.scaler) multiplies the loss so that small gradients survive
    fp16, and an overflowing gradient is its normal way of finding the scale: its step skips the update
    and halves the scale. Such a step is reported but not counted as non-finite, unless the scale is
    already below 1, where fp16's range no longer explains it. A non-finite loss always counts.
    """
    grad_norm = accelerator.clip_grad_norm_(adapter.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    losses_finite = torch.isfinite(torch.stack(window_losses)).all()
    scaler = accelerator.scaler
    finite = losses_finite if scaler is not None else losses_finite & torch.isfinite(grad_norm)
    finite = bool(accelerator.reduce(finite.float(), "min").item() > 0)
    if scaler is None:
        outcome = StepOutcome(applied=True) if finite else StepOutcome(False, True, float(grad_norm))
        if finite:
            optimizer.step()
    elif finite:
        scale = scaler.get_scale()
        optimizer.step()  # accelerate's wrapper: the scaler's step (skipped on overflow), then its update
        skipped = accelerator.optimizer_step_was_skipped
        outcome = (StepOutcome(False, scale < 1, float(grad_norm), scaler.get_scale()) if skipped
                   else StepOutcome(applied=True))
    else:
        scaler.update()  # close the scaler's step (clipping unscaled the gradients), else the next one fails
        outcome = StepOutcome(False, True, float(grad_norm), scaler.get_scale())
    if outcome.applied:
        scheduler.step()
    else:
        advance_schedule_past_skipped_step(accelerator, scheduler)
    optimizer.zero_grad(set_to_none=True)
    return outcome


def advance_schedule_past_skipped_step(accelerator, scheduler) -> None:
    """Move the schedule on by a step that was not applied, as an applied one does. Accelerate's wrapper
    steps nothing after a step the fp16 scaler skipped, which left the schedule one step behind the run's
    count per overflow (a longer warm-up, a run ending above its final rate); so the schedule inside it is
    stepped, as many times as the wrapper would (once per process: see lr_schedule)."""
    schedule, steps = scheduler, 1  # a plain schedule (bench.py)
    if hasattr(scheduler, "scheduler"):  # Accelerate's wrapper
        schedule, steps = scheduler.scheduler, 1 if scheduler.split_batches else accelerator.num_processes
    with warnings.catch_warnings():  # torch takes a skip before the first applied step for a mistake
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for _ in range(steps):
            schedule.step()


def average_over_tokens(accelerator, adapter, step_losses: list, step_tokens: list, divided_by: float) -> torch.Tensor:
    """Scale the gradient of an accumulation window's token-summed losses (every micro-batch of every
    process, each back-propagated divided by `divided_by`) to that of their mean over all the window's
    caption tokens, and return that mean loss.

    A mean of micro-batch means would weigh each token by how short its micro-batch's captions are
    (and an epoch's short last window by how few micro-batches it has), so accumulating or adding
    processes would change the gradient. Accelerate divides each backward by the accumulation steps
    (counted in `divided_by`) and DDP averages over processes: the factor undoes both. One reduction
    per optimizer step."""
    totals = torch.stack([sum(loss.float() * tokens for loss, tokens in zip(step_losses, step_tokens)),
                          sum(step_tokens).float()])
    totals = accelerator.reduce(totals, "sum")
    tokens = totals[1].clamp(min=1)
    factor = accelerator.num_processes * divided_by / tokens
    for parameter in adapter.parameters():
        if parameter.grad is not None:
            parameter.grad.mul_(factor.to(parameter.grad.dtype))
    return totals[0] / tokens


def stop_requested(stop: StopRequest, accelerator) -> bool:
    """A signal seen by any process stops all of them at the same step (else a collective hangs)."""
    if accelerator.num_processes > 1:
        flag = torch.tensor(1.0 if stop.signal_name else 0.0, device=accelerator.device)
        stop.agreed = bool(accelerator.reduce(flag, "max").item() > 0)
        return stop.agreed
    return stop.signal_name is not None


def report_bad_samples(run_dir: Path, bad_samples: list, accelerator) -> None:
    if not bad_samples or not accelerator.is_main_process:
        return
    write_jsonl(run_dir / "bad_samples.jsonl", [{"image_id": i, "reason": why} for i, why in bad_samples])
    listed = "; ".join(f"{i} ({why})" for i, why in bad_samples[:5])
    more = f" and {len(bad_samples) - 5} more" if len(bad_samples) > 5 else ""
    count = f"{len(bad_samples)} image{'s' if len(bad_samples) != 1 else ''}"  # missing ones too, not only unreadable
    say(accelerator, f"skipped {count} that could not be read (missing or unreadable): {listed}{more} "
                     f"(all in {run_dir / 'bad_samples.jsonl'})")


def load_test_split(config: TrainConfig) -> tuple[list, list, bool]:
    """The final evaluation's test records, the missing files among them (left out under skip), and whether
    --test-limit drew the records from more (for skipped_images_note), loaded with the other splits so that missing
    test files stop a run before training, not after."""
    missing: list[tuple[str, str]] = []
    loaded = load_split(config, "test", 0, missing if config.on_bad_sample == "skip" else None)
    records = limit_records(loaded, config.test_limit, config.seed)
    return records, missing, len(records) < len(loaded)


def final_evaluation(captioner, adapter, run_dir: Path, config: TrainConfig, test_split: tuple[list, list, bool],
                     train_records, train_features) -> dict:
    """Score the best adapter on the test split, exactly as `python eval.py RUN` would (report included).

    The nearest-neighbour baseline reuses the training features extracted for training."""
    from eval import (describe_decoding, evaluate_captioner, feature_cache_settings, print_metrics, same_picture_note,
                      say_written, skipped_images_note, trained_on_note, what_was_scored, write_eval_outputs)

    captioner.adapter = adapter
    adapter.load_state_dict(load_adapter_state(run_dir / ADAPTER_WEIGHTS))
    let_4bit_weights_repack(captioner.lm)  # trained for the last time: captioned as eval.py captions it
    records, missing, sampled = test_split
    bad = list(missing)
    if config.on_bad_sample == "skip":
        records = readable_records(captioner, records, config, "test", bad)
    if not records:
        print("no test images: skipping the final evaluation")
        return {}
    decoding = greedy_decoding(config)
    results = evaluate_captioner(captioner, records, {describe_decoding(decoding): decoding}, train_records,
                                 config.eval_batch_size, config.num_workers, config.progress,
                                 train_features=train_features,
                                 feature_cache=feature_cache_settings(dataclasses.asdict(config)))
    result = results[describe_decoding(decoding)]
    result.metrics.update(what_was_scored(run_dir, config.dataset, "test", records, {"limit": config.test_limit}))
    # As eval.py says them: the test images left out, a test image that is a training file under another name (a
    # link), then byte copies.
    said = [skipped_images_note(bad, len(records), "test", sampled), trained_on_note(records, train_records),
            same_picture_note(result.copies, len(records))]
    notes = tuple(note for note in said if note)
    result.metrics["notes"] += notes
    written = write_eval_outputs(run_dir, result, records, run_dir)
    print_metrics(result.metrics, title=f"{run_dir} on the test split ({len(records)} images, greedy)", notes=notes)
    say_written(written)  # report.html's path: the demo's output ended at the table, the report unmentioned
    return {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}


def readable_records(captioner, records, config: TrainConfig, split: str, bad: list):
    """The records whose images can be read (their features are then cached), saying which were not
    (with those already in `bad`, e.g. missing files). A training run that skips them skips them here too, as
    `eval.py RUN` then does (eval.readable_split: its --on-bad-sample defaults to the run's)."""
    features = extract_features(captioner, records, config.feature_batch_size, config.num_workers,
                                progress=config.progress, desc=f"CLIP features ({split})",
                                cache_dir=config.feature_cache_dir or None, use_cache=config.feature_cache,
                                on_bad_sample="skip", bad_samples=bad)
    records = drop_unreadable(records, features)[0]
    if bad:
        listed = "; ".join(f"{image} ({why})" for image, why in bad[:3]) + (" ..." if len(bad) > 3 else "")
        # Not "the scores cover the other N": under --test-limit the missing ones were counted in the whole split and
        # the unreadable in the sample (the scores' note, eval.skipped_images_note, says which images they cover).
        images = f"{len(bad)} {split} image{'s' if len(bad) > 1 else ''}"  # "1 test image", not "1 test images"
        print(f"skipping {images} that could not be read (missing or unreadable): {listed}")
    return records


def main(argv=None, on_step=None) -> int:
    # Parsed first: `--help | head` (or a refused flag) is no training, and its note said that training went on.
    config = parse_config(argv)
    with keep_going_if_the_reader_leaves("training goes on; its log is the run folder's train_log.jsonl"):
        return train_from_config(config, on_step)


def saved_nothing(run_dir: Path) -> bool:
    """Whether a run's folder holds nothing but its lock: it stopped (or was killed) before it saved its config."""
    return all(path.name == RUN_LOCK for path in run_dir.iterdir())


def best_adapter_kept(run_dir: Path) -> str:
    """What a run stopped before its first checkpoint keeps where a validation saved the best adapter: "delete the
    folder" would throw away the only adapter it trained."""
    return (f"it keeps the best adapter its validation saved (score it: python eval.py {shlex.quote(str(run_dir))}); "
            "to train again, choose another --run-name")


def what_an_early_stop_left(config: TrainConfig) -> str:
    """What a run stopped before training began (or by a second signal) left, and the command to type next.
    --resume only where there is a checkpoint to continue from: a stop during start-up or feature extraction
    said to --resume, which then answered "nothing to resume"."""
    cache = "the feature cache keeps every part it finished"
    run_dir = Path(config.output_dir) / config.run_name if config.run_name else None
    if run_dir is None or not run_dir.is_dir() or saved_nothing(run_dir):
        return f"the run had saved nothing yet: run the same command again ({cache})"
    if (resume_dir := resume_state_dir(run_dir)) is None:
        if (run_dir / ADAPTER_WEIGHTS).is_file():
            # A second signal during the first save, after a validation had saved the best adapter: "delete that
            # folder" threw that adapter away.
            return (f"{run_dir} stopped before its first resumable checkpoint, so it cannot be resumed, but "
                    f"{best_adapter_kept(run_dir)} ({cache})")
        return (f"{run_dir} stopped before its first checkpoint, so it cannot be resumed: delete that folder and run "
                f"the same command again, or choose another --run-name ({cache})")
    # The whole command, as a stop during training gives it: flags alone resumed a run of several processes
    # with one (which its saved state refuses), and without --output-dir in the default folder.
    return (f"nothing saved is damaged: {run_dir} keeps its last complete checkpoint (continue it with "
            f"{launched_resume_command(config, resume_dir)}) and {cache}")


def train_from_config(config: TrainConfig, on_step) -> int:
    try:
        summary = train(config, on_step=on_step)
    except KeyboardInterrupt as interrupt:  # before training began, or a second signal: saves stay whole
        interrupt_handled()
        print(f"interrupted ({interrupt_name(interrupt)}); {what_an_early_stop_left(config)}", file=sys.stderr)
        return interrupted_exit_code(interrupt)
    except RuntimeError as error:
        # What it left, as after a signal: a bare "--resume" resumed in the default folder, or answered "nothing to
        # resume" where the other process had stopped before the first checkpoint.
        return another_process_ended(error, "run", lambda: f"; {what_an_early_stop_left(config)}")
    return 1 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
