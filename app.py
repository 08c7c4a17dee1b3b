"""A web page to try a trained captioner: drop, upload or paste an image, read its caption beside a
second run's or the nearest-neighbour baseline's, with decoding controls and the time each took.

    python app.py                                             # the newest finished demo run (trains one if none)
    python app.py --checkpoint saved_models/quick             # your run, beside the nearest-neighbour baseline
    python app.py --checkpoint saved_models/a saved_models/b  # two runs side by side
    python app.py --host 0.0.0.0 --port 7861                  # reachable from other machines

Serves a Gradio page on http://127.0.0.1:7860 (localhost only unless --host says otherwise). Each
run's model and its baseline load once, at start-up; caption requests wait in Gradio's queue and
run one at a time. Needs the `app` extra (`pip install -e ".[app]"`; `make setup` installs it)
and no network.
"""
from __future__ import annotations

import gc
import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly, not in a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # run_cli turns it back into KeyboardInterrupt
    gc.disable()  # until the runs have loaded: see utils.resume_gc_after_loading

import argparse
import atexit
import base64
import binascii
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from utils import (HelpFormatter, UserError, add_dtype_flag, for_terminal, nearest_existing, note,
                   resume_gc_after_loading, run_cli, run_folder_argument)

# Gradio reports usage and checks for new versions over the network unless told not to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT_PORT = 7860
DEFAULT_OUTPUT_DIR = "saved_models"  # --output-dir unless given: where train.py writes its runs
DEMO_RUN_NAME = re.compile(r"demo(-(\d+))?")
NOTHING = "nothing"
BASELINE_PREFIX = "nearest-neighbour baseline of "
STRATEGIES = ("greedy", "beam", "sample")
WARM_UP_SIZE = 64  # pixels of the blank image each model captions once at start-up
MAX_UPLOAD_MB = 100_000
# Gradio keeps every upload (any file, up to --max-upload-mb, with or without a caption request) in
# its cache until the disk is full, unless told to sweep it. An hour lets a visitor caption the same
# upload again with other settings; a sweep every tenth of that keeps a file at most 66 minutes.
UPLOADS_KEPT_S = 3600
UPLOAD_ROUTE = "/gradio_api/upload"  # Gradio counts its bytes itself, against max_file_size
# Gradio keeps a copy of the page's configuration for each session (about 70 kB here), for its last
# 10,000 by default, and each API call without a session is a new one: a loop of calls would grow
# the server by some 700 MB. The page keeps no state of its own, so an evicted session loses nothing.
SESSIONS_KEPT = 1000


# ----------------------------------------------------------------------------------------------
# Which runs: the user's, or the newest offline demo run
# ----------------------------------------------------------------------------------------------

def demo_folders(output_dir: Path) -> list[Path]:
    return [folder for folder in output_dir.iterdir() if DEMO_RUN_NAME.fullmatch(folder.name)] \
        if output_dir.is_dir() else []


def find_demo_run(output_dir: str | Path) -> Path | None:
    """The newest demo run (demo, demo-2, ... as train.py --demo names them) that has an adapter and is
    not still training: a run in training rewrites its best adapter as it goes, so its adapter is the
    newest, and the page served a few steps' worth of it as "the demo run"."""
    from model import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from train import run_being_trained

    runs = [folder for folder in demo_folders(Path(output_dir))
            if (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
            and not run_being_trained(folder) and step_stopped_at(folder) is None]
    if not runs:
        return None
    number = lambda folder: int(DEMO_RUN_NAME.fullmatch(folder.name).group(2) or 1)  # noqa: E731
    return max(runs, key=lambda folder: ((folder / ADAPTER_WEIGHTS).stat().st_mtime_ns, number(folder)))


def step_stopped_at(folder: Path) -> int | None:
    """The step a run stopped at before its last (Ctrl-C, a crash), as its resume state says; None for a
    finished run or one without a readable state. Its adapter is the best of the steps it got through:
    served as "the demo run", a page showed a half-trained model's captions as the demo's."""
    from eval import saved_trainer_state

    try:
        state = saved_trainer_state(folder)
    except (UserError, OSError):  # damaged or unreadable: not a run to resume, nor this check's to report
        return None
    if not isinstance(state, dict) or state.get("finished") is not False or not isinstance(state.get("step"), int):
        return None
    return state["step"]


def finish_stopped_demo_run(output_dir: str | Path, quiet: list[str]) -> bool:
    """Resume the newest demo run stopped part way, rather than start another from step 0; False where there
    is none, or where it cannot be resumed (its backbones rebuilt since, its data changed): a fresh one then."""
    import train

    stopped = [folder for folder in demo_folders(Path(output_dir)) if step_stopped_at(folder) is not None]
    if not stopped:
        return False
    folder = max(stopped, key=lambda folder: (train.resume_state_dir(folder) / train.TRAINER_STATE).stat().st_mtime)
    print(for_terminal(f"the demo run {folder} stopped at step {step_stopped_at(folder)}: finishing it with "
                       f"`python train.py --run-name {folder.name} --output-dir {output_dir} --resume` ..."),
          flush=True)
    try:
        code = train.main(["--run-name", folder.name, "--output-dir", str(output_dir), "--resume", *quiet])
    except UserError as error:
        print(for_terminal(f"it cannot be finished ({error}); training a new one instead"), flush=True)
        return False
    if code != 0:
        raise UserError("demo training was interrupted; run `python app.py` again to go on with it")
    return True


def ensure_demo_run(output_dir: str | Path, progress: bool = True) -> Path:
    """The newest demo run, after training one exactly as `python train.py --demo` does if there is none."""
    import train
    from demo import ensure_demo_assets

    folder = nearest_existing(Path(output_dir))
    if not folder.is_dir():  # before the demo is built or trained, not after (train.py would say it too, late)
        raise UserError(f"--output-dir {output_dir}: {folder} is a file, not a folder; name a folder for the demo run")
    ensure_demo_assets(progress=progress)  # the demo's backbones live in a cache that may have been cleared
    run = find_demo_run(output_dir)
    if run is not None:
        return run
    training = [folder for folder in demo_folders(Path(output_dir)) if train.run_being_trained(folder)]
    if training:  # rather than train a second one beside it, on the same cores
        raise UserError(f"the demo run {training[0]} is still being trained by another process; run `python app.py` "
                        "again when it has finished")
    quiet = [] if progress else ["--no-progress"]
    if not finish_stopped_demo_run(output_dir, quiet):
        print(f"no finished demo run under {output_dir}/: training one with `python train.py --demo` "
              "(about 3 minutes on 2 CPU cores) ...", flush=True)
        if train.main(["--demo", "--output-dir", str(output_dir), *quiet]) != 0:
            raise UserError("demo training was interrupted; run `python app.py` again to go on with it")
    run = find_demo_run(output_dir)
    if run is None:
        raise UserError(f"demo training finished but left no run with an adapter under {output_dir}")
    return run


# ----------------------------------------------------------------------------------------------
# Loaded once at start-up: the models, their baselines, the examples
# ----------------------------------------------------------------------------------------------

@dataclass
class Baseline:
    """The nearest-neighbour baseline of one run: CLIP features and captions of its training images."""

    features: torch.Tensor  # (N, F), as the run's captioner computes them
    captions: list[list[str]]

    def caption(self, image_features: torch.Tensor) -> str:
        from eval import nearest_neighbour_captions

        return nearest_neighbour_captions(self.features, self.captions, image_features)[0]


@dataclass
class LoadedRun:
    name: str
    path: Path
    captioner: object
    baseline: Baseline | None = None
    baseline_note: str = ""  # what the baseline is, or why there is none


# Gradio's queue already runs one caption at a time; the lock keeps the runs safe from any other caller
# too (a torch model's generate is not meant to run in two threads at once). One lock for all runs, not
# one each: torch's random generator is one per process, and a run sampling with a seed beside another
# run's caption drew from the other's seed, not giving inference.py's caption.
CAPTIONING = threading.Lock()


def build_baseline(captioner, checkpoint: Path, batch_size: int, progress: bool) -> tuple[Baseline | None, str]:
    """Features of the run's training images (through the on-disk feature cache, so a second start-up
    reads them back), or None and the reason when its training data is not at hand."""
    from dataset import FLICKR30K_PARQUET, drop_unreadable, extract_features
    from eval import (baseline_training_records, feature_cache_settings, find_run_config, find_run_dir,
                      saved_trainer_state, trained_image_ids)

    run = find_run_config(checkpoint)
    if not run.get("dataset"):
        return None, "no baseline: the run folder does not say which data it was trained on"
    try:
        records = baseline_training_records(run, run["dataset"], run.get("data_dir"),
                                            run.get("hub_data_files") or FLICKR30K_PARQUET,
                                            trained_image_ids(saved_trainer_state(find_run_dir(checkpoint)), run))
        bad_samples: list = []
        features = extract_features(captioner, records, batch_size, 0, progress,
                                    "CLIP features (training images, for the baseline)",
                                    on_bad_sample="skip", bad_samples=bad_samples, **feature_cache_settings(run))
    except UserError as error:
        return None, f"no baseline: its training images could not be read ({error})"
    records, features = drop_unreadable(records, features)
    if not records:
        return None, "no baseline: none of the run's training images could be read"
    note = f"the first caption of the most CLIP-similar of the run's {len(records):,} training images"
    if bad_samples:
        note += f" ({len(bad_samples):,} unreadable ones left out)"
    return Baseline(features, [record.captions for record in records]), note


def run_label(checkpoint: Path) -> str:
    """A checkpoint's name on the page: a run folder's own, one inside a run folder (last/, last.old/ where a crash
    left only that: model.checkpoint_folder, last-step-N/ that a later save kept: train.discard_replaced) with its
    run's too, as "last" alone names none."""
    inside_a_run = checkpoint.name in ("last", "last.old") or (checkpoint.parent / "run_config.json").is_file()
    return f"{checkpoint.parent.name}/{checkpoint.name}" if inside_a_run else checkpoint.name


def load_run(checkpoint: str | Path, device, with_baseline: bool = True, batch_size: int = 64, progress: bool = True,
             lm_quantization: str | None = None, dtype: torch.dtype | None = None) -> LoadedRun:
    """The run's captioner and baseline, loaded once, and one warm-up caption so that the first
    visitor's timing is not the first-call overhead. The LM is quantised as the run trained it
    unless `lm_quantization` (--lm-quantization) says otherwise; its weights in `dtype` (--dtype), else the
    device's default."""
    from PIL import Image

    from eval import default_dtype, loaded_as_the_run_names_note, run_lm_quantization
    from model import ADAPTER_CONFIG, load_captioner, not_a_run_folder

    checkpoint = Path(checkpoint)
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        raise UserError(not_a_run_folder(checkpoint))
    if announce := loaded_as_the_run_names_note(checkpoint):  # the page has no flags to name them
        note(announce, file=sys.stderr)
    started = time.perf_counter()
    # The LM as the run trained it (as eval.py and inference.py load it): an unquantised copy of a
    # run trained 8-bit on a small GPU may not fit there, and it captions differently.
    captioner = load_captioner(checkpoint, device=device, dtype=dtype or default_dtype(device),
                               lm_quantization=lm_quantization or run_lm_quantization(checkpoint))
    run = LoadedRun(run_label(checkpoint), checkpoint, captioner)
    if with_baseline:
        run.baseline, run.baseline_note = build_baseline(captioner, checkpoint, batch_size, progress)
    else:
        run.baseline_note = "no baseline (--no-baseline)"
    caption_with_run(run, Image.new("RGB", (WARM_UP_SIZE, WARM_UP_SIZE), (128, 128, 128)), decoding_config())
    print(for_terminal(f"loaded {run.name} from {checkpoint} in {time.perf_counter() - started:.1f} s; "
                       f"{run.baseline_note}"), flush=True)
    return run


def check_run_files(checkpoint: Path) -> None:
    """A run folder's own files (adapter config and weights) read, before any backbone loads: a damaged
    third run was reported only after the first two had loaded, minutes of waiting for a one-line error."""
    from model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, adapter_value_count, load_adapter_state,
                       not_a_run_folder)

    if not (checkpoint / ADAPTER_CONFIG).is_file():
        raise UserError(not_a_run_folder(checkpoint))
    config = AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG)
    load_adapter_state(checkpoint / ADAPTER_WEIGHTS, adapter_value_count(config), checkpoint / ADAPTER_CONFIG)


def distinct_checkpoints(checkpoints: list[Path]) -> list[Path]:
    """Each run folder once, in the order given. One folder named twice (saved_models/a and its
    absolute path, a symlink, a repeat) was loaded twice, a copy of both backbones each, and then
    offered twice under one name: the page compared the run with itself by default."""
    first: dict[Path, Path] = {}
    for checkpoint in checkpoints:
        folder = checkpoint.resolve()
        if folder in first:
            print(for_terminal(f"note: {checkpoint} is the run folder {first[folder]} again; serving it once"),
                  flush=True)
        else:
            first[folder] = checkpoint
    return list(first.values())


def unique_names(runs: list[LoadedRun]) -> None:
    """Runs named alike (two `last` folders, say) are told apart by their path, as is a run whose name
    is one of the page's other choices ("nothing", a baseline's): the choice is made by name, and
    such a run could not be picked, or would be picked in place of that choice."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1 or is_reserved_name(run.name):
            run.name = str(run.path)
            if is_reserved_name(run.name):  # a run folder named so, given as a relative path
                run.name = str(Path(run.path).absolute())


def is_reserved_name(name: str) -> bool:
    return name == NOTHING or name.startswith(BASELINE_PREFIX)


def example_images(checkpoint: Path, count: int) -> list[tuple[str, str]]:
    """(path, label): the first test images of the run's own data, then real photos that install
    with the dependencies (matplotlib's Grace Hopper; scikit-image's astronaut and cat if present)."""
    from dataset import FLICKR30K_PARQUET, load_records
    from eval import find_run_config, folder_split_of

    examples = []
    run = find_run_config(checkpoint)
    if run.get("dataset") and count > 0:
        try:
            # skip: one missing test file took every test image off the page (examples are an extra)
            records = load_records(run["dataset"], "test", run.get("data_dir"),
                                   run.get("hub_data_files") or FLICKR30K_PARQUET, run.get("seed", 0),
                                   on_bad_sample="skip", bad_samples=[], folder_split=folder_split_of(run))[:count]
        except UserError:
            records = []
        folder = None
        for record in records:
            if record.path is None:  # a Hub row: give the page a file of it
                try:
                    image = record.open()
                except UserError:  # examples are an extra: one damaged row must not keep the page from starting
                    continue
                folder = folder or hub_examples_folder()
                path = folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', record.image_id)}.png"
                image.save(path)
            else:
                path = record.path
            examples.append((str(path), f"test image {Path(record.image_id).stem}"))
    for path, label in real_photos():
        examples.append((path, label))
    return examples


def hub_examples_folder() -> Path:
    """A temp folder for the page's Hub example files, removed when the server exits: every start
    otherwise left one behind in /tmp."""
    folder = Path(tempfile.mkdtemp(prefix="captioner-app-examples-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def real_photos() -> list[tuple[str, str]]:
    import importlib.util

    photos = []
    matplotlib = importlib.util.find_spec("matplotlib")
    if matplotlib and matplotlib.origin:
        photos.append((Path(matplotlib.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg",
                       "photo: Grace Hopper"))
    skimage = importlib.util.find_spec("skimage")  # not a dependency; its bundled photos if installed
    if skimage and skimage.origin:
        data = Path(skimage.origin).parent / "data"
        photos += [(data / "astronaut.png", "photo: astronaut"), (data / "chelsea.png", "photo: cat")]
    return [(str(path), label) for path, label in photos if path.is_file()]


# ----------------------------------------------------------------------------------------------
# One request
# ----------------------------------------------------------------------------------------------

def shown_over(amount: float, limit: float) -> float:
    """`amount`, which is over `limit`, as a refusal shows it: to a tenth, and up where the nearest tenth is not
    over the limit. Rounded to whole units, a 1.1 MB file was "1 MB", refused by a limit of 1 MB."""
    shown = round(amount, 1)
    return shown if shown > limit else math.ceil(amount * 10) / 10


def check_upload_size(size: int | float, max_upload_mb: float) -> None:
    megabytes = size / 2**20
    if megabytes > max_upload_mb:
        raise UserError(f"That file is {shown_over(megabytes, max_upload_mb):,g} MB; this page takes images up to "
                        f"{max_upload_mb:g} MB.")


@contextlib.contextmanager
def image_file(image: str | None, max_upload_mb: float):
    """The path of the request's image while the request runs: an upload's own path (Gradio keeps
    uploads), or an image pasted inline as a data: URL in a temporary file that is deleted afterwards.
    A pasted image's size is read from the URL's length, so one over the limit is never decoded or
    written: each one used to stay in Gradio's cache for good, the refused ones too."""
    if not (image and image.startswith("data:")):
        yield image
        return
    encoded = image.split(",", 1)[1] if "," in image else ""
    check_upload_size(len(encoded) * 3 / 4, max_upload_mb)  # base64: 4 characters for 3 bytes
    try:
        data = base64.b64decode(encoded, validate=False)
    except binascii.Error:
        data = b""  # then open_upload says it is no image
    with tempfile.TemporaryDirectory(prefix="captioner-app-pasted-") as folder:
        path = Path(folder) / "pasted.img"
        path.write_bytes(data)
        yield str(path)


def in_megapixels(amount: float) -> str:
    """"1 megapixel", "0.5 megapixels", "40 megapixels": --max-megapixels 1 refused images "up to 1 megapixels"."""
    return f"{amount:,g} megapixel{'' if amount == 1 else 's'}"


def open_upload(path, max_megapixels: float, max_upload_mb: float):
    """The uploaded file as an RGB PIL image, or a UserError a person can act on. The pixel count is
    read from the header before anything is decoded, so an image bomb costs nothing."""
    from PIL import Image

    from dataset import MAX_ASPECT_RATIO, open_image

    if not path:
        raise UserError("Choose an image first: drop one on the box, upload or paste one, or click an example.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The upload did not arrive, or was deleted (uploads are kept {UPLOADS_KEPT_S // 60} minutes); "
                        "please upload it again.")
    check_upload_size(path.stat().st_size, max_upload_mb)
    unreadable = ("That file could not be read as an image: it may be damaged or cut short, or not be an image at "
                  "all. Try a JPEG, PNG, WebP, GIF, BMP or TIFF file.")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL refuses to even open the very largest
        raise UserError(f"That image is far too large; this page takes images up to {in_megapixels(max_megapixels)}.") \
            from None
    except Exception:  # PIL raises many kinds for files that are not images (UnidentifiedImageError, ...)
        raise UserError(unreadable) from None
    if width * height > max_megapixels * 1e6:  # shown as check_upload_size does: 40.4 was "40", over a limit of 40
        megapixels = shown_over(width * height / 1e6, max_megapixels)
        raise UserError(f"That image is {width:,} x {height:,} pixels ({in_megapixels(megapixels)}); this page takes "
                        f"images up to {in_megapixels(max_megapixels)}. Please make it smaller.")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):  # open_image refuses it too, unexplained
        raise UserError(f"That image is {width:,} x {height:,} pixels, over {MAX_ASPECT_RATIO} times as long as it is "
                        "wide; please crop it.")
    try:
        return open_image(path)  # the same opener as inference.py, so the page captions the same pixels
    except Exception:  # UserError from a truncated file, or anything PIL raises while decoding
        raise UserError(unreadable) from None


# What the timing line adds when a run's first token ended the caption (an adapter trained a few
# steps does this): an empty box alone looks as if the page never answered.
MAX_NEW_TOKENS_SLIDER = 100  # the page's longest caption: a visitor's request costs at most this many LM steps
EMPTY_CAPTION_NOTE = " · the model wrote an empty caption: its first token ended it"


def setting(value, label: str, whole: bool = False) -> float:
    """A number from the page's controls. Gradio checks a slider's range but lets NaN through (only a
    hand-written API call sends one), which int() turned into an error that blamed the image. A `whole`
    one (beam width, max new tokens, seed) must be a whole number: Gradio checks no slider's step, and
    int() made a beam width of 2.5 two beams, a seed of 2.5 seed 2, without a word."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{label} must be a number, not {value!r:.40}.")  # cut: a request may send megabytes
    if whole and value != int(value):
        raise UserError(f"{label} must be a whole number, not {value:g}.")
    return value


def decoding_config(strategy: str = "greedy", num_beams: float = 3, temperature: float = 0.7, top_p: float = 0.9,
                    max_new_tokens: float = 30):
    from model import DecodingConfig

    if strategy not in STRATEGIES:  # Gradio's radio lets null through; DecodingConfig's words are for the CLI
        raise UserError(f"Pick a decoding strategy ({', '.join(STRATEGIES)}).")
    return DecodingConfig(strategy=strategy, num_beams=int(setting(num_beams, "The beam width", whole=True)),
                          temperature=float(setting(temperature, "The temperature")),
                          top_p=float(setting(top_p, "Top-p")),
                          max_new_tokens=int(setting(max_new_tokens, "Max new tokens", whole=True)))


def caption_with_run(run: LoadedRun, image, decoding, seed: int = 0) -> tuple[str, float]:
    """(caption, milliseconds from the PIL image to the text). Seeded like inference.py --seed, so
    sampling gives the caption inference.py gives this image captioned on its own (in a batch, the images
    sampled beside it change it)."""
    with CAPTIONING:
        started = time.perf_counter()
        torch.manual_seed(seed)
        caption = run.captioner.caption_images([image], decoding)[0]
        return caption, (time.perf_counter() - started) * 1000


def caption_with_baseline(run: LoadedRun, image) -> tuple[str, float]:
    with CAPTIONING:
        started = time.perf_counter()
        with torch.no_grad():
            features = run.captioner.image_features(run.captioner.preprocess([image]))  # (1, F)
        caption = run.baseline.caption(features)
        return caption, (time.perf_counter() - started) * 1000


def describe(decoding) -> str:
    from eval import describe_decoding

    tokens = "token" if decoding.max_new_tokens == 1 else "tokens"  # not "at most 1 new tokens"
    return f"{describe_decoding(decoding)}, at most {decoding.max_new_tokens} new {tokens}"


@dataclass
class Page:
    """What the page offers: its runs, their baselines, and the limits on uploads."""

    runs: list[LoadedRun]
    max_megapixels: float = 40
    max_upload_mb: float = 50

    def __post_init__(self):
        self.by_name = {run.name: run for run in self.runs}
        self.baselines = {BASELINE_PREFIX + run.name: run for run in self.runs if run.baseline is not None}

    @property
    def caption_tokens(self) -> int:
        """Where the page's "Max new tokens" starts: as long as the longest captions its runs trained on, as eval.py
        and inference.py decode a run by default (at 30, a run trained on 40-token captions had its longer ones cut
        on the page only), within the slider's range."""
        trained = max(run.captioner.config.max_caption_tokens for run in self.runs)
        return max(1, min(MAX_NEW_TOKENS_SLIDER, trained))

    @property
    def compare_choices(self) -> list[str]:
        return [*self.baselines, *self.by_name, NOTHING]

    @property
    def default_compare(self) -> str:
        if len(self.runs) > 1:
            return self.runs[1].name
        return next(iter(self.baselines), NOTHING)

    def caption_one(self, choice: str, image, decoding, seed: int) -> tuple[str, str]:
        """(caption, timing line) for one side of the page."""
        if choice in self.baselines:
            run = self.baselines[choice]
            caption, ms = caption_with_baseline(run, image)
            return caption, f"**{ms:,.0f} ms** · {plain(run.baseline_note)}"  # it may name folders, as in intro
        if choice in self.by_name:
            caption, ms = caption_with_run(self.by_name[choice], image, decoding, seed)
            return caption, f"**{ms:,.0f} ms** · {describe(decoding)}" + ("" if caption else EMPTY_CAPTION_NOTE)
        return "", ""

    def caption(self, image_path, left: str, right: str, strategy: str, num_beams, temperature, top_p,
                max_new_tokens, seed):
        """The Caption button: (left caption, left time, right caption, right time, message).
        Whatever goes wrong with one request becomes a message on the page; the server carries on."""
        import gradio as gr

        try:
            if left not in self.by_name:
                raise UserError(f"Pick a run to caption with ({', '.join(self.by_name)}).")
            with image_file(image_path, self.max_upload_mb) as path:
                image = open_upload(path, self.max_megapixels, self.max_upload_mb)  # decoded here: the file may go
            decoding = decoding_config(strategy, num_beams, temperature, top_p, max_new_tokens)
            from eval import SEED_RANGE

            seed = int(setting(seed or 0, "The seed", whole=True))
            if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                raise UserError(f"The seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}.")
            left_caption, left_time = self.caption_one(left, image, decoding, seed)
            right_caption, right_time = self.caption_one(right, image, decoding, seed)
        except UserError as error:
            gr.Warning(str(error))
            return "", "", "", "", f"⚠️ {error}"
        except Exception as error:  # noqa: BLE001 - one bad request must not take the page down
            traceback.print_exc()
            message = f"Something went wrong captioning that image ({type(error).__name__}); please try another."
            gr.Warning(message)
            return "", "", "", "", f"⚠️ {message}"
        return (gr.Textbox(value=left_caption, label=f"caption: {left}"), left_time,
                gr.Textbox(value=right_caption, label=f"compared with: {right}"), right_time, "")


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

# What an API call may send as the image: what the page's own image box sends.
IMAGE_FORMS = ('a file uploaded to this page ({"path": ...} as POST /gradio_api/upload returns it) or an image '
               'pasted inline ({"url": "data:image/png;base64,..."})')
NOT_UPLOADED = f"The image must be {IMAGE_FORMS}: files already on the server are not read."
NO_URLS = f"This page does not fetch images from URLs; send {IMAGE_FORMS}."
UNREADABLE_REQUEST = "That request's values could not be read; the page's \"Use via API\" link shows what it takes."
REFUSAL_SHOWN = 300  # characters of a refusal kept: Gradio's own messages quote the value sent, at any size


def image_path_unopened(payload, uploads: str | Path) -> str | None:
    """What the image box hands the handler, nothing decoded yet: the uploaded file's path, or an
    image pasted inline as its data: URL (image_file writes it to a file for the request). A path
    must be in Gradio's upload folder `uploads`: Gradio checks that only for a payload that says it
    is a file ("meta"), and without one any file on the server was opened, its size and whether it
    exists told to the caller (and an image there captioned)."""
    import gradio as gr

    if payload is None:
        return None
    if payload.path:
        try:
            uploaded = Path(payload.path).resolve().is_relative_to(Path(uploads).resolve())
        except (OSError, ValueError):  # a NUL byte, a loop of links
            uploaded = False
        if not uploaded:
            raise gr.Error(NOT_UPLOADED)
        return str(payload.path)
    if payload.url and payload.url.startswith("data:"):
        return payload.url
    if payload.url:  # an http(s) or file: URL was taken for no image at all: "Choose an image first"
        raise gr.Error(NO_URLS)
    return None


def check_image_payload(payload) -> None:
    """The image's JSON, before Gradio reads it: Gradio fetched an http(s) URL given as the path (at any
    size, for anyone who asks), and answered a path, a number or a list with an empty error."""
    if payload is None:
        return
    if not isinstance(payload, dict) or not isinstance(payload.get("meta", {}), dict) \
            or not all(isinstance(payload.get(key), (str, type(None))) for key in ("path", "url")):
        raise UserError(f"The image must be {IMAGE_FORMS}, not {payload!r:.40}.")
    if re.match(r"https?://", payload.get("path") or "", re.IGNORECASE):
        raise UserError(NO_URLS)


def check_request(block_fn, inputs: list) -> None:
    """What Gradio lets through or answers with an empty error: too few values (a traceback in the log),
    too many (the extra ones ignored: a request that sent its values in another order was half read),
    and an image in a form the page does not take."""
    import gradio as gr

    if len(inputs) != len(block_fn.inputs):
        labels = ", ".join(str(getattr(block, "label", None) or type(block).__name__) for block in block_fn.inputs)
        raise UserError(f"This takes {len(block_fn.inputs)} values, in this order: {labels}; the request sent "
                        f"{len(inputs)}.")
    for block, value in zip(block_fn.inputs, inputs):
        if isinstance(block, gr.Image):
            check_image_payload(value)


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= REFUSAL_SHOWN else text[:REFUSAL_SHOWN - 3] + "..."


def refusal(error: Exception) -> str | None:
    """The one line a request that the page cannot take is answered with; None for an error it does not
    expect, whose words are not for the caller (Gradio's may name the server's files)."""
    from gradio.exceptions import Error, InvalidPathError

    if isinstance(error, Error):
        return one_line(error.message)
    if isinstance(error, UserError):
        return one_line(str(error))
    if isinstance(error, InvalidPathError):  # a payload that says it is a file, not in the upload folder
        return NOT_UPLOADED
    return None


def answer_bad_requests_in_one_line(app) -> None:
    """Every request whose values the page cannot take is answered with one line saying why, and logged
    in one line. Gradio answered most with {"error": null} and a traceback in the server log (a value
    missing, an image given as a server path or a number), and even its clear answers (a slider out of
    range) came with a traceback. Replaced on this one instance, as image_box does."""
    import gradio as gr

    from utils import first_line

    gradio_preprocess_data = app.preprocess_data

    async def preprocess_data(block_fn, inputs, *args, **kwargs):
        try:
            check_request(block_fn, inputs)
            return await gradio_preprocess_data(block_fn, inputs, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever it is, it is this request's, not the server's
            message = refusal(error)
            logged = message or one_line(f"{type(error).__name__}: {first_line(error)}")
            # Escaped: Gradio's words quote what a stranger sent, an ESC[2J for the operator's terminal among it.
            print(for_terminal(f"refused a request to {block_fn.api_name or block_fn.name}: {logged}"), flush=True)
            raise gr.Error(message or UNREADABLE_REQUEST, print_exception=False) from None

    app.preprocess_data = preprocess_data


def forget_pasted_images(app) -> None:
    """Gradio keeps each request's input values in its session (for deep links, which this page does not
    offer), an image pasted inline as its whole data: URL, and every API call without a session is a new
    session: 1,200 requests, a quarter of them pasted images of up to 9 MB, grew the server by 550 MB
    (up to SESSIONS_KEPT of them kept, so a stranger's loop of 50 MB images could have added 65 GB). The
    URL is dropped from the session once the values are read. Replaced on this one instance, as
    answer_bad_requests_in_one_line does."""
    gradio_preprocess_data = app.preprocess_data

    async def preprocess_data(block_fn, inputs, state=None, *args, **kwargs):
        try:
            return await gradio_preprocess_data(block_fn, inputs, state, *args, **kwargs)
        finally:  # a refused request's value was stored too
            for config in getattr(state, "config_values", {}).values():
                props = (config or {}).get("props") or {}
                if is_pasted_image(props.get("value")):
                    props["value"] = None

    app.preprocess_data = preprocess_data


class UploadSet(set):
    """Gradio's set of the uploads its sweep (delete_cache) deletes, made safe to sweep: iterated over a copy
    of itself, and each deleted upload's folder removed with it."""

    def __iter__(self):
        # Whole, under the GIL: the sweep runs in a worker thread while uploads go on adding to the set, and
        # "Set changed size during iteration" ended it for good (every later upload stayed on the disk until
        # the server stopped: a 60 s flood of 9,012 uploads, all still there past their time). The sweep at
        # the stop ended the same way, leaving files behind.
        return iter(set.copy(self))

    def __isub__(self, deleted):
        # Gradio keeps each upload in a folder named by its bytes' hash and deleted the file alone: one empty
        # folder (4 kB) per distinct upload piled up for good, across restarts (1,630 after 1,760 uploads).
        for folder in {os.path.dirname(path) for path in deleted}:
            with contextlib.suppress(OSError):  # not empty: the same bytes uploaded under another name
                os.rmdir(folder)
        return set.__isub__(self, deleted)


def sweep_uploads_safely(app) -> None:
    if not isinstance(getattr(app, "upload_file_set", None), set) or not hasattr(app, "temp_file_sets"):
        return  # another Gradio's sweep: left as it comes (the page works without this)
    uploads = UploadSet(app.upload_file_set)
    app.temp_file_sets[:] = [uploads if files is app.upload_file_set else files for files in app.temp_file_sets]
    app.upload_file_set = uploads


def is_pasted_image(value) -> bool:
    return isinstance(value, dict) and str(value.get("url") or "").startswith("data:")


def numbers_only(control, label: str, whole: bool = False):
    """`control` (a slider or number box) with a message for a value that is not a finite number, not
    a whole one where `whole`, or out of the slider's range. Only a hand-written API call sends one ("3",
    null, a list, 2.5, 1000): Gradio's own check failed on it in a TypeError, which the visitor saw as a bare
    "Error", the seed box rounded 2.5 to 2, and a value out of range was "Value 0 is less than minimum value
    0.05", naming no setting. Replaced on the instance, as image_box does."""
    import gradio as gr

    gradio_preprocess = control.preprocess
    low, high = getattr(control, "minimum", None), getattr(control, "maximum", None)

    def preprocess(payload):
        if payload is None and isinstance(control, gr.Number):
            return None  # an emptied number box: the handler reads it as 0
        try:
            setting(payload, label, whole)
        except UserError as error:
            raise gr.Error(str(error)) from None
        if low is not None and high is not None and not low <= payload <= high:
            raise gr.Error(f"{label} must be from {low:g} to {high:g}, not {payload:g}.")
        return gradio_preprocess(payload)

    control.preprocess = preprocess
    return control


def image_box(**kwargs):
    """A gr.Image whose handler gets the file's path unopened. gr.Image's own preprocessing decodes
    with PIL first, so a file that is not an image (or an image bomb) would fail there with a bare
    "Error" instead of reaching open_upload and its message. The method is replaced on this one
    instance rather than in a subclass because Gradio writes a .pyi stub beside the source file of
    every Component subclass."""
    import gradio as gr

    box = gr.Image(type="filepath", image_mode=None, **kwargs)
    box.preprocess = lambda payload: image_path_unopened(payload, box.GRADIO_CACHE)
    return box


def plain(text: str) -> str:
    """Text shown as it is in the page's Markdown: a run's name is a folder's name, and one with `<`, `*`
    or `_` in it was read as HTML (which the page sanitises away) or as emphasis, not shown as named."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", text)  # CommonMark: any ASCII punctuation, backslashed


def code(text: str) -> str:
    """Text as a Markdown code span, fenced by more backticks than it holds in a row."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def intro(page: Page, examples: list[tuple[str, str]]) -> str:
    lines = ["# Captioner: try a trained run",
             "Drop, upload or paste an image (or click an example), choose what to compare, and press **Caption**. "
             "Times are measured on this server, from the decoded image to the text."]
    for run in page.runs:
        config = run.captioner.config
        lines.append(f"- **{plain(run.name)}** ({code(str(run.path))}): {config.adapter_kind} adapter, "
                     f"{config.prefix_length} prefix tokens; CLIP {code(str(config.clip_model))}, "
                     f"LM {code(str(config.lm_model))}. Baseline: {plain(run.baseline_note)}.")
    if any(label.startswith("photo") for _, label in examples):
        lines.append("\nThe photos among the examples are real photographs. A run trained on the offline demo's "
                     "synthetic coloured shapes has never seen one and will describe them as shapes: that is "
                     "expected of the tiny demo model, not a bug.")
    return "\n".join(lines)


def build_app(page: Page, examples: list[tuple[str, str]], keep_uploads_s: float = UPLOADS_KEPT_S):
    import gradio as gr

    sweep = (max(1, int(keep_uploads_s / 10)), max(1, int(keep_uploads_s)))  # (every, older than) in seconds
    with gr.Blocks(title="Captioner", delete_cache=sweep) as app:  # the examples are kept
        gr.Markdown(intro(page, examples), elem_id="intro")
        with gr.Row():
            with gr.Column(scale=1):
                image = image_box(label="Image", sources=["upload", "clipboard"], height=320, elem_id="image")
                if examples:
                    gr.Examples([[path] for path, _ in examples], inputs=[image],
                                example_labels=[label for _, label in examples], label="Examples",
                                examples_per_page=len(examples))
            with gr.Column(scale=1):
                with gr.Row():
                    left = gr.Dropdown(list(page.by_name), value=page.runs[0].name, label="Caption with",
                                       elem_id="left-choice")
                    right = gr.Dropdown(page.compare_choices, value=page.default_compare, label="Compare with",
                                        elem_id="right-choice")
                with gr.Accordion("Decoding", open=True):
                    strategy = gr.Radio(list(STRATEGIES), value="greedy", label="Strategy", elem_id="strategy",
                                        info="the nearest-neighbour baseline does not decode: it retrieves")
                    num_beams = numbers_only(gr.Slider(2, 10, value=3, step=1, label="Beam width", visible=False),
                                             "The beam width", whole=True)
                    temperature = numbers_only(gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature",
                                                         visible=False), "The temperature")
                    top_p = numbers_only(gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", visible=False),
                                         "Top-p")
                    seed = numbers_only(gr.Number(0, precision=0, label="Seed (sampling)", visible=False), "The seed",
                                        whole=True)
                    max_new_tokens = numbers_only(gr.Slider(1, MAX_NEW_TOKENS_SLIDER, value=page.caption_tokens, step=1,
                                                            label="Max new tokens"), "Max new tokens", whole=True)
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                message = gr.Markdown("", elem_id="message")
                left_caption = gr.Textbox(label=f"caption: {page.runs[0].name}", interactive=False,
                                          elem_id="left-caption", lines=2)
                left_time = gr.Markdown("", elem_id="left-time")
                right_caption = gr.Textbox(label=f"compared with: {page.default_compare}", interactive=False,
                                           elem_id="right-caption", lines=2)
                right_time = gr.Markdown("", elem_id="right-time")

        def show_controls(chosen: str):
            beam, sample = chosen == "beam", chosen == "sample"
            return (gr.Slider(visible=beam), gr.Slider(visible=sample), gr.Slider(visible=sample),
                    gr.Number(visible=sample))

        # A new image clears the last one's captions and message, in the browser (no round trip), so
        # nothing on the page describes a picture that is no longer there.
        image.change(None, None, [left_caption, left_time, right_caption, right_time, message],
                     js="() => ['', '', '', '', '']")
        strategy.change(show_controls, strategy, [num_beams, temperature, top_p, seed], queue=False,
                        api_visibility="private")
        # One caption at a time: more requests wait in the queue (the page shows their place in it).
        button.click(page.caption, [image, left, right, strategy, num_beams, temperature, top_p, max_new_tokens, seed],
                     [left_caption, left_time, right_caption, right_time, message],
                     api_name="caption", concurrency_limit=1)
    app.queue(max_size=64)
    answer_bad_requests_in_one_line(app)
    forget_pasted_images(app)
    sweep_uploads_safely(app)
    return app


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 instead of read. Gradio
    limits only its upload route; the JSON of any other request (an image pasted inline as a data:
    URL) was read into memory whole, at any size, before the page could check it."""

    def __init__(self, app, limit: int, max_upload_mb: float):
        self.app, self.limit, self.max_upload_mb = app, limit, max_upload_mb

    async def refuse(self, scope, receive, send) -> None:
        from starlette.responses import PlainTextResponse

        message = f"That request is too large: this page takes images up to {self.max_upload_mb:g} MB."
        await PlainTextResponse(message, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].endswith(UPLOAD_ROUTE):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(scope, receive, send)
        received, refused = 0, False

        async def receive_counted():  # a body without a Content-Length (chunked) is counted as it comes
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                await self.refuse(scope, receive, send)
            return {"type": "http.disconnect"} if refused else message

        async def send_unless_refused(message):
            if not refused:
                await send(message)

        await self.app(scope, receive_counted, send_unless_refused)


def launch_options(max_upload_mb: float, sessions_kept: int = SESSIONS_KEPT) -> dict:
    """app.launch's limits: Gradio's on uploads and on the sessions it keeps, and BodyLimit's on every
    other request, at what an image of max_upload_mb pasted inline needs (base64: 4 characters for 3
    bytes) and 1 MB more."""
    from starlette.middleware import Middleware

    limit = int(max_upload_mb * 2**20 * 4 / 3) + 2**20
    return {"max_file_size": int(max_upload_mb * 2**20), "show_error": False, "state_session_capacity": sessions_kept,
            "app_kwargs": {"middleware": [Middleware(BodyLimit, limit=limit, max_upload_mb=max_upload_mb)]}}


def upload_limit(text: str) -> float:
    """An argparse type for --max-upload-mb: a number > 0 and at most MAX_UPLOAD_MB (Gradio takes
    the limit as a 64-bit byte count: a larger one broke every request)."""
    from utils import positive_number

    value = positive_number(text)
    if value > MAX_UPLOAD_MB:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_UPLOAD_MB:,} (MB), got {text!r}")
    return value


def megapixel_limit(text: str) -> float:
    """An argparse type for --max-megapixels: a number > 0 and at most what the image reader opens
    (Pillow's MAX_IMAGE_PIXELS, 89.48 megapixels: open_image refuses more as a possible decompression bomb).
    Above it, an image between the two limits was called damaged, and a larger one "over" a limit it was under."""
    from PIL import Image

    from utils import positive_number

    value = positive_number(text)
    if value > Image.MAX_IMAGE_PIXELS / 1e6:
        most = math.floor(Image.MAX_IMAGE_PIXELS / 1e5) / 10  # rounded down: 89.5 would be refused
        raise argparse.ArgumentTypeError(f"expected at most {most:g} (megapixels: larger images are refused as "
                                         f"possible decompression bombs), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from utils import whole_number  # argparse types: a bad number is one line, before anything loads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", action="extend", metavar="RUN", type=run_folder_argument,
                        help="run folder(s) to serve (a run folder, or its last/ sub-folder); the first captions "
                             "by default, the others can be compared with it (default: the newest offline demo run "
                             "under --output-dir, finished or trained first if there is none)")
    # None: left out (DEFAULT_OUTPUT_DIR), told from a folder given with --checkpoint (output_dir_from_args).
    parser.add_argument("--output-dir", default=None,
                        help="where to look for, and if need be train, the demo run when no --checkpoint is given "
                             f"(default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=whole_number(1, 65535), default=DEFAULT_PORT, help="port to serve on")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the nearest-neighbour baseline (it reads every training image of each run once, "
                             "then keeps their CLIP features in the on-disk feature cache)")
    parser.add_argument("--examples", type=whole_number(0), default=4,
                        help="test images of the first run offered as examples")
    parser.add_argument("--max-megapixels", type=megapixel_limit, default=40,
                        help="larger images are refused with a message (at most 89.4)")
    parser.add_argument("--max-upload-mb", type=upload_limit, default=50,
                        help="larger files are refused with a message")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars at start-up")
    parser.add_argument("--lm-quantization", choices=("none", "8bit", "4bit"), default=None,
                        help="load each run's frozen LM in 8-bit or 4-bit NF4 through bitsandbytes, or not at all "
                             "(default: as the run trained it, from its run_config.json; else none)")
    add_dtype_flag(parser)
    return parser


def output_dir_from_args(args) -> str:
    """--output-dir, DEFAULT_OUTPUT_DIR unless given. It is only where the demo run is looked for: with
    --checkpoint it changes nothing, which a note says (it was taken without a word; the page writes no outputs)."""
    if args.output_dir is not None and args.checkpoint:
        note(f"note: --output-dir {args.output_dir} changes nothing: it is where the demo run is looked for, and "
             "--checkpoint names the runs to serve", file=sys.stderr)
    return args.output_dir if args.output_dir is not None else DEFAULT_OUTPUT_DIR


def check_can_serve(host: str, port: int) -> None:
    """Before the (slow) loading: the address exists here and the port is free. Gradio's own error
    names only the port, with advice for its Python API, even when the host is what is wrong."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"--host {host} is not an address this machine knows ({error.strerror}); use 127.0.0.1 "
                        "(this machine) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as probe:
        # As Gradio's server binds: a port the last page left in TIME_WAIT (a minute after it stopped)
        # is free to serve on again; one something listens on is still in use. Not on Windows, where
        # the option would let the probe share a port that a server listens on.
        if os.name == "posix":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; pick another --port") from None
            raise UserError(f"cannot serve on {host}:{port} ({error.strerror}); --host must be an address of "
                            "this machine, and ports below 1024 need root") from None


def reachable_from_elsewhere(host: str) -> bool:
    """Whether serving on `host` lets other machines open the page: any address but a loopback one
    (127.0.0.1, ::1, localhost). A name that does not resolve counts as reachable, to be safe."""
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return True
    return not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def exposure_warning(host: str, port: int, max_upload_mb: float) -> str | None:
    """The line printed before a page that other machines can reach: it has no password, and it was
    served on 0.0.0.0 without a word about who could then upload files to it and use its cores."""
    if not reachable_from_elsewhere(host):
        return None
    return (f"warning: --host {host} serves the page to every machine that can reach this one, with no password: "
            f"anyone there can upload files (up to {max_upload_mb:g} MB each) and caption with this machine. "
            f"Open it here at http://127.0.0.1:{port}, elsewhere at http://<this machine's name>:{port}")


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError('the page needs Gradio: pip install -e ".[app]" (make setup installs it)') from None
    return gradio


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.output_dir = output_dir_from_args(args)
    from eval import chosen_dtype, pick_device
    from model import checkpoint_folder

    import_gradio()
    check_can_serve(args.host, args.port)
    device = pick_device(args.device)  # before the demo run, which may have to be trained first
    dtype = chosen_dtype(args.dtype, device)
    progress = not args.no_progress
    checkpoints = [checkpoint_folder(path) for path in args.checkpoint or [ensure_demo_run(args.output_dir, progress)]]
    for checkpoint in checkpoints:  # every folder checked before the first (slow) load
        check_run_files(checkpoint)
    checkpoints = distinct_checkpoints(checkpoints)
    runs = [load_run(checkpoint, device, not args.no_baseline, progress=progress, lm_quantization=args.lm_quantization,
                     dtype=dtype) for checkpoint in checkpoints]
    unique_names(runs)
    resume_gc_after_loading()  # the loaded runs' objects set aside: a full collection during a request passes them over
    page = Page(runs, args.max_megapixels, args.max_upload_mb)
    examples = example_images(checkpoints[0], args.examples)
    app = build_app(page, examples)
    names = ", ".join(run.name for run in runs)
    print(for_terminal(f"starting the page for {names} on http://{args.host}:{args.port} (Ctrl-C stops)"), flush=True)
    warning = exposure_warning(args.host, args.port, args.max_upload_mb)
    if warning:
        print(warning, flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, **launch_options(args.max_upload_mb))
    except OSError as error:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({str(error).split(' (')[0]}); pick another "
                        "--port") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
