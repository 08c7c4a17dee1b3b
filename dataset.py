"""Caption data: where images and captions come from, and how they become training batches.

Sources (`--dataset`):
  flickr30k  Flickr30k from the Hub's parquet export, Karpathy train/val/test (the default)
  karpathy   a local folder with dataset_{flickr30k,flickr8k,coco}.json plus its images
  folder     a local folder of images with captions.jsonl or captions.csv (or imagefolder's metadata files)
The offline demo writes a `folder` data set (see demo.py).

Every caption of an image is used: training iterates over (image, caption) pairs; evaluation
scores each image against all of its references.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import errno
import functools
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
import unicodedata
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR, S_ISLNK, S_ISREG

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from model import IGNORE_INDEX
from utils import (UserError, cache_home, file_digest, first_line, gc_paused, ids_digest, note, replace_durably,
                   waiting_lock, write_json)

FLICKR30K_PARQUET = "hf://datasets/nlphuji/flickr30k@refs/convert/parquet/TEST/test/*.parquet"
DATASETS = ("flickr30k", "karpathy", "folder")
SPLITS = ("train", "val", "test")
KARPATHY_FILES = ("dataset_flickr30k.json", "dataset_flickr8k.json", "dataset_coco.json")
# Bump when what a cached feature means changes, the image decoding (open_image, to_rgb) included:
# a cached feature is never decoded again, so a decoding fix would otherwise never reach it.
# 2: EXIF rotation, transparency on white and 16-bit grey in to_rgb; parts carry a checksum.
# 3: float grey with NaN or infinite pixels is no longer all black (_grey_to_8bit).
# 4: large images are decoded smaller: JPEGs scaled in the DCT (decode_scaled), others reduced (reduced_for_clip).
FEATURE_CACHE_VERSION = 4
FEATURE_PART_SIZE = 4096  # images per cache part: what an interrupted extraction can lose at most
# A cache part's two files are written a second or so apart; loose pieces older than this were left by a
# write that was killed, and are deleted (FeatureCache._remove_loose_pieces).
LOOSE_PIECE_AGE_S = 3600
FEATURE_CACHE_LOCK = ".write.lock"  # empty; runs encoding into one cache folder take turns on it
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# How a caption folder deals its images without a split (train.py --folder-split): "hash" gives each its
# split by a hash of the seed and its name, so adding or removing images moves no other (but for a stand-in
# for an empty val or test split: _deal_by_hash); "shuffle" deals a seeded shuffle of all of them, which one
# image more re-deals. Runs saved before the hash deal used the shuffle and do not say so: their run config
# without the field reads as it.
FOLDER_SPLITS = ("hash", "shuffle")
FOLDER_SPLIT_OF_OLDER_RUNS = "shuffle"
HELD_OUT_FRACTION = 0.05  # of the images without a split, to val and as many to test
DEFAULT_SEED = 42  # train.py --seed unless given: what a caption folder's images without a split are dealt by


@dataclass
class ImageRecord:
    """One image and all of its reference captions."""

    image_id: str
    captions: list[str]
    split: str
    path: Path | None = None  # local sources
    row: int | None = None  # row in a Hub dataset (flickr30k)
    table: object = field(default=None, repr=False)  # that Hub dataset
    unusable_captions: int = field(default=0, repr=False, compare=False)  # dropped as empty or not text: a note says so

    def open(self):
        if self.table is not None:
            try:
                with refuse_decompression_bombs():
                    image = _hub_image(self.table[self.row]["image"])
            except Exception as error:  # Pillow (or the Hub loader, for a row holding only a path) decodes it
                raise UserError(f"cannot read image {self.image_id} (row {self.row}): {_hub_image_problem(error)}") \
                    from None
            if image is None:  # a null cell: Pillow's own words were "'NoneType' object has no attribute 'load'"
                raise UserError(f"cannot read image {self.image_id} (row {self.row}): the row holds no image")
            # As for a file (open_image): a thin strip would be scaled up to gigabytes by CLIP's preprocessing.
            check_aspect_ratio(f"{self.image_id} (row {self.row})", *image.size)
            try:
                return to_rgb(image)
            except Exception as error:
                raise UserError(f"cannot read image {self.image_id} (row {self.row}): {first_line(error)}") from None
        return open_image(self.path)


# Formats a caption data set plausibly holds (the IMAGE_SUFFIXES). Pillow identifies files by
# content, so a renamed file still opens; anything else (EPS, which runs Ghostscript, PSD, ...)
# is refused rather than handed to a rarely used parser.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
# Pillow's module for each of the IMAGE_FORMATS. Image.open(formats=...) tries them in turn and, at the first whose
# module is not yet imported, imports all ~45 of Pillow's format modules (a PNG did, JPEG being tried first): 50-80 ms
# of inference.py's cold start, for formats never tried.
IMAGE_FORMAT_MODULES = ("JpegImagePlugin", "PngImagePlugin", "GifImagePlugin", "BmpImagePlugin", "WebPImagePlugin",
                        "TiffImagePlugin")
TRANSPARENT_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


@functools.cache
def import_image_format_modules() -> None:
    import importlib

    for module in IMAGE_FORMAT_MODULES:
        with contextlib.suppress(ImportError):  # as Pillow's own imports of them: a format this Pillow lacks
            importlib.import_module(f"PIL.{module}")


def open_image(path):
    """An RGB PIL image, or a one-line UserError naming the file and what is wrong with it.

    EXIF orientation is applied; transparency is composited on white; 16-bit and 32-bit grey is
    scaled to 8 bit; an animated image gives its first frame. Images over Pillow's
    MAX_IMAGE_PIXELS (89M) are refused as possible decompression bombs, and so are strips over
    MAX_ASPECT_RATIO times as long as they are wide.
    """
    from PIL import Image, UnidentifiedImageError

    import_image_format_modules()
    path = Path(path)
    problem = image_file_problem(path)
    if problem:
        raise UserError(problem)
    if path.stat().st_size == 0:
        raise UserError(f"cannot read image {path}: the file is empty")
    try:
        with refuse_decompression_bombs(), Image.open(path, formats=IMAGE_FORMATS) as image:
            check_aspect_ratio(path, *image.size)  # from the header, before anything is decoded
            return to_rgb(decode_scaled(image))  # decoded now, inside the try: truncated data fails here, not later
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UserError(f"refusing image {path} as a possible decompression bomb: {_bomb_size(error)}") from None
    except UnidentifiedImageError:
        if _is_resource_fork(path):
            raise UserError(f"cannot read image {path}: it is a macOS resource fork (a '._' file a Mac writes beside "
                            "what it copies to other drives), not an image; delete it (find . -name '._*' -delete) "
                            "and its caption row") from None
        if kind := _format_by_content(path):
            raise UserError(f"cannot read image {path}: it is {kind}; convert it to JPEG or PNG") from None
        raise UserError(f"cannot read image {path}: not a {', '.join(IMAGE_FORMATS)} image") from None
    except PermissionError:
        raise UserError(f"cannot read image {path}: permission denied") from None
    except Exception as error:  # Pillow's decoders raise many kinds on hostile bytes (OSError, ValueError, ...)
        raise UserError(f"cannot read image {path} (damaged or truncated?): {first_line(error)}") from None


# A JPEG is decoded scaled down by 1/2, 1/4 or 1/8 in the DCT (Pillow's draft mode, as Image.thumbnail does) as long as
# its shorter side stays at least this long: twice CLIP ViT-B/32's 224 (4/3 of ViT-L/14-336's 336), so CLIP's own
# bicubic resize still does the last step. Kept at 1x (224) instead, a 640x480 photo's 224x224 tensor moved by 1.6 (at
# most 34) in 0-255 units on average, a 720x477 photo of a circuit board's by 11. At 448, a 16x16 JPEG whose header
# claimed 9000x9000 took 16 MB and 44 ms to decode and preprocess instead of 1,078 MB and 2.6 s, a 4000x3000 photo 7 MB
# and 41 ms instead of 156 MB and 431 ms, and the tensor moved by 0.1-0.6 (at most 12) on average over photos of
# 900-6000 pixels a side, under what saving one again as a quality-90 JPEG does (2.6). JPEGs under 896 pixels on the
# shorter side (Flickr30k's, COCO's) are decoded whole, to the same pixels as before.
DECODE_MIN_SIDE = 448


def decode_scaled(image):
    """`image` (just opened) decoded: a JPEG scaled down in the DCT while its shorter side stays at least
    DECODE_MIN_SIDE, else whole. Every path decodes with this (files, Hub rows, the app's uploads), so training's
    cached features and a caption at inference see the same pixels."""
    image.draft(None, (DECODE_MIN_SIDE, DECODE_MIN_SIDE))  # a no-op for other formats and smaller JPEGs
    image.load()
    return image


def _hub_image(cell):
    """A Hub row's image cell decoded as a file is (the column is left undecoded: _image_column), or None for a
    null cell. A cell of only a remote path (no stored bytes) is decoded by the Hub loader, which can fetch it."""
    import io

    from PIL import Image

    if cell is None or isinstance(cell, Image.Image):
        return cell
    bytes_, path = cell.get("bytes"), cell.get("path")
    if bytes_ is None and path is None:
        return None
    if bytes_ is None and not os.path.isfile(path):
        import datasets

        return datasets.Image().decode_example(cell)
    source = path if bytes_ is None else io.BytesIO(bytes_)
    return decode_scaled(Image.open(source))  # any format Pillow reads, as the Hub loader did


def _bomb_size(error: Exception) -> str:
    """Pillow's words on an image over MAX_IMAGE_PIXELS, naming that limit. Pillow raises its error only at twice
    the limit, and names that: a 100M-pixel image was refused over "89478485 pixels", a 10,000M-pixel one over
    "178956970 pixels", which is no limit anything here applies."""
    from PIL import Image

    pixels = re.search(r"\((\d+) pixels\)", str(error))
    if pixels is None:  # other wording in another Pillow version: its own first line
        return first_line(error).split(", could be")[0]
    return f"Image size ({pixels[1]} pixels) exceeds limit of {Image.MAX_IMAGE_PIXELS} pixels"


# Kinds of image file people have that are none of the IMAGE_FORMATS, by their first bytes (ISO media brands for
# HEIF and AVIF). Pillow cannot read HEIC at all (it needs a plug-in); AVIF, SVG and PDF are not read here either.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}


def _format_by_content(path: Path) -> str:
    """What a file Pillow did not take as an image is, where its first bytes tell, else "". An iPhone's HEIC photo
    was only "not a JPEG, PNG, ... image", which did not say what it is nor what to do with it."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except OSError:
        return ""
    not_read = f"which is not read here (only {', '.join(IMAGE_FORMATS)} are)"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "a HEIC (HEIF) photo, as iPhones save them, which Pillow cannot read"
    if head[4:8] == b"ftyp" and head[8:12] in AVIF_BRANDS:
        return f"an AVIF image, {not_read}"
    if b"<svg" in head.lower() and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return f"an SVG drawing, {not_read}"
    if head.startswith(b"%PDF"):
        return f"a PDF document, {not_read}"
    return ""


APPLE_DOUBLE_MAGIC = b"\x00\x05\x16\x07"  # how a '._' file (AppleDouble: a macOS file's attributes) begins


def _is_resource_fork(path: Path) -> bool:
    """Whether `path` is a macOS '._' file: named as an image ("._IMG_0001.JPG"), so `find -name '*.JPG'` lists it
    beside its photo in a caption file, where it was only "not a JPEG, PNG, ... image", not what to do with it."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == APPLE_DOUBLE_MAGIC
    except OSError:
        return False


# CLIP's preprocessing scales the shorter side up to 224 before it crops the centre square, so a thin
# strip of few pixels (1 x 100,000: a 471-byte PNG) becomes gigabytes; no photo is this thin.
MAX_ASPECT_RATIO = 100


def check_aspect_ratio(path: Path | str, width: int, height: int) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise UserError(f"refusing image {path}: {width}x{height} is over {MAX_ASPECT_RATIO} times as long as it is "
                        "wide (CLIP would see only a centre square of it, after scaling it up to gigabytes)")


def image_file_problem(path: Path) -> str:
    """Why `path` is no image file to open, or "" if it is one. A directory, a pipe or a device is
    called one: "not found" would send the user looking for a path that is there."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):  # EACCES, ENAMETOOLONG: is_dir() raised (a traceback)
            return f"cannot read image {path}: {stat_error_reason(error)}"
        if near := _names_alike(path.parent).get(_name_key(path.name)):
            return (f"image not found: {path} (its folder holds {near!r}, the same name in another Unicode form, "
                    "letter case or spacing: spell it in the caption file as the file is named)")
        return f"image not found: {path}"
    if S_ISDIR(mode):
        return f"{path} is a directory, not an image file"
    if not S_ISREG(mode):  # /dev/stdin on a pipe, <(...), a FIFO: read once, with no size to check
        return f"{path} is not a regular file (a pipe or device): save the image to a file and name that file"
    return ""


def stat_error_reason(error: OSError) -> str:
    """Why a path that may well exist cannot be looked at. Permission is denied on a folder above the file
    (a file's own mode does not stop stat), which "permission denied" alone would not say."""
    if error.errno == errno.EACCES:
        return "permission denied on a folder in its path"
    return (error.strerror or str(error)).lower()


def _name_key(name: str) -> str:
    """A file name as a person reads it: macOS writes "é" as e + accent (NFD), most files say "é" (NFC);
    a camera writes .JPG where a caption file says .jpg; a spreadsheet cell keeps a space typed after the name,
    which the error then printed unseen ("image not found: a.jpg "). Linux file systems tell these apart."""
    return unicodedata.normalize("NFC", name).strip().casefold()


@functools.lru_cache(maxsize=16)
def _names_alike(folder: Path) -> dict[str, str]:
    """{_name_key: name} of the files in `folder` (listed once per folder: a split's missing files share
    a few), for the hint above; {} for a folder that is not there or cannot be listed."""
    try:
        return {_name_key(entry.name): entry.name for entry in os.scandir(folder) if entry.is_file()}
    except OSError:
        return {}


def _hub_image_problem(error: BaseException) -> str:
    """Why a Hub row's stored bytes gave no image. Pillow names the buffer it read them from, which says nothing:
    "cannot identify image file <_io.BytesIO object at 0x7f...>"."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "its bytes are no image Pillow recognises (damaged, or another kind of file)"
    return first_line(error)


@contextlib.contextmanager
def refuse_decompression_bombs():
    """Turn Pillow's DecompressionBombWarning (over MAX_IMAGE_PIXELS) into an error, like the
    DecompressionBombError it raises only at twice that size. Pillow's other warnings on damaged
    files ("Truncated File Read", "Corrupt EXIF data") are silenced: such an image either decodes,
    and is used, or fails with the one line open_image gives."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def to_rgb(image):
    """A decoded image as the model sees it: upright by its EXIF orientation, transparent pixels
    on white (not black), high bit depths scaled (not clipped to white), then RGB, and no larger than
    CLIP needs (reduced_for_clip)."""
    return reduced_for_clip(_upright_rgb(image))


def reduced_for_clip(image):
    """An RGB image at least twice DECODE_MIN_SIDE on its shorter side, reduced by a whole factor (each output pixel
    the mean of a factor x factor box) to keep it at least DECODE_MIN_SIDE: what decode_scaled does inside a JPEG,
    for every format (a JPEG's 1/8 may leave it larger). CLIP's processor held the whole picture three times more
    (as numpy and PIL copies): a 40-megapixel PNG took 536 MB and 2.1 s to decode and preprocess, now 154 MB and
    0.7 s; CLIP's 224x224 input moved by 0.2-0.6 in 0-255 units on average (at most 27) on photos of 1200-6000
    pixels a side saved as PNG, as much as decode_scaled moves a JPEG's."""
    factor = min(image.size) // DECODE_MIN_SIDE
    return image.reduce(factor) if factor >= 2 else image


def _upright_rgb(image):
    from PIL import ExifTags, Image, ImageOps

    # exif_transpose and convert copy the whole image even when they change nothing: an upright RGB photo was
    # held three times over while decoding (a 40-megapixel PNG: 459 MB, 153 MB a copy; now one copy, 153 MB).
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):  # 1 (upright) or none: nothing to turn
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _grey_to_8bit(image)
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB" and not getattr(image, "map", None):  # decoded RGB, in memory of its own: as it is
        return image
    return image.convert("RGB")  # a copy too, of a memory-mapped file's pixels (the file may go or change)


def _grey_to_8bit(image):
    """16-bit grey (I;16*) and 16-bit data held in I mode scale by 255/65535; other I or F data
    (negative, wider, float) is stretched from its finite minimum to its finite maximum."""
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    # A float TIFF may hold NaN (no data) and infinities (saturated): one made the range infinite and
    # every pixel black (with numpy's warnings on stderr); they are drawn at the range's ends instead.
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


# Unicode's categories Cc (control characters) and Cs (surrogates), which its stability policy keeps as they are, for
# one pass of the regex engine: asking unicodedata.category of each character was half the time of loading COCO's
# training split (566,747 captions; profiled).
CONTROL_OR_SURROGATE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def normalize_caption(text) -> str:
    """A caption by rule (an empty result means the caption is dropped):

    - anything that is not a string (None, a number, a list) is not a caption: empty;
    - Unicode is normalised to NFC, so one text is always one token sequence;
    - control characters (tabs, newlines, NUL, escape, ...) and unpaired surrogates count as
      whitespace; runs of whitespace become one space, none at either end;
    - length is not limited here: tokenize_caption cuts at max_caption_tokens.
    """
    if not isinstance(text, str):
        return ""
    text = CONTROL_OR_SURROGATE.sub(" ", unicodedata.normalize("NFC", text))
    return " ".join(text.split())


def _clean_captions(captions) -> tuple[list[str], int]:
    """A row's captions (a list, one string, or junk) without the empty ones, and how many were left out."""
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        captions = [captions]
    captions = [caption for text in captions for caption in _listed_captions(text)]
    kept = [c for c in (normalize_caption(t) for t in captions) if c]
    return kept, len(captions) - len(kept)


def _listed_captions(text) -> list:
    """The captions a value holds: a list saved as its text is that list's captions. nlphuji/flickr30k's CSV
    keeps each image's five captions as one JSON list ('["Two men ...", ...]'), pandas writes a list column
    to CSV as its Python repr ("['Two men ...', ...]"), and one of numpy arrays (a list column read from parquet;
    datasets' Dataset.to_csv) as theirs ("['Two men ...' 'A man ...']"); each was trained on and scored as one
    caption, brackets, quotes and all. Anything else is one caption as it is."""
    if not isinstance(text, str) or not (text.lstrip().startswith("[") and text.rstrip().endswith("]")):
        return [text]
    for parse in (json.loads, _python_strings):
        try:
            listed = parse(text.strip())
        except Exception:  # not a list literal after all (SyntaxError, ValueError, tokenize.TokenError, ...)
            continue
        if isinstance(listed, list) and all(isinstance(item, str) for item in listed):
            return listed
    return [text]


def _python_strings(text: str) -> list | None:
    """The strings of a list's Python text, comma-separated as a list's repr or space-separated (lines wrapped at 75
    characters) as a numpy array's; None for other text. Read string by string: ast.literal_eval joins adjacent
    strings as Python does, and an array's ten captions were read as one ("a dog on grassa brown dog ...")."""
    import io
    import tokenize

    tokens = [token for token in tokenize.generate_tokens(io.StringIO(text).readline)
              if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER)]
    if len(tokens) < 2 or (tokens[0].string, tokens[-1].string) != ("[", "]"):
        return None
    inner = tokens[1:-1]
    commas = len(inner) > 1 and inner[1].string == ","
    strings, separators = (inner[0::2], inner[1::2]) if commas else (inner, [])
    if any(token.type != tokenize.STRING for token in strings) or any(token.string != "," for token in separators):
        return None
    return [ast.literal_eval(token.string) for token in strings]


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def load_flickr30k_hub(split: str, data_files: str = FLICKR30K_PARQUET) -> list[ImageRecord]:
    """Flickr30k as a user gets it today: the parquet export with a Karpathy `split` column."""
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files={"flickr30k": data_files}, split="flickr30k")
    except Exception as error:  # datasets raises many kinds (network, missing files, schema)
        first = first_line(error)
        if data_files != FLICKR30K_PARQUET:  # the user's own files: the network advice would not help
            raise UserError(f"could not load --hub-data-files {data_files} ({first}); give parquet files with the "
                            "nlphuji/flickr30k export's columns (image, caption, split)") from None
        raise UserError(
            f"could not load Flickr30k from {data_files} ({first}); without network use --dataset karpathy "
            "or --dataset folder with --data-dir (train.py: or --demo)"
        ) from None
    missing = {"image", "caption", "split"} - set(table.column_names)
    if missing:
        raise UserError(f"{data_files} lacks columns {sorted(missing)}; expected the nlphuji/flickr30k parquet export")
    table = _image_column(table, data_files)
    # A column sliced whole ([:]) is formatted in one batch; iterated, datasets (4 and later) formats it row by row:
    # loading Flickr30k's three splits (31,014 rows, four columns read at each) took 5 s, now 1.8 s.
    splits = table["split"][:]
    captions = table["caption"][:]
    ids = table["img_id"][:] if "img_id" in table.column_names else [str(i) for i in range(len(table))]
    names = table["filename"][:] if "filename" in table.column_names else ids
    images = _image_identities(table)
    records: dict[str, ImageRecord] = {}  # by image name: rows of one image are one record
    first_seen: dict[str, tuple[str, int]] = {}
    for row, (row_split, row_captions, image_id, name) in enumerate(zip(splits, captions, ids, names)):
        normal = _normal_split(row_split)
        if normal is None:  # left out of every split, the row would shrink the data unnoticed
            raise UserError(f"{data_files}: row {row} has split {row_split!r}; use one of {', '.join(SPLITS)}")
        key = str(name or image_id)
        seen_split, seen_row = first_seen.setdefault(key, (normal, row))
        if seen_split != normal:  # trained on and scored on: a leak
            raise UserError(f"{data_files}: image {key} is in split {seen_split} (row {seen_row}) and in split "
                            f"{normal} (row {row}); give each image one split")
        if normal != split:
            continue
        if key in records:
            # Exports with one row per caption: one image with all its captions (each counted once),
            # else each row would be scored against its one caption as if it were another image.
            _check_same_image(data_files, key, records[key].row, row, images)
            merged = records[key].captions
            kept, unusable = _clean_captions(row_captions)
            merged.extend(c for c in kept if c not in merged)
            records[key].unusable_captions += unusable
        else:
            kept, unusable = _clean_captions(row_captions)
            records[key] = ImageRecord(key, kept, split, row=row, table=table, unusable_captions=unusable)
    return list(records.values())


def _image_identities(table) -> list[tuple]:
    """Per row, what tells two rows' images apart without decoding them: the stored file's byte count, or its
    path where the row holds no bytes (the column is already a struct of bytes and path: _image_column)."""
    import pyarrow.compute as pc

    column = table.data.column("image")
    sizes = pc.binary_length(pc.struct_field(column, "bytes")).to_pylist()
    paths = pc.struct_field(column, "path").to_pylist()
    return [(size, path if size is None else None) for size, path in zip(sizes, paths)]


def _check_same_image(data_files: str, key: str, first_row: int, row: int, images: list[tuple]) -> None:
    """Rows of one filename are merged as one image's captions. Where they hold different images (photos of
    two folders with the same name, a filename column filled with one value) merging kept the first image
    only and gave it the others' captions, without a word."""
    if images[first_row] != images[row]:
        raise UserError(f"{data_files}: rows {first_row} and {row} both name image {key} but hold different images; "
                        "give each image its own filename (rows of one filename are taken as one image's captions)")


def _image_column(table, data_files: str):
    """The table with its `image` column as images left undecoded: {bytes, path} cells that ImageRecord.open
    decodes as a file is (decode_scaled), not the Hub loader's whole decode. Parquet written by pandas or pyarrow
    (not by `datasets`) lacks the schema note that says its structs are images: checked by the cast."""
    import datasets

    if table.features["image"] == datasets.Image(decode=False):
        return table
    try:
        return table.cast_column("image", datasets.Image(decode=False))
    except Exception:  # pyarrow's cast errors: the column holds numbers or other structs
        raise UserError(f"{data_files}: column 'image' holds {table.features['image']}, not images; give it the "
                        "image file's bytes (or a struct of bytes and path, as the Hub's export does)") from None


def find_karpathy_json(data_dir: Path) -> Path:
    for name in KARPATHY_FILES:
        if (data_dir / name).is_file():
            return data_dir / name
    folder_files = [name for name in ("captions.jsonl", "captions.csv", *IMAGEFOLDER_METADATA)
                    if (data_dir / name).is_file()]
    hint = f"; it holds {folder_files[0]}, which --dataset folder reads" if folder_files else ""
    raise UserError(f"no Karpathy split file ({', '.join(KARPATHY_FILES)}) in {data_dir}"
                    f"{hint or other_caption_file_hint(data_dir)}")


@functools.lru_cache(maxsize=8)  # asked once per image: building the paths was a sixth of loading COCO (profiled)
def _image_roots(data_dir: Path) -> tuple[Path, ...]:
    """The folders a Karpathy split file's image names are looked up in: the data folder or the one data sets ship."""
    return data_dir, data_dir / "images", data_dir / "Images", data_dir / "flickr30k-images"


def _resolve_image(data_dir: Path, *parts: str, listings: dict | None = None) -> Path:
    """An image's file under the data folder or one of the image folders data sets ship, by its name as written,
    else by that name in another Unicode form (in_unicode_form, `listings` shared across one load)."""
    relative = Path(*[p for p in parts if p])
    roots = _image_roots(data_dir)
    for root in roots:
        if (candidate := root / relative).is_file():
            return candidate
    listings = {} if listings is None else listings
    for root in roots:
        if (found := in_unicode_form(root / relative, listings)) and found.is_file():
            return found
    return data_dir / relative


def load_karpathy(data_dir: Path, split: str) -> list[ImageRecord]:
    """A Karpathy-format JSON; COCO's `restval` images are trained on, as in the papers."""
    path = find_karpathy_json(data_dir)
    check_not_utf16(path)
    try:
        images = json.loads(path.read_text(encoding="utf-8-sig"))["images"]
        if not isinstance(images, list):
            raise TypeError(f"'images' is a {type(images).__name__}, not a list")
    except UnicodeDecodeError:
        raise UserError(not_utf8_message(path)) from None
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as error:
        raise UserError(f"{path} is not a Karpathy split file ({error})") from None
    records: dict[str, ImageRecord] = {}  # by image file: an entry listed twice is one image
    first_seen: dict[str, tuple[str, int]] = {}
    repeated: list[str] = []  # images whose repeated entry brought captions they already had
    files_by_id: dict[str, str] = {}
    shared_ids: list[str] = []  # "id (first file, this file)" for ids given to two image files
    listings: dict[Path, dict[str, list[str]]] = {}  # folders listed for names in another Unicode form
    for number, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str) or not image["filename"]:
            raise UserError(f"{path}: images[{number}] has no 'filename'")
        folder = image.get("filepath") or ""
        if not isinstance(folder, str):
            raise UserError(f"{path}: images[{number}] has filepath {folder!r}, not a folder name")
        if problem := file_name_problem(folder) or file_name_problem(image["filename"]):
            raise UserError(f"{path}: images[{number}] has filepath {folder!r} and filename {image['filename']!r}; "
                            f"one {problem}")
        folder, filename = _karpathy_slashes(data_dir, folder, image["filename"])
        file = os.path.normpath(os.path.join(folder, filename))
        image_split = _karpathy_split(path, image, number)
        _check_one_split(path, file, image_split, number, first_seen)
        if image_split != split:
            continue
        sentences = image.get("sentences")
        captions, unusable = _clean_captions([_karpathy_text(s) for s in sentences] if isinstance(sentences, list)
                                             else [])
        if file in records:
            # A repeated entry (a file merged into itself) would weigh its captions double in training and
            # count them twice as references; captions it adds are kept.
            records[file].unusable_captions += unusable
            known = set(records[file].captions)
            records[file].captions.extend(c for c in captions if c not in known)
            repeated.extend(file for c in captions if c in known)
            continue
        image_id = str(image.get("cocoid", image.get("imgid", image["filename"])))
        if image_id in files_by_id:  # two files under one id: predictions and bad-sample lists could not tell them
            shared_ids.append(f"{image_id} ({files_by_id[image_id]}, {file})")
            image_id = file
        files_by_id[image_id] = file
        path_ = _resolve_image(data_dir, folder, filename, listings=listings)
        records[file] = ImageRecord(image_id, captions, split, path=path_, unusable_captions=unusable)
    if repeated:
        count = "counts" if len(repeated) == 1 else "count"
        note(f"note: {split}: {counted(len(repeated), 'caption')} of images listed more than once in {path} {count} "
             f"once (first: {repeated[0]})")
    if shared_ids:
        share = "shares its id with another image file and is named by its" if len(shared_ids) == 1 else \
            "share their id with another image file and are named by their"
        note(f"note: {split}: {counted(len(shared_ids), 'image')} of {path} {share} file instead "
             f"(first: {shared_ids[0]})")
    return list(records.values())


def _karpathy_split(path: Path, image: dict, number: int) -> str:
    """An entry's split, read as the caption folders read it (COCO's `restval` is training data). A missing
    or unknown one is an error: that image would be left out of every split, shrinking the data unnoticed."""
    split = _normal_split(image.get("split"))
    if split is None:
        raise UserError(f"{path}: images[{number}] has split {image.get('split')!r}; use one of train, restval, "
                        "val, test")
    return split


def _check_one_split(path: Path, file: str, split, number: int, first_seen: dict) -> None:
    """An image file listed under two splits would be trained on and scored on (a leak), or
    dropped from one of them: an error naming both entries, as for a caption folder."""
    seen_split, seen_number = first_seen.setdefault(file, (split, number))
    if seen_split != split:
        raise UserError(f"{path}: image {file} is listed in split {seen_split} (images[{seen_number}]) and in "
                        f"split {split} (images[{number}]); give each image one split")


def _karpathy_text(sentence):
    """A sentence's raw text, else its tokens joined; junk comes back as is and is dropped later."""
    if not isinstance(sentence, dict):
        return sentence
    if sentence.get("raw") is not None:
        return sentence["raw"]
    tokens = sentence.get("tokens")
    return " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else None


def _read_caption_rows(data_dir: Path) -> list[dict]:
    """The caption rows of a folder: its captions.jsonl or captions.csv, else Hugging Face imagefolder's
    metadata files (_read_imagefolder_metadata)."""
    jsonl, csv_path = data_dir / "captions.jsonl", data_dir / "captions.csv"
    if jsonl.is_file() and csv_path.is_file():  # which one holds the captions meant is not ours to guess
        raise UserError(f"{data_dir} holds both captions.jsonl and captions.csv; keep the one that is meant")
    for path in (jsonl, csv_path):
        if path.is_file():
            return _read_caption_file(path)
    for path in (jsonl, csv_path):  # a folder of that name, or a link to nowhere (or to itself)
        if path.is_symlink() or path.exists():
            raise UserError(f"{path} is not a readable file (a folder, or a link to nowhere); the captions go in a "
                            "file of that name")
    if metadata := imagefolder_metadata_files(data_dir):
        return _read_imagefolder_metadata(data_dir, metadata)
    raise UserError(f"{data_dir} has neither captions.jsonl nor captions.csv (nor an imagefolder's metadata.jsonl or "
                    f"metadata.csv){other_caption_file_hint(data_dir)}")


def _read_caption_file(path: Path) -> list[dict]:
    """The rows of one caption file, .jsonl or .csv (read as utf-8-sig: a byte-order mark, as spreadsheet
    programs write, is not part of the first column's name)."""
    check_not_utf16(path)
    try:
        if path.suffix == ".csv":
            return _read_caption_csv(path)
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as error:
                    raise UserError(f"{path} line {number} is not JSON ({error}); the file holds one JSON "
                                    'object per line, e.g. {"image": "a.jpg", "caption": "..."}') from None
                if not isinstance(rows[-1], dict):
                    raise UserError(f"{path} line {number} is not a JSON object with an 'image' field")
        return rows
    except UnicodeDecodeError:
        raise UserError(not_utf8_message(path)) from None


# Hugging Face's imagefolder layout: a metadata file naming each image by `file_name` (relative to the metadata
# file's folder), in the data folder or in each split's folder (train/, validation/, test/), whose name is the split.
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
# Folder names Hugging Face reads as the test split beyond SPLIT_ALIASES' (datasets.data_files.SPLIT_KEYWORDS): an
# eval/ folder's metadata file was not read, its images left out of every split without a word. Folder names only:
# a row's "eval" stays an error, as it may mean val.
IMAGEFOLDER_TEST_FOLDERS = ("eval", "evaluation")


def split_of_folder(name: str) -> str | None:
    """The split a folder of an imagefolder data set gives its images, as Hugging Face reads its name, else None."""
    if name.strip().lower() in IMAGEFOLDER_TEST_FOLDERS:
        return "test"
    return _normal_split(name)


def imagefolder_metadata_files(data_dir: Path, names: tuple[str, ...] = IMAGEFOLDER_METADATA) -> list[Path]:
    """The imagefolder metadata files (`names`) of `data_dir` and of every folder under it, each folder's one file:
    Hugging Face reads them all (a folder per class, dogs/metadata.csv and cats/metadata.csv, or train/dogs/), and
    those of folders other than the split folders were left out without a word."""
    found = []
    for folder in _folders_under(data_dir):
        files = [folder / name for name in names if (folder / name).is_file()]
        if len(files) > 1:
            raise UserError(f"{folder} holds both metadata.jsonl and metadata.csv; keep the one that is meant")
        found += files
    return found


def _folders_under(data_dir: Path) -> list[Path]:
    """`data_dir` and the folders under it, top first then by name, as Hugging Face's data files see them: hidden
    folders and "__" ones (macOS's __MACOSX, __pycache__) skipped. A linked folder is followed unless its folder was
    seen (a link to a parent loops); links come after real folders, so latest -> train/ leaves train/ its name."""
    folders, seen = [], set()
    for top, subfolders, _ in os.walk(data_dir, followlinks=True):
        real = os.path.realpath(top)
        shown = (d for d in subfolders if not d.startswith((".", "__")))
        subfolders[:] = [] if real in seen else sorted(shown, key=lambda d: (os.path.islink(os.path.join(top, d)), d))
        if real not in seen:
            seen.add(real)
            folders.append(Path(top))
    return folders


def _read_imagefolder_metadata(data_dir: Path, files: list[Path]) -> list[dict]:
    """The rows of imagefolder metadata files as caption rows: an image named from the data folder, and in a split
    folder that folder's split (where the row names none), whichever folder's metadata file names it."""
    rows, split_folders = [], {}
    for path in files:
        folder = str(path.parent.relative_to(data_dir))
        for row in _read_caption_file(path):
            field = next((f for f in IMAGE_FIELDS if row.get(f)), None)
            if isinstance(row.get(field), str):
                # A str, not a Path: one per row was a fifth of reading a COCO-size metadata.csv (_image_name
                # normalises the name either way).
                row[field] = row[field] if folder == "." else os.path.join(folder, row[field])
                no_split = row.get("split") is None or (isinstance(row["split"], str) and not row["split"].strip())
                # The split folder the image lies in: the metadata file's own ("validation/", "eval/", "train/dogs/")
                # or, for one above it, the one its name goes into.
                split_folder = _split_folder_of(data_dir, row[field], split_folders)
                if no_split and split_folder:
                    row["split"] = split_folder
            rows.append(row)
    return rows


def _split_folder_of(data_dir: Path, name: str, split_folders: dict[str, bool]) -> str | None:
    """The split of the outermost split folder (train/, validation/, test/, ...; at any depth, as Hugging Face reads
    **/train/**) an image name lies in, else None: a root metadata.jsonl naming "test/a.png" left the image to the hash deal,
    which trained on most of test/. `split_folders` keeps whether each such folder is one: a look per folder."""
    folders = re.split(r"[\\/]", name)[:-1]
    for depth, part in enumerate(folders, 1):
        if split := split_of_folder(part):
            prefix = "/".join(folders[:depth])
            if prefix not in split_folders:
                split_folders[prefix] = (data_dir / prefix).is_dir()
            if split_folders[prefix]:
                return split
    return None


def other_caption_file_hint(data_dir: Path) -> str:
    """What to do with the caption files of other layouts a folder holds ("" where it holds none): a COCO captions
    file (images and annotations lists), a Karpathy split file, or one JSON list saved as captions.json."""
    if any((data_dir / name).is_file() for name in KARPATHY_FILES):
        return "; it holds a Karpathy split file, which --dataset karpathy reads"
    coco = sorted([*data_dir.glob("captions_*.json"), *data_dir.glob("annotations/captions_*.json")])
    if coco:
        return (f"; its {coco[0].relative_to(data_dir)} (COCO's format) is not read: convert it to captions.jsonl as "
                "README (Other data) shows")
    if (data_dir / "captions.json").is_file():
        return "; its captions.json is not read: write its objects one per line as captions.jsonl (jq -c '.[]')"
    # Kaggle's Flickr8k keeps its "image,caption" rows in captions.txt; a spreadsheet's tab-separated text is .tsv.
    for name in ("captions.tsv", "captions.txt"):
        if (data_dir / name).is_file():
            return (f"; its {name} is not read: if it is a table with a header line naming the image and caption "
                    "columns (fields separated by commas, semicolons or tabs), rename it captions.csv")
    # Hugging Face's imagefolder also reads metadata.parquet.
    if parquet := imagefolder_metadata_files(data_dir, ("metadata.parquet",)):
        return (f"; its {parquet[0].relative_to(data_dir)} is not read: save it as metadata.csv in its folder "
                "(pandas: pd.read_parquet(path).to_csv(csv_path, index=False))")
    return ""


def check_not_utf16(path: Path) -> None:
    """Refuse a caption file saved as UTF-16 (Excel's "Unicode Text", Windows PowerShell's `>`): without a
    byte-order mark it decodes as UTF-8 with a NUL after every letter, and the error named a header of
    'i\x00m\x00a\x00g\x00e' rather than the file's encoding."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    # Every other byte NUL for ASCII text; a stray NUL in a caption (read as whitespace) is no sign of it. Greek or
    # Chinese captions hold few NULs, but the file begins in ASCII (a header's names, "{"): one NUL in two bytes.
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[:2].count(b"\x00") == 1 \
            or head.count(b"\x00") * 4 >= len(head) > 0:
        raise UserError(f"{path} is {utf16_or_utf32(head)} text, not UTF-8; save it again as UTF-8")


def utf16_or_utf32(head: bytes) -> str:
    """Which wide encoding a text file's first bytes are in: UTF-32 (rare, but Python's and iconv's) has three
    NULs beside each ASCII letter and a 4-byte mark, and UTF-16's mark is the first half of UTF-32's."""
    utf32 = head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) or head[:4].count(b"\x00") == 3
    return "UTF-32" if utf32 else "UTF-16"


def not_utf8_message(path: Path) -> str:
    """Where a caption file stops being UTF-8 (line and byte), for one saved as Latin-1 or Windows-1252."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return (f"{path} is not UTF-8 text: line {line} holds byte 0x{data[error.start]:02x} (Latin-1 or "
                "Windows-1252 text?); save it again as UTF-8")
    return f"{path} is not UTF-8 text; save it again as UTF-8"


# csv's default field limit (131,072 characters) is a guard against runaway quotes, which strict
# mode reports instead; a caption of any length is accepted and cut at tokenisation.
CSV_FIELD_LIMIT = 2**31 - 1  # the largest a C long holds everywhere


def _read_caption_csv(path: Path) -> list[dict]:
    """captions.csv as csv.DictReader rows (extra fields under None), read with strict quoting: an
    unterminated quote would otherwise swallow the rest of the file into one caption."""
    rows, row_start = [], 1
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            delimiter = csv_delimiter(handle.readline())
            handle.seek(0)
            reader = csv.reader(handle, strict=True, delimiter=delimiter)
            header = _known_column_names(next(reader, []))
            check_csv_header(path, header)
            row_start = reader.line_num + 1
            for fields in reader:
                # A blank line is no row, as for csv.DictReader, nor is one of empty fields (";;"), as spreadsheets
                # save rows that once held something: each stopped the load as "names no image".
                if any(field.strip() for field in fields):
                    rows.append(_whole_csv_row(path, header, _csv_dict(header, fields), row_start, delimiter))
                row_start = reader.line_num + 1
    except csv.Error as error:
        raise UserError(f"{path} line {row_start}: {_csv_quote_problem(error)}; put a caption that contains "
                        f"{DELIMITER_NAMES[delimiter]} or quotes in double quotes, with each quote inside it doubled "
                        '("")') from None
    finally:
        csv.field_size_limit(previous_limit)  # the limit is global to the process: leave it as found
    return rows


# The fields a caption row may name its image and its caption(s) by ("file_name" and "text" are what
# Hugging Face's imagefolder metadata uses).
IMAGE_FIELDS = ("image", "file_name", "filename")
CAPTION_FIELDS = ("captions", "caption", "text")
# A wide table's caption columns: one of CAPTION_FIELDS numbered ("caption_1", "Caption 2", "text3"), as published
# caption CSVs keep an image's captions in one row, a column each (image,caption_1,...,caption_5).
NUMBERED_CAPTION = re.compile(r"({})[_ ]?\d+".format("|".join(CAPTION_FIELDS)), re.IGNORECASE)


@functools.lru_cache(maxsize=64)  # asked once per row with the row's field names: one answer per layout
def wide_caption_fields(names: tuple) -> tuple[tuple | None, str]:
    """The fields of a row (or a header) that hold its captions, in their order, where some are numbered: the
    numbered fields of one caption name (caption_1, caption_2, ...) and that name's own field beside them
    (image,caption,caption2). None where no field is numbered (a tall row: one caption field, read as before).
    The second value says what is wrong where numbered fields stand beside other caption fields ("" where
    nothing is): caption_1 and text_1, or caption_1 and text, may be captions or not, and which is not ours to
    guess."""
    family_of = {name: match[1].lower() for name in names
                 if isinstance(name, str) and (match := NUMBERED_CAPTION.fullmatch(name.strip()))}
    if not family_of:
        return None, ""
    family = next(iter(family_of.values()))  # the first numbered column's name
    fields = tuple(name for name in names if name == family or family_of.get(name) == family)
    others = [name for name in names if (name in CAPTION_FIELDS or name in family_of) and name not in fields]
    if others:
        return fields, (f"has caption fields of two names ({', '.join(fields)}; {', '.join(others)}); an image's "
                        f"captions are read from the fields of one name ({family}, {family}_1, {family}_2, ...): "
                        "rename or remove the others")
    return fields, ""


# What separates a caption CSV's fields, tried in this order on its header line: Excel saves "CSV" with ";" where the
# decimal mark is a comma (German, French, ... settings), and "Text (Tab delimited)" with tabs.
CSV_DELIMITERS = (",", ";", "\t")
DELIMITER_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs"}  # for the errors that ask for quotes


def csv_delimiter(header_line: str) -> str:
    """The first of CSV_DELIMITERS that splits the header line into an image column and a caption column (","
    where none does: check_csv_header then says what the header is). Read from the header's known names, never
    guessed from the captions, whose own commas and semicolons a sniffer would take for separators."""
    for delimiter in CSV_DELIMITERS:
        header = set(_known_column_names(next(csv.reader([header_line], delimiter=delimiter), [])))
        if header & set(IMAGE_FIELDS) and (header & set(CAPTION_FIELDS) or wide_caption_fields(tuple(header))[0]):
            return delimiter
    return ","


def check_csv_header(path: Path, header: list[str]) -> None:
    """The first line must name an image column and a caption column: without a header (or with other
    names) every row used to be dropped, ending in "no training images with captions found"."""
    wide, problem = wide_caption_fields(tuple(header))
    if not set(header) & set(IMAGE_FIELDS) or not (set(header) & set(CAPTION_FIELDS) or wide):
        raise UserError(f"{path}: the first line must be a header naming the image column ({', '.join(IMAGE_FIELDS)}) "
                        f"and the caption column ({', '.join(CAPTION_FIELDS[1:])}), e.g. image,caption,split; "
                        f"it is {','.join(header)!r}")
    if problem:
        raise UserError(f"{path}: its header {problem}")


def _known_column_names(header: list[str]) -> list[str]:
    """The header with the column names this reader knows spelled as it knows them: a spreadsheet's
    "Image, Caption" (capitals, a space after the comma) was refused as naming no image column."""
    known = {*IMAGE_FIELDS, *CAPTION_FIELDS, "split"}
    return [name.strip().lower() if name.strip().lower() in known else name for name in header]


def _csv_dict(header: list[str], fields: list[str]) -> dict:
    """A row keyed by the header, as csv.DictReader makes it: missing fields None, extra ones under None."""
    row = dict(itertools.zip_longest(header, fields[: len(header)]))
    if len(fields) > len(header):
        row[None] = fields[len(header):]
    return row


def _csv_quote_problem(error: csv.Error) -> str:
    if "end of data" in str(error):
        return "a quote opened in this row is never closed"
    if "expected after" in str(error):
        return f"a quoted field in this row is followed by more text ({error})"
    return f"this row is not valid CSV ({error})"


def _whole_csv_row(path: Path, header: list[str], row: dict, line: int, delimiter: str = ",") -> dict:
    """A row with more fields than the header is a caption with unquoted commas. When the caption is
    the last column, its pieces are joined back; elsewhere the row is ambiguous, so it is an error."""
    extra = row.pop(None, None)  # csv.DictReader's place for fields beyond the header
    wide = wide_caption_fields(tuple(header))[0]
    # The (first) column _group_by_image reads (the header has one).
    caption = wide[0] if wide else next(f for f in CAPTION_FIELDS if f in row)
    if row[caption] is None:  # a row that ends before its caption column: not an empty caption, a broken row
        given = sum(value is not None for value in row.values())
        raise UserError(f"{path} line {line} ends before its {caption} column ({given} of the header's "
                        f"{len(header)} fields); give each row every column up to the caption")
    if extra is None:
        return row
    # Joined back only into the last column, and in a wide table only where it is the one caption column: among
    # caption_1..caption_5 which caption the pieces belong to is not ours to guess.
    if header and (header[-1] in CAPTION_FIELDS if wide is None else wide == (header[-1],)):
        row[header[-1]] = delimiter.join([row[header[-1]], *extra])
        return row
    raise UserError(f"{path} line {line} has {len(header) + len(extra)} fields but the header has {len(header)}: "
                    f"put a caption that contains {DELIMITER_NAMES[delimiter]} in double quotes")


SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "testing": "test", "training": "train",
                 "restval": "train"}


def _normal_split(value) -> str | None:
    """A split's name read leniently ("Train", " validation ", "restval" for train), or None where
    it names none of SPLITS."""
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    name = SPLIT_ALIASES.get(name, name)
    return name if name in SPLITS else None


def _split_name(path: Path, value) -> str | None:
    """A row's split, read leniently ("Train", " validation ") but never guessed: an unknown value
    is an error, since silently dropping those images would shrink the data set unnoticed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    name = _normal_split(value)
    if name is None:
        raise UserError(f"{path}: split {value!r} is unknown; use one of {', '.join(SPLITS)} (or leave it empty "
                        "to have one assigned)")
    return name


def _without_split(by_image: dict[str, dict], followers: dict[str, str]) -> list[str]:
    """The images no caption row gives a split: load_caption_folder deals them one (deal_splits). Other names
    of one file (`followers`, from _join_same_files) are not dealt: they take the split of the name they follow."""
    return [name for name, entry in by_image.items() if entry["split"] is None and name not in followers]


def dealt_names(data_dir: str | Path, seed: int) -> list[str]:
    """The images of a caption folder that get their split dealt with `seed` (see _without_split). "~/coco" is read
    as load_records reads it: a run_config.json whose data_dir was edited so loaded its split in eval.py, then
    stopped on the deal's check ("~/coco has neither captions.jsonl nor ...", a folder named "~" here)."""
    reading = _read_caption_folder(Path(data_dir).expanduser(), seed)
    return _without_split(reading.by_image, reading.followers)


def hash_position(seed: int, name: str) -> float:
    """An image's place in [0, 1) for the hash deal, from sha256 (Python's hash() of a str changes from one
    process to the next). The name is NFC-normalised: a caption file written on macOS spells "é" as e + accent."""
    digest = hashlib.sha256(f"{seed}\0{unicodedata.normalize('NFC', name)}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53  # 53 bits: exact as a float, never 1.0


def deal_splits(names: list[str], seed: int, folder_split: str = "hash",
                held_out_fraction: float = HELD_OUT_FRACTION) -> dict[str, str]:
    """{name: split} for images without a split: `held_out_fraction` to val and as many to test (at least
    one each once there are three images, but for a hash deal that left no train image to stand in; fewer
    are all trained on), the rest to train."""
    if len(names) < 3:
        return dict.fromkeys(names, "train")
    if folder_split == "shuffle":
        return _deal_by_shuffle(names, seed, held_out_fraction)
    return _deal_by_hash(names, seed, held_out_fraction)


def _deal_by_shuffle(names: list[str], seed: int, held_out_fraction: float) -> dict[str, str]:
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_held = max(1, round(held_out_fraction * len(order)))
    return {name: "val" if i < n_held else "test" if i < 2 * n_held else "train" for i, name in enumerate(order)}


def _deal_by_hash(names: list[str], seed: int, held_out_fraction: float) -> dict[str, str]:
    """Val below `held_out_fraction`, test below twice that, train above: each image by its own hash_position,
    so adding or removing others never moves it. Where none falls in val (or test), the train image of lowest
    position stands in for it (for val first). Adding images never makes a train image a stand-in: they can
    only fill val and test (fewer stand-ins needed) and push train images up the order. Removing images can."""
    position = {name: hash_position(seed, name) for name in names}
    deal = {name: "val" if p < held_out_fraction else "test" if p < 2 * held_out_fraction else "train"
            for name, p in position.items()}
    missing = [split for split in ("val", "test") if split not in deal.values()]
    train = sorted((name for name in names if deal[name] == "train"), key=lambda name: (position[name], name))
    deal.update(zip(train, missing))
    return deal


def hash_deal_record(data_dir: str | Path, seed: int, unassigned: list[str] | None = None) -> dict:
    """What eval.py needs to tell whether a caption folder dealt by hash that changed since training now holds
    out an image the run trained on: how many images were dealt, and the lowest hash_position dealt to train
    (each dealt image at or past it was in train; 1.0: none was). {} where every image names its split.
    `unassigned`: the folder's dealt_names, where the caller has them (a large caption file takes seconds to read)."""
    unassigned = dealt_names(data_dir, seed) if unassigned is None else unassigned
    if not unassigned:
        return {}
    deal = deal_splits(unassigned, seed)
    trained = [hash_position(seed, name) for name in unassigned if deal[name] == "train"]
    return {"images": len(unassigned), "trained_from": min(trained, default=1.0)}


def held_out_past(unassigned: list[str], seed: int, trained_from: float) -> dict[str, str]:
    """{name: split} for the images of a caption folder (its dealt_names) that the hash deal now puts in val or
    test at or past `trained_from` (hash_deal_record): where the folder lost images since, stand-ins the run may
    have trained on, each with the split it stands in for. Sorted by name."""
    deal = deal_splits(unassigned, seed)
    return {name: deal[name] for name in sorted(unassigned)
            if deal[name] != "train" and hash_position(seed, name) >= trained_from}


def split_deal(data_dir: str | Path, seed: int = 0, unassigned: list[str] | None = None) -> str:
    """A digest of how a caption folder's images without a split are dealt to train, val and test: the
    seed and which images are dealt ("" where every image names its split). Under the shuffle deal an image
    added to or removed from the caption file re-deals all of them, so a run's test split would then hold
    images it trained on; eval.py compares this with the run's (a file missing on disk deals nothing: the
    caption file does). `unassigned` as for hash_deal_record."""
    unassigned = dealt_names(data_dir, seed) if unassigned is None else unassigned
    if not unassigned:
        return ""
    return f"seed {seed}, {len(unassigned):,} images, ids {ids_digest(sorted(unassigned))}"


def _group_by_image(data_dir: Path, rows: list[dict]) -> dict[str, dict]:
    """Caption rows gathered per image: {name: {"captions", "split", "split_row"}}. An image
    belongs to one split, and a row without a split takes the one another row gives its image."""
    by_image: dict[str, dict] = {}
    for number, row in enumerate(rows, 1):
        name = _image_name(data_dir, row, number)
        entry = by_image.setdefault(name, {"captions": [], "split": None, "split_row": None})
        _set_split(data_dir, name, entry, _split_name(data_dir, row.get("split")), number)
        for captions in _row_captions(data_dir, row, number):
            entry["captions"].extend(captions if isinstance(captions, (list, tuple)) else [captions])
    return by_image


def _row_captions(data_dir: Path, row: dict, number: int) -> list:
    """The values of a caption row's caption fields: each numbered one's of a wide row (wide_caption_fields: its
    image,caption,caption2 read only `caption`, and caption_1..caption_5 named no caption column), else its one
    caption field's. _clean_captions reads each as a tall row's one caption (empty ones left out, with a note)."""
    wide, problem = wide_caption_fields(tuple(row))
    if problem:
        raise UserError(f"{data_dir}: caption row {number} {problem}")
    if wide:
        # A blank cell is no caption (images of a wide table have their own numbers of captions), not one dropped
        # with a note; a number or a null still is.
        return [row[field] for field in wide if not (isinstance(row[field], str) and not row[field].strip())]
    # The first caption field that holds something: {"captions": null, "caption": "a dog"} had its caption
    # dropped as null; one with none present is an error below, one with all null a dropped caption.
    field = next((f for f in CAPTION_FIELDS if row.get(f) is not None),
                 next((f for f in CAPTION_FIELDS if f in row), None))
    if field is None:
        raise UserError(f"{data_dir}: caption row {number} has no caption (expected a field named "
                        f"{', '.join(CAPTION_FIELDS)}; it has {', '.join(map(str, row))})")
    return [row[field]]


def file_name_problem(name: str) -> str:
    """Why a caption file's image name can name no file, or "" if it can. A NUL character or a lone surrogate
    ("\\ud800" in JSON) ended in a traceback from the first look at the disk (ValueError, UnicodeEncodeError)."""
    if "\0" in name:
        return "holds a NUL character, which no file name can; name the file as it is called on disk"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate); name the file as it is called on disk"
    return ""


def _image_name(data_dir: Path, row: dict, number: int) -> str:
    """A row's image path, normalised so that one file is one image however it is spelled
    ("./images/x.png", "images//x.png", "images/x.png"), else it could land in two splits.
    Lexical only: symlinks are not resolved, so the id stays the path the file gives."""
    name = next((row[f] for f in IMAGE_FIELDS if row.get(f)), None)
    if not name:
        raise UserError(f"{data_dir}: caption row {number} names no image (expected an 'image' field)")
    if not isinstance(name, str):
        raise UserError(f"{data_dir}: caption row {number} has image {name!r}, not a file name")
    if problem := file_name_problem(name):
        raise UserError(f"{data_dir}: caption row {number} has image {name!r}, which {problem}")
    name = os.path.normpath(with_slashes(data_dir, name))
    if not os.path.isabs(name) and name.split(os.sep, 1)[0] != os.pardir:  # inside the folder: relpath gives it back
        return name  # (relpath's abspaths were half of COCO's load)
    # An absolute spelling of a file in the folder, or one that leaves and re-enters it ("../data/x.png"),
    # is that file's relative name; a file outside the folder keeps the name the row gives.
    relative = os.path.relpath(os.path.join(os.path.abspath(data_dir), name), os.path.abspath(data_dir))
    if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
        return relative
    return name


def with_slashes(data_dir: Path, name: str) -> str:
    """A Windows path ("photos\\a.jpg", ".\\photos\\a.jpg") with this system's separators, where no file has
    the name as written: on Linux a backslash is a letter of a file name, so every such image was "not found".
    A name some file does have (a backslash in a Linux file name) is kept as it is."""
    if "\\" not in name or os.sep == "\\" or os.path.lexists(os.path.join(data_dir, name)):
        return name
    return name.replace("\\", os.sep)


def _karpathy_slashes(data_dir: Path, folder: str, filename: str) -> tuple[str, str]:
    """with_slashes for a Karpathy entry's filepath and filename, looked up under every image root (_image_roots):
    checked in the data folder alone, images/x\\y.jpg, a Linux file that had loaded, became "not found"."""
    if "\\" not in folder + filename or any(os.path.lexists(root / folder / filename)
                                           for root in _image_roots(data_dir)):
        return folder, filename
    return with_slashes(data_dir, folder), with_slashes(data_dir, filename)


def respell_unicode_forms(records: list[ImageRecord]) -> None:
    """Point each record whose file is not found at its name's file in another Unicode form (in_unicode_form)."""
    listings: dict[Path, dict[str, list[str]]] = {}
    for record in records:
        if record.path is not None and not os.path.lexists(record.path):
            record.path = in_unicode_form(record.path, listings) or record.path


def in_unicode_form(path: Path, listings: dict[Path, dict[str, list[str]]]) -> Path | None:
    """The file of `path`'s folder whose name is `path`'s in another Unicode form, else None: macOS writes "é" as
    e + accent (NFD) where a caption file typed elsewhere says "é" (NFC), one name to a reader and to macOS, two to
    Linux. A name in another letter case is left to image_file_problem's hint (on Linux two files may differ only
    so). `listings` keeps each folder's names by their NFC form: a folder is listed once per load, and only where
    a file is missing."""
    folder = path.parent
    if folder not in listings:
        listings[folder] = {}
        with contextlib.suppress(OSError):  # not there, or not listable: the file stays "not found"
            for entry in os.scandir(folder):
                listings[folder].setdefault(unicodedata.normalize("NFC", entry.name), []).append(entry.name)
    named = listings[folder].get(unicodedata.normalize("NFC", path.name), [])
    return folder / named[0] if len(named) == 1 else None  # two of one text: which is meant is not ours to guess


def file_identity(path: Path | str) -> tuple:
    """What tells one file from another however it is reached: its device and inode, which a symlink, a hard
    link and a path through a linked folder share; for a file that is not there (or cannot be looked at), its
    real path."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))
    if not stat.st_ino:  # a file system that reports no inode numbers gives 0 for every file: all alike
        return ("path", os.path.realpath(path))
    return ("inode", stat.st_dev, stat.st_ino)


def _join_same_files(data_dir: Path, by_image: dict[str, dict],
                     seed: int) -> tuple[dict[str, str], list[list[str]], set[str]]:
    """Keep in one split the names a caption file gives one file (a symlink and its target, hard links, a path
    through a linked folder): dealt apart, the test split held images trained on, and its scores flattered the
    run without a word. A name without a split takes the one a row gives another name of its file (as a row
    without a split takes its image's); names none of whose rows gives one are dealt as one, by the one of highest
    hash_position: a file is held out only where all its names hash there, so listing a file under one more name
    never deals it from train to val or test (what eval.py relies on; a held-out split left empty takes a stand-in,
    as when images are removed: _deal_by_hash). Returns ({name: the name whose deal it follows}, [the names of
    each file listed under more than one], {the names no file was found for}). Byte-identical copies are separate
    files here (telling them apart means reading every file at every load; README: Other data)."""
    names_of: dict[tuple, list[str]] = {}
    for name in by_image:
        names_of.setdefault(file_identity(os.path.join(data_dir, name)), []).append(name)  # a str: Path's cost 10%
    shared = [names for names in names_of.values() if len(names) > 1]
    unfound = {name for identity, names in names_of.items() if identity[0] == "path" for name in names}
    followers: dict[str, str] = {}
    for names in shared:
        named = sorted((by_image[name]["split_row"], by_image[name]["split"]) for name in names
                       if by_image[name]["split"] is not None)
        if not named:
            leader = max(names, key=lambda name: (hash_position(seed, name), name))
            followers.update((name, leader) for name in names if name != leader)
        for name in names:
            if named and by_image[name]["split"] is None:  # the split of the first row that names one
                by_image[name]["split_row"], by_image[name]["split"] = named[0]
    return followers, shared, unfound


def _note_files_shared_with_train(data_dir: Path, split: str, split_of: dict[str, str],
                                  names_of_one_file: list[list[str]]) -> None:
    """Say, in one line, which of a held-out split's images are files the train split holds under another name:
    only where rows name those splits (else _join_same_files keeps them together), and they are the user's.
    `split_of`: {name: split} of every image (_FolderReading.splits)."""
    pairs = []
    for names in names_of_one_file:
        trained = [name for name in names if split_of[name] == "train"]
        pairs += [(name, trained[0]) for name in names if trained and split_of[name] == split]
    if not pairs:
        return
    held_out = sum(each == split for each in split_of.values())
    shown = ", ".join(f"{name} = train's {trained}" for name, trained in pairs[:3])
    more = f" and {len(pairs) - 3:,} more" if len(pairs) > 3 else ""
    files = "is a file" if len(pairs) == 1 else "are files"
    note(f"note: {split}: {len(pairs):,} of its {held_out:,} images {files} the train split lists under another "
         "name (a symlink, a hard link, or a path through a linked folder), so its scores on them are optimistic "
         f"({shown}{more}); give each file one split in {data_dir}")


def _set_split(data_dir: Path, name: str, entry: dict, split: str | None, number: int) -> None:
    """Give an image the split a row names. Two different splits are an error: merging them
    silently would put one image in both training and test (or drop it from one)."""
    if split is None or split == entry["split"]:
        return
    if entry["split"] is not None:
        raise UserError(f"{data_dir}: image {name} is listed in split {entry['split']} (caption row "
                        f"{entry['split_row']}) and in split {split} (caption row {number}); give each image "
                        "one split")
    entry["split"], entry["split_row"] = split, number


@dataclass
class _FolderReading:
    """One reading of a caption folder with a seed (_read_caption_folder): its images (_group_by_image, with the
    splits rows name, also through other names of one file: _join_same_files) and its deal under each --folder-split
    asked for. Shared by the loads of one_reading_per_folder: read only, each load makes its own records."""
    seed: int
    by_image: dict[str, dict]
    followers: dict[str, str]
    names_of_one_file: list[list[str]]
    unfound: set[str]  # the names the reading found no file for (file_identity: a file system without inodes too)
    deals: dict[str, tuple[dict[str, str], dict[str, str]]] = field(default_factory=dict)

    def splits(self, folder_split: str) -> tuple[dict[str, str], dict[str, str]]:
        """({name: split} of the images dealt one (deal_splits), {name: split} of every image)."""
        if folder_split not in self.deals:
            deal = deal_splits(_without_split(self.by_image, self.followers), self.seed, folder_split)
            split_of = {name: entry["split"] for name, entry in self.by_image.items()}
            split_of.update(deal)
            split_of.update({name: deal[leader] for name, leader in self.followers.items()})
            self.deals[folder_split] = deal, split_of
        return self.deals[folder_split]


# {(folder, seed): _FolderReading} while one_reading_per_folder is open; None outside it.
_folder_readings: dict[tuple[str, int], _FolderReading] | None = None


@contextlib.contextmanager
def one_reading_per_folder():
    """Inside, a caption folder is read once (per seed): every split loaded and every dealt_names is dealt from
    that reading. Reading, grouping and looking at each image file took 3.5 s of COCO's 3.9 s per split (113,287
    images), 3 or 4 times per start-up of train.py; and the splits of one run come from one version of the caption
    file, even where it is edited while the run starts (a re-dealt test split could hold a trained image)."""
    global _folder_readings
    outer = _folder_readings
    _folder_readings = {} if outer is None else outer
    try:
        yield
    finally:
        _folder_readings = outer


def _read_caption_folder(data_dir: Path, seed: int) -> _FolderReading:
    """A caption folder's _FolderReading: read now, or the one read before inside one_reading_per_folder."""
    key = (os.path.abspath(data_dir), seed)
    if _folder_readings is not None and key in _folder_readings:
        return _folder_readings[key]
    by_image = _group_by_image(data_dir, _read_caption_rows(data_dir))
    reading = _FolderReading(seed, by_image, *_join_same_files(data_dir, by_image, seed))
    if _folder_readings is not None:
        _folder_readings[key] = reading
    return reading


def load_caption_folder(data_dir: Path, split: str, seed: int = 0, folder_split: str = "hash") -> list[ImageRecord]:
    """A folder of images with captions.jsonl ({"image", "captions"|"caption"|"text", "split"?}) or
    captions.csv (columns image, caption, split?; one row per caption, or one per image with caption_1,
    caption_2, ...: wide_caption_fields; file_name and text also do), else
    Hugging Face imagefolder's metadata.jsonl or metadata.csv (imagefolder_metadata_files).

    Rows without a split are assigned one by deal_splits, by `folder_split` (see FOLDER_SPLITS).
    """
    reading = _read_caption_folder(data_dir, seed)
    deal, split_of = reading.splits(folder_split)
    if split == "train":
        check_deal_leaves_train(data_dir, reading.by_image, deal)
    if split != "train":
        _note_files_shared_with_train(data_dir, split, split_of, reading.names_of_one_file)
    records, repeats = [], []
    for name, entry in reading.by_image.items():
        if split_of[name] == split:
            kept, unusable = _clean_captions(entry["captions"])
            counts = Counter(kept)  # keeps first-seen order
            repeats.extend((name, caption) for caption, count in counts.items() if count > 1)
            records.append(ImageRecord(name, list(counts), split, path=data_dir / name, unusable_captions=unusable))
    # Only the names the reading found no file for: looking at each file again was 112,000 lexists per COCO split.
    respell_unicode_forms([record for record in records if record.image_id in reading.unfound])
    if repeats:
        # A caption twice for one image is a copied row, not two annotators: it would weigh double in
        # training and count as two references in the scores.
        name, caption = repeats[0]
        note(f"note: {split}: a caption written more than once for the same image counts once; "
             f"{len(repeats):,} such in {data_dir} (first: {name} {caption!r})")
    return records


def check_deal_leaves_train(data_dir: Path, by_image: dict[str, dict], deal: dict[str, str]) -> None:
    """Refuse a folder whose deal left no image to train on: 3 or 4 images without a split can all land in
    val and test (by their hashes, or as stand-ins for an empty one). It ended in "no training images with
    captions found" once the backbones had loaded, which did not say why nor what to do."""
    named_train = any(entry["split"] == "train" for entry in by_image.values())
    if not deal or named_train or "train" in deal.values():
        return
    raise UserError(f"{data_dir}: no image is left to train on: its {len(deal)} images without a split were all "
                    f"dealt to val and test (by a hash of --seed and each name, {HELD_OUT_FRACTION:.0%} to each, and "
                    "from 3 such images on at least one each); add images (about 9 in 10 go to train), or "
                    'name each image\'s split in the caption file ("split": "train" in captions.jsonl, a split '
                    "column in captions.csv)")


def check_data_flags(dataset: str, data_dir: str | None, hub_data_files: str | None) -> None:
    """Refuse a data flag the chosen source would silently ignore. None: the flag was not given."""
    if data_dir is not None and not data_dir.strip():
        raise UserError("--data-dir is empty; name the data folder, or leave the flag out")
    if dataset == "flickr30k" and data_dir is not None:
        raise UserError(f"--data-dir {data_dir} is read by --dataset karpathy or folder, but --dataset flickr30k "
                        "reads the Hub's parquet files (--hub-data-files); drop --data-dir or pick another --dataset")
    if dataset != "flickr30k" and hub_data_files is not None:
        raise UserError(f"--hub-data-files is read by --dataset flickr30k only, and this run reads --dataset {dataset} "
                        "(--data-dir); drop --hub-data-files")


def dataset_of_folder(data_dir: str) -> tuple[str, str] | None:
    """The --dataset that reads `data_dir` and the file that says so: karpathy for a Karpathy split file, folder for
    captions.jsonl/.csv or imagefolder metadata; None where it holds files of both layouts, or neither."""
    folder = Path(data_dir).expanduser()
    karpathy = [name for name in KARPATHY_FILES if (folder / name).is_file()]
    captions = [name for name in ("captions.jsonl", "captions.csv") if (folder / name).is_file()]
    with contextlib.suppress(UserError):  # two metadata files in one folder: loading says so, in its words
        captions = captions or [str(path.relative_to(folder)) for path in imagefolder_metadata_files(folder)]
    if bool(karpathy) == bool(captions):
        return None
    return ("karpathy", karpathy[0]) if karpathy else ("folder", captions[0])


def dataset_from_data_dir(data_dir: str) -> str:
    """The --dataset a --data-dir given without one asks for, read from the files it holds: the default, flickr30k,
    reads no folder, so "--data-dir D" alone used to be refused although its layout is plain to see."""
    if not Path(data_dir).expanduser().is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; name the folder that holds the images and their "
                        "caption file")
    if (found := dataset_of_folder(data_dir)) is None:
        # Where it holds neither layout, what to do with the file it does hold (a COCO captions file, say): naming
        # --dataset only led to that advice one command later.
        folder = Path(data_dir).expanduser()
        neither = not any((folder / name).is_file() for name in KARPATHY_FILES)
        raise UserError(f"--data-dir {data_dir}: which --dataset reads it is not plain from its files (a Karpathy "
                        f"split file, {', '.join(KARPATHY_FILES)}, for karpathy; captions.jsonl, captions.csv or "
                        "imagefolder's metadata.jsonl/.csv for folder); name it with --dataset karpathy or folder"
                        f"{other_caption_file_hint(folder) if neither else ''}")
    dataset, file = found
    note(f"note: --data-dir {data_dir} holds {file}: read as --dataset {dataset}", file=sys.stderr)
    return dataset


def load_records(dataset: str, split: str, data_dir: str | None = None, hub_data_files: str = FLICKR30K_PARQUET,
                 seed: int = 0, on_bad_sample: str = "error", bad_samples: list | None = None,
                 folder_split: str = "hash") -> list[ImageRecord]:
    """The images of one split with their captions; images without a usable caption are left out.
    `seed` and `folder_split` deal a caption folder's images without a split (load_caption_folder).

    An image whose file is missing stops with a UserError (on_bad_sample="error"), or is left out
    and listed in `bad_samples` as (image_id, why) (on_bad_sample="skip"), as an unreadable one is.
    """
    if dataset not in DATASETS:
        raise UserError(f"dataset {dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
    if dataset == "flickr30k":
        records = load_flickr30k_hub(split, hub_data_files)
    else:
        if not data_dir:
            raise UserError(f"--dataset {dataset} needs --data-dir")
        root = Path(data_dir).expanduser()
        if root.is_file():
            raise UserError(f"--data-dir {root} is a file: name the folder that holds it ({root.parent})")
        if not root.is_dir():
            raise UserError(f"data folder not found: {root}")
        with gc_paused():  # a caption file's millions of objects, each scanned again at every full collection
            records = (load_karpathy(root, split) if dataset == "karpathy"
                       else load_caption_folder(root, split, seed, folder_split))
    records = _drop_missing_files(_drop_captionless(records, split), split, on_bad_sample, bad_samples)
    if split == "train":  # of the images trained on: a skipped one's captions are no training pairs
        _note_dominant_image(records)
    return records


def counted(number: int, noun: str) -> str:
    """ "1 image", "2 images": a note read "1 captions of 1 images"."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _drop_captionless(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    """The records with a caption left after normalize_caption. The others are left out, and counted:
    a column of captions that all came out empty would otherwise shrink the data set unnoticed."""
    kept = [r for r in records if r.captions]
    if len(kept) < len(records):
        first = next(r.image_id for r in records if not r.captions)
        left_out = len(records) - len(kept)
        note(f"note: {split}: {counted(left_out, 'image')} {'has' if left_out == 1 else 'have'} no usable caption "
             f"(empty, or not text) and {'is' if left_out == 1 else 'are'} left out (first: {first})")
    # Captions dropped from images that keep others were left out without a word: a column of numbers or
    # nulls in half the rows shrank the data set unnoticed.
    if dropped := [r for r in kept if r.unusable_captions]:
        captions = sum(r.unusable_captions for r in dropped)
        note(f"note: {split}: {counted(captions, 'caption')} of {counted(len(dropped), 'image')} "
             f"{'is' if captions == 1 else 'are'} empty or not text and {'is' if captions == 1 else 'are'} left out; "
             f"the images keep their other captions (first: {dropped[0].image_id})")
    return kept


# One image's captions flagged when they are this many times the median image's and this share of all:
# a join gone wrong (one row per caption times another table's rows), not a data set's natural spread.
DOMINANT_TIMES_MEDIAN, DOMINANT_SHARE = 10, 0.05


def _note_dominant_image(records: list[ImageRecord]) -> None:
    """Say so where one training image holds far more captions than the others: each caption is a
    training pair, so that image would fill most batches, and nothing else would say it."""
    counts = [len(r.captions) for r in records]
    if len(counts) < 3:
        return
    top = max(range(len(counts)), key=counts.__getitem__)
    median, total = float(np.median(counts)), sum(counts)
    if counts[top] >= DOMINANT_TIMES_MEDIAN * median and counts[top] >= DOMINANT_SHARE * total:
        note(f"note: train: {records[top].image_id} has {counts[top]:,} of the {total:,} captions "
             f"({counts[top] / total:.0%}; the median image has {median:g}); each caption is a training pair, so "
             "this image fills that share of every epoch: check the caption file if that is not meant")


def _drop_missing_files(records: list[ImageRecord], split: str, on_bad_sample: str,
                        bad_samples: list | None) -> list[ImageRecord]:
    """The records whose image files are there (see load_records). With every file of the split
    missing it is the folder that is wrong, not a sample: that stops the run in either mode."""
    problems = {i: image_file_problem(r.path) for i, r in enumerate(records) if r.path is not None}
    problems = {i: why for i, why in problems.items() if why}
    if not problems:
        return records
    if on_bad_sample != "skip" or len(problems) == len(records):
        first = next(iter(problems.values()))
        # A folder or a pipe named as an image is there: "missing" sent the user looking for a file that exists.
        missing = all(why.startswith("image not found") for why in problems.values())
        raise UserError(f"{len(problems)} of {len(records)} {split} images are "
                        f"{'missing' if missing else 'missing or unreadable'} (first: {first}); check --data-dir")
    if bad_samples is not None:
        bad_samples.extend((records[i].image_id, why) for i, why in problems.items())
    return [r for i, r in enumerate(records) if i not in problems]


def limit_records(records: list[ImageRecord], limit: int, seed: int) -> list[ImageRecord]:
    """A seeded, reproducible subset of `limit` images (all when limit <= 0)."""
    if limit <= 0 or limit >= len(records):
        return records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:limit])]


# ----------------------------------------------------------------------------------------------
# Tokenisation and batches
# ----------------------------------------------------------------------------------------------

def tokenize_caption(tokenizer, caption: str, eos_token_id: int, max_tokens: int) -> list[int]:
    """Caption tokens, cut to max_tokens - 1, then EOS: every caption teaches the model to stop.

    Special-token text inside a caption ("<|endoftext|>" typed into a CSV) is tokenised as plain
    text, so EOS comes only at the end and a caption can never teach the model to stop early.
    """
    return tokenize_captions(tokenizer, [caption], eos_token_id, max_tokens)[0]


TOKENIZE_BATCH = 4096  # captions per tokenizer call: its per-call overhead is paid once per batch, memory stays small


def tokenize_captions(tokenizer, captions: list[str], eos_token_id: int, max_tokens: int) -> list[list[int]]:
    """tokenize_caption of each caption, TOKENIZE_BATCH at a time. A fast tokenizer's own (Rust) tokenizer is asked
    directly, as transformers' call asks it: that call also made each caption a dict of five lists only to keep one,
    and a call per caption was half of train.py's start-up on COCO's 532,000 training captions (features cached).
    encode_batch_fast leaves out the characters' offsets, never read here: 17% less CPU on COCO's captions."""
    kept, tokenized = max(max_tokens - 1, 0), []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for start in range(0, len(captions), TOKENIZE_BATCH):
        batch = captions[start:start + TOKENIZE_BATCH]
        # transformers' call turns off the truncation or padding a tokenizer.json may ship with (for good: later
        # batches go direct), and tokenizes special-token text as text as encode_special_tokens does.
        if backend is None or backend.truncation is not None or backend.padding is not None:
            ids = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            backend.encode_special_tokens = True  # as split_special_tokens=True sets it
            ids = [encoding.ids for encoding in backend.encode_batch_fast(batch, add_special_tokens=False)]
        tokenized += [token_ids[:kept] + [eos_token_id] for token_ids in ids]
    return tokenized


PADDING_PAIR = -1  # a sampler index that stands for a row of padding, not a pair (see EpochShuffleSampler)


class CaptionPairs(Dataset):
    """(image, caption) pairs over pre-computed image features; tokenised once up front."""

    def __init__(self, records: list[ImageRecord], features: torch.Tensor, tokenizer, eos_token_id: int,
                 max_tokens: int):
        self.features = features
        self.tokenizer, self.eos_token_id, self.max_tokens = tokenizer, eos_token_id, max_tokens
        images = [index for index, record in enumerate(records) for _ in record.captions]
        captions = [caption for record in records for caption in record.captions]
        self.pairs: list[tuple[int, list[int]]] = list(zip(images, tokenize_captions(tokenizer, captions, eos_token_id,
                                                                                      max_tokens)))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        if i == PADDING_PAIR:  # no caption tokens: all labels ignored, so it adds nothing to the loss or gradient
            return {"image_features": self.features.new_zeros(self.features.shape[1]), "token_ids": [],
                    "pair_index": PADDING_PAIR}
        image_index, token_ids = self.pairs[i]
        return {"image_features": self.features[image_index], "token_ids": token_ids, "pair_index": i}

    def image_index(self, pair_index: int) -> int:
        return self.pairs[pair_index][0]


def collate_captions(batch: list[dict], pad_token_id: int, length_multiple: int = 1,
                     rows: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest caption in the batch (dynamic padding); labels are -100 at padding.

    Labels equal input_ids at real positions (EOS included): the shift happens in the model,
    whose hidden state at prefix_length-1+t predicts caption token t.

    For a compiled loss, which builds one graph per shape, `length_multiple` rounds the length
    up to a bucket and `rows` pads a short batch (an epoch's last) with rows that are all
    padding: labels -100 everywhere, so they add nothing to the loss or its gradient.
    """
    # Whole-batch tensor ops, not a loop over rows: the trainer syncs with the GPU once a step, so
    # collating sits on the critical path (256 captions on this project's 2-core CPU: 5.8 ms as a
    # loop over rows, 0.74 ms like this).
    lengths = torch.tensor([len(item["token_ids"]) for item in batch])  # (B,)
    tokens = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(item["token_ids"] for item in batch),
                                          dtype=np.int64))  # every caption's tokens, one after another
    # At least one position: a batch of padding rows only (see EpochShuffleSampler) still has a shape.
    longest = max(1, -(-int(lengths.max()) // length_multiple) * length_multiple)
    height = max(rows or 0, len(batch))
    real = torch.arange(longest) < lengths[:, None]  # (B, longest): each row's tokens, then padding
    input_ids = torch.full((height, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((height, longest), IGNORE_INDEX, dtype=torch.long)
    input_ids[: len(batch)][real] = tokens  # a mask fills row by row, in the order of `tokens`
    labels[: len(batch)][real] = tokens
    features = torch.stack([item["image_features"] for item in batch])  # (B, F)
    collated = {
        "image_features": torch.cat([features, features.new_zeros(height - len(batch), features.shape[1])]),
        "input_ids": input_ids,
        "labels": labels,
    }
    if "pair_index" in batch[0]:  # which pairs these are (real rows only): named in the log if a batch goes non-finite
        collated["pair_index"] = torch.tensor([item["pair_index"] for item in batch])
    return collated


class EpochShuffleSampler(Sampler):
    """A permutation that depends only on (seed, epoch): resuming at a batch replays the same order.

    With `multiple` (the global batch of several processes), it is followed by PADDING_PAIR up to a
    multiple of it. Accelerate deals each process whole batches in turn, and where their number does not
    divide evenly it fills the last round with pairs from the epoch's start again: those would be trained
    on twice, and N processes would no longer take the steps one process takes with the same global batch.
    Padding rows carry no caption tokens, so they change neither the loss nor the gradient."""

    def __init__(self, length: int, seed: int, multiple: int = 1):
        self.length, self.seed, self.epoch = length, seed, 0
        self.padded_length = -(-length // multiple) * multiple

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        return iter(order + [PADDING_PAIR] * (self.padded_length - self.length))

    def __len__(self) -> int:
        return self.padded_length


# ----------------------------------------------------------------------------------------------
# Images -> CLIP features
# ----------------------------------------------------------------------------------------------

class ImageTensors(Dataset):
    """Decoded and preprocessed images, so DataLoader workers decode in parallel."""

    def __init__(self, records: list[ImageRecord], processor):
        self.records, self.processor = records, processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        """(index, pixels, "") or, for an image that cannot be read, (index, None, why)."""
        try:
            return i, self.processor(images=self.records[i].open(), return_tensors="pt")["pixel_values"][0], ""
        except UserError as error:
            return i, None, str(error)


def _collate_images(items):
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    bad = [(i, why) for i, pixels, why in items if pixels is None]
    indices = [i for i, _ in good]
    return indices, (torch.stack([pixels for _, pixels in good]) if good else None), bad


def image_key(record: ImageRecord, folders: dict[Path, str] | None = None) -> str:
    """What identifies an image's content cheaply: a file's path, size, mtime and ctime (what git's
    index compares too), or a Hub row of a dataset fingerprint (which changes when its files do).

    A rewritten file gets a new key, even one whose size and mtime were put back (`cp -p`, `rsync -a`,
    `touch -d`, an EXIF edit that keeps the date): no tool can set the ctime, the kernel moves it on
    every change. A chmod moves it too, and costs one more encoding of that image.

    `folders` ({folder: its resolved path}, shared by the keys of one split: image_keys) resolves each folder once."""
    if record.table is not None:
        return f"hub|{getattr(record.table, '_fingerprint', 'unknown')}|{record.row}"
    resolved, stat = _resolved_file(record.path, {} if folders is None else folders)
    return f"file|{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def image_keys(records: list[ImageRecord]) -> list[str]:
    """image_key of each record. Path.resolve looks at every folder on the way to each file: per image, the keys of
    COCO's 113,287 training images took 1.5 s (a run, and eval.py's baseline, take them); each folder once, 0.5 s."""
    folders: dict[Path, str] = {}
    return [image_key(record, folders) for record in records]


def _resolved_file(path: Path, folders: dict[Path, str]) -> tuple[str, os.stat_result]:
    """str(path.resolve()) and path.stat(), the folder's resolved path taken from `folders` (or put there). A file
    that is itself a link, or that cannot be looked at, is resolved whole, as Path.resolve does (and fails alike).
    So is a path with '..' in it: os.path.realpath takes gone/.. and a_file/.. as their letters say, where the kernel
    stops (not found, not a folder), and the key named the file the letters led to."""
    folder = folders.get(path.parent)
    if folder is None:
        folder = folders[path.parent] = os.path.realpath(path.parent)
    where = os.path.join(folder, path.name)
    try:
        stat = os.lstat(where)  # not a link: the file's own stat
    except OSError:
        stat = None
    if stat is None or S_ISLNK(stat.st_mode) or path.name in ("", ".") or ".." in path.parts:
        stat = path.stat()
        return str(path.resolve()), stat
    return where, stat


def _without_location(settings):
    """A config's settings less where it was loaded from and which transformers wrote it: a copy of
    the same CLIP in another folder gives the same features."""
    if isinstance(settings, dict):
        return {key: _without_location(value) for key, value in settings.items()
                if key not in ("_name_or_path", "transformers_version")}
    return settings


def encoder_fingerprint(captioner) -> str:
    """A digest of everything that decides a CLIP feature: the weights themselves (whatever folder or
    Hub id they came from), their dtype, the vision config, the image preprocessing, and the decoding
    (FEATURE_CACHE_VERSION for ours, Pillow's version for its decoders)."""
    import PIL

    cached = getattr(captioner, "_encoder_fingerprint", None)
    if cached:
        return cached
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"v{FEATURE_CACHE_VERSION}|Pillow {PIL.__version__}|{type(captioner.clip).__name__}|"
                  f"{type(captioner.processor).__name__}".encode())
    digest.update(json.dumps(_without_location(captioner.clip.config.to_dict()), sort_keys=True, default=str).encode())
    digest.update(captioner.processor.to_json_string().encode())
    for name, tensor in sorted(captioner.clip.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    captioner._encoder_fingerprint = digest.hexdigest()
    return captioner._encoder_fingerprint


class FeatureCache:
    """CLIP embeddings on disk, one folder per encoder fingerprint, read back through memory maps.

    <root>/<fingerprint>/part-<id>.npy   float32 (n, F) embeddings, before normalisation
    <root>/<fingerprint>/part-<id>.json  {"keys": the n image keys, "blake2b": the .npy's digest},
                                          written after the .npy (a part without its keys file is
                                          an interrupted write and is ignored)
    Extraction appends new parts; nothing is ever rewritten, so concurrent runs cannot corrupt it.
    Both files reach the disk before their names do (utils.replace_durably). A write that fails or is
    interrupted removes what it wrote; pieces a killed one left (a .npy without its keys, a .tmp) are
    deleted once LOOSE_PIECE_AGE_S old. A part that cannot be
    read back (truncated, overwritten, zeroed, not the float32 (n, F) its keys promise, bytes
    other than those its digest was taken of) is deleted with a note on stderr and its images are
    extracted again: a cache must never stop a run, nor feed it wrong features.
    """

    def __init__(self, root: str | Path, fingerprint: str, feature_dim: int | None = None):
        self.folder = Path(root).expanduser() / fingerprint
        self.feature_dim = feature_dim
        self.rows: dict[str, tuple[Path, int]] = {}
        self.digests: dict[Path, str] = {}
        self.verified: set[Path] = set()
        self._remove_loose_pieces()
        self._read_new_parts()

    def _read_new_parts(self) -> None:
        """Take in the parts not yet known: all of them at first, then those other runs added since."""
        for keys_file in sorted(self.folder.glob("part-*.json")):
            array_file = keys_file.with_suffix(".npy")
            if array_file in self.digests or array_file in _DROPPED_PARTS or not array_file.is_file():
                continue  # known, dropped but not deletable (a read-only cache), or deleted by hand
            try:
                entry = json.loads(keys_file.read_text(encoding="utf-8"))
            except OSError:
                continue  # unreadable now (permissions): its images are extracted again
            except ValueError:  # not JSON, or not UTF-8 at all: keys files are written whole, so damage
                entry = None
            problem = self._part_problem(array_file, entry)
            if problem:
                self._drop_part(keys_file, array_file, problem)
                continue
            self.digests[array_file] = entry["blake2b"]
            self.rows.update((key, (array_file, row)) for row, key in enumerate(entry["keys"]))

    def _remove_loose_pieces(self) -> None:
        """Delete what a write killed part way (SIGKILL, a power cut) left: a .npy whose keys file was never
        written, a .tmp (and a keys file whose .npy was deleted by hand). Never read, they only filled the disk,
        a real part's 8 MiB at a time. Only old ones: another run sharing the cache may be between the two
        files of a part now, a second or so."""
        cutoff = time.time() - LOOSE_PIECE_AGE_S
        partner = {".npy": ".json", ".json": ".npy"}
        for path in self.folder.glob("part-*"):
            loose = path.suffix == ".tmp" or (path.suffix in partner
                                              and not path.with_suffix(partner[path.suffix]).exists())
            with contextlib.suppress(OSError):  # gone already (another run's sweep), or a read-only cache
                if loose and path.stat().st_mtime < cutoff:
                    path.unlink()

    def _part_problem(self, array_file: Path, entry) -> str:
        """Why a part cannot be used, or "" if it can. Only the .npy header is read (a memory map),
        so checking every part up front is cheap; the bytes are checked when first read (verify)."""
        keys = entry.get("keys") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys) \
                or not isinstance(entry.get("blake2b"), str):
            return "its keys file is not the image keys and digest of the part"
        try:
            array = np.load(array_file, mmap_mode="r", allow_pickle=False)
        except Exception as error:  # numpy raises many kinds on damaged bytes (ValueError, EOFError, OSError)
            return first_line(error)
        if not isinstance(array, np.ndarray):  # np.load opens a zip archive as an .npz
            return "not a .npy array"
        width = self.feature_dim or (array.shape[1] if array.ndim == 2 else None)
        if array.dtype != np.float32 or array.shape != (len(keys), width):
            return f"holds {array.dtype} {array.shape}, not float32 ({len(keys)}, {width or 'F'})"
        return ""

    @staticmethod
    def _drop_part(keys_file: Path, array_file: Path, problem: str) -> None:
        note(f"note: feature cache part {array_file} cannot be read ({problem}); deleting it, its images "
             "will be extracted again", file=sys.stderr)
        _DROPPED_PARTS.add(array_file)  # where it cannot be deleted, it is still never read again
        for path in (keys_file, array_file):  # keys first: an .npy without its keys is ignored anyway
            with contextlib.suppress(OSError):  # a read-only cache: the part is still left unused
                path.unlink()

    def verify(self, keys: list[str]) -> list[str]:
        """The keys whose parts' bytes differ from those their digest was taken of (a flipped bit, a
        block a crash left zeroed); those parts are dropped (see _drop_part). Each part is read
        whole once per cache, and only when its features are wanted."""
        damaged = []
        for array_file in sorted({self.rows[key][0] for key in keys} - self.verified):
            if file_digest(array_file) == self.digests[array_file]:
                self.verified.add(array_file)
                continue
            self._drop_part(array_file.with_suffix(".json"), array_file,
                            "its bytes are not those it was written with")
            damaged += [key for key in keys if self.rows[key][0] == array_file]
            self.rows = {key: where for key, where in self.rows.items() if where[0] != array_file}
        return damaged

    @contextlib.contextmanager
    def writing(self):
        """Encode and add parts holding the cache's lock, with the parts other runs added meanwhile read first:
        two runs started at once on the same images each encoded and stored all of them (CLIP ran twice per
        image); now they take turns a part at a time, each encoding what is still missing. Where the lock
        cannot be taken (a read-only cache, no flock) the run goes on unguarded, as it did before."""
        with contextlib.ExitStack() as lock:
            with contextlib.suppress(OSError):
                self.folder.mkdir(parents=True, exist_ok=True)
                lock.enter_context(waiting_lock(self.folder / FEATURE_CACHE_LOCK, "waiting for another run encoding "
                                                f"into the feature cache {self.folder} ..."))
            self._read_new_parts()
            yield

    def missing(self, keys: list[str]) -> list[int]:
        return [i for i, key in enumerate(keys) if key not in self.rows]

    def add(self, keys: list[str], embeddings: torch.Tensor) -> None:
        import io

        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f"part-{uuid.uuid4().hex}"
        buffer = io.BytesIO()
        np.save(buffer, embeddings.float().numpy())
        digest = hashlib.blake2b(buffer.getvalue(), digest_size=16).hexdigest()
        array_file, keys_file = part.with_suffix(".npy"), part.with_suffix(".json")
        tmp = part.with_suffix(".npy.tmp")
        try:
            tmp.write_bytes(buffer.getvalue())
            replace_durably(tmp, array_file)
            write_json(keys_file, {"keys": keys, "blake2b": digest})
        except BaseException:  # a full disk, an interrupt: nothing of the part is left behind, not even a
            # whole .npy whose keys never came (never read, each run that hit this left one more on the disk)
            for path in (keys_file, keys_file.with_name(keys_file.name + ".tmp"), array_file, tmp):
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        self.rows.update((key, (array_file, row)) for row, key in enumerate(keys))
        self.digests[array_file] = digest
        self.verified.add(array_file)

    def read(self, keys: list[str]) -> torch.Tensor:
        """(len(keys), F) float32, gathered from the memory-mapped parts (call verify first)."""
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            array_file, row = self.rows[key]
            by_file.setdefault(array_file, []).append((i, row))
        out = None
        for array_file, pairs in by_file.items():
            array = np.load(array_file, mmap_mode="r")
            if out is None:
                out = torch.empty(len(keys), array.shape[1])
            targets, rows = zip(*pairs)
            out[list(targets)] = torch.from_numpy(np.ascontiguousarray(array[list(rows)]))
        return out


_DROPPED_PARTS: set[Path] = set()  # parts found damaged in this process, deleted or not


def default_feature_cache_dir() -> Path:
    return cache_home() / "features"


def run_feature_cache(cache_dir: str | None, use_cache: bool = True) -> str | None:
    """The feature cache a run's saved settings name (eval.py, app.py, train.py --resume read it there), where it
    holds features on this machine; else None, the default cache, with a note saying so. The path was made where
    the run trained, maybe by someone else: extraction would create its folders and write there, a place the
    user never named (~/.ssh, said a run folder from elsewhere)."""
    if not cache_dir or not use_cache or any(Path(cache_dir).expanduser().glob("*/part-*.json")):
        return cache_dir or None
    note(f"note: the feature cache the run trained with, {cache_dir}, holds no features on this machine: using "
         f"{default_feature_cache_dir()}", file=sys.stderr)
    return None


def extract_features(captioner, records: list[ImageRecord], batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True, desc: str = "CLIP features", cache_dir: str | Path | None = None,
                     use_cache: bool = True, on_bad_sample: str = "error",
                     bad_samples: list | None = None, take_turns: bool = True, _retry: bool = False) -> torch.Tensor:
    """CLIP features (N, F) for every record, as the adapter sees them.

    With the cache (the default) each image is encoded once per encoder fingerprint, ever: later
    epochs and later runs read the stored embeddings and never decode an image or run CLIP.
    An image that cannot be read raises a UserError naming it (on_bad_sample="error"), or
    (on_bad_sample="skip") gets a row of NaN and an (image_id, reason) entry in `bad_samples`;
    unreadable images are never cached, so a fixed file is picked up next time. `take_turns`: whether to
    take turns with other runs writing into the cache (FeatureCache.writing); False for the processes of one
    launch encoding shards of their own at once (eval.py's), which turns would make encode one after another.
    """
    if not records:
        return torch.empty(0, captioner.config.image_feature_dim)
    failures: dict[int, str] = {}
    if not use_cache:
        embeddings = _encode(captioner, records, batch_size, num_workers, progress, desc, failures, on_bad_sample)
    else:
        cache = FeatureCache(cache_dir or default_feature_cache_dir(), encoder_fingerprint(captioner),
                             captioner.config.image_feature_dim)
        keys = image_keys(records)
        todo = cache.missing(keys)
        unstored: dict[str, torch.Tensor] = {}  # features the cache could not take (a read-only disk)
        pending, done = todo, 0
        # Parts of a few thousand images: an interrupted extraction keeps what it finished.
        while pending:
            with cache.writing() if take_turns else contextlib.nullcontext():
                pending = [i for i in cache.missing(keys) if i not in failures and keys[i] not in unstored]
                if not pending:  # another run encoded the rest while this one waited
                    break
                chunk = pending[:FEATURE_PART_SIZE]
                label = f"{desc} {done + len(chunk):,}/{len(todo):,} new" if len(todo) > FEATURE_PART_SIZE else desc
                chunk_failures: dict[int, str] = {}
                encoded = _encode(captioner, [records[i] for i in chunk], batch_size, num_workers, progress, label,
                                  chunk_failures, on_bad_sample)
                readable = [j for j in range(len(chunk)) if j not in chunk_failures]
                new_keys = [keys[chunk[j]] for j in readable]
                if new_keys and (unstored or not _store_part(cache, new_keys, encoded[readable])):
                    unstored.update(zip(new_keys, encoded[readable]))
                failures.update({chunk[j]: why for j, why in chunk_failures.items()})
            pending, done = pending[len(chunk):], done + len(chunk)
        if not todo and progress:
            print(f"{desc}: {len(keys):,} images read from the feature cache {cache.folder}")
        embeddings = torch.full((len(records), captioner.config.image_feature_dim), float("nan"))
        cached = [i for i in range(len(records)) if i not in failures and keys[i] not in unstored]
        if cache.verify([keys[i] for i in cached]):  # damaged parts, now dropped: extract their images again
            if _retry:  # damaged again between two reads: something else is writing into the cache
                raise UserError(f"the feature cache {cache.folder} is being damaged while this run reads it; "
                                "check the disk, delete that folder and run again")
            return extract_features(captioner, records, batch_size, num_workers, progress, desc, cache_dir, use_cache,
                                    on_bad_sample, bad_samples, take_turns, _retry=True)
        if cached:
            embeddings[cached] = cache.read([keys[i] for i in cached])
        for i in range(len(records)):
            if keys[i] in unstored:
                embeddings[i] = unstored[keys[i]]
    if bad_samples is not None:
        bad_samples.extend((records[i].image_id, why) for i, why in sorted(failures.items()))
    return captioner.finish_features(embeddings)


def _store_part(cache: FeatureCache, keys: list[str], embeddings: torch.Tensor) -> bool:
    """Add a part to the cache; False, with a note, where the cache cannot be written (a read-only
    disk): a cache must never stop a run, which then keeps its features in memory."""
    try:
        cache.add(keys, embeddings)
        return True
    except OSError as error:
        if cache.folder not in _UNWRITABLE_CACHES:  # once per run, not once per split
            _UNWRITABLE_CACHES.add(cache.folder)
            # Every process of a launch meets a read-only cache alike: one line per machine (utils.note).
            note(f"note: the feature cache {cache.folder} cannot be written ({first_line(error)}); features are "
                 "kept in memory for this run only", file=sys.stderr)
        return False


_UNWRITABLE_CACHES: set[Path] = set()  # the cache folders _store_part has already said it cannot write


def drop_unreadable(records: list[ImageRecord], features: torch.Tensor):
    """The records whose features are real and those features: extract_features marks an image
    it could not read (on_bad_sample="skip") with a row of NaN."""
    readable = ~torch.isnan(features).any(dim=1)
    if readable.all():
        return records, features
    return [r for r, ok in zip(records, readable.tolist()) if ok], features[readable]


def _encode(captioner, records: list[ImageRecord], batch_size: int, num_workers: int, progress: bool,
            desc: str, failures: dict, on_bad_sample: str) -> torch.Tensor:
    """Raw CLIP embeddings (N, F), NaN rows for unreadable images (recorded in `failures`).
    Images are decoded and preprocessed in parallel DataLoader workers."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(ImageTensors(records, captioner.processor), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_images, pin_memory=captioner.device.type == "cuda")
    embeddings = torch.full((len(records), captioner.config.image_feature_dim), float("nan"))
    with tqdm(total=len(records), desc=desc, unit="img", disable=not progress) as bar:
        for indices, pixel_values, bad in loader:
            if bad and on_bad_sample == "error":
                raise UserError(f"{bad[0][1]} (training leaves unreadable images out with --on-bad-sample skip)")
            failures.update(bad)
            if pixel_values is not None:
                encoded = captioner.clip_embeddings(pixel_values).cpu()
                for row in (~torch.isfinite(encoded).all(dim=1)).nonzero().flatten().tolist():
                    # e.g. an fp16 CLIP overflowing: never cached, never trained on, and said so
                    why = f"{records[indices[row]].image_id}: CLIP gave NaN or infinite features for this image"
                    if on_bad_sample == "error":
                        raise UserError(f"{why} (training leaves such images out with --on-bad-sample skip)")
                    failures[indices[row]] = why
                    encoded[row] = float("nan")
                embeddings[indices] = encoded
            bar.update(len(indices) + len(bad))
    return embeddings


if __name__ == "__main__":
    from utils import not_a_script

    sys.exit(not_a_script(__file__))
