"""Caption your own images with a trained run.

    python inference.py --checkpoint saved_models/demo photo.jpg other.png
    python inference.py --checkpoint saved_models/demo --strategy beam --num-beams 5 --json *.jpg
    python inference.py --checkpoint saved_models/demo --json photos/ > captions.jsonl      # a whole folder
    python inference.py --checkpoint saved_models/demo --lm-quantization 4bit photo.jpg   # a small GPU

Needs only the run folder and the backbones its adapter_config.json names. Prints one caption
per image ("path<TAB>caption"), or one JSON object per line with --json. A folder stands for the
image files under it (by name: .jpg .jpeg .png .bmp .gif .webp .tif .tiff, any case), sorted, its
sub-folders included; other files there are left out with one note. An image that cannot be read
gets one line on stderr ("error: ..." naming it; {"image", "error"} on stdout with --json), the
others are still captioned, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dataset import IMAGE_SUFFIXES, open_image
from eval import (add_decoding_flags, add_loading_flags, decoding_from_args, default_dtype, loading_from_args,
                  pick_device)
from model import ADAPTER_CONFIG, AdapterConfig, load_captioner
from utils import UserError, run_cli, whole_number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files to caption, or folders of them (searched with their sub-folders)")
    parser.add_argument("--checkpoint", required=True, help="run folder (best adapter) or its last/ sub-folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--batch-size", type=whole_number(1), default=32, help="images captioned together")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--compile", action="store_true",
                        help="greedy decoding with a static KV cache and a compiled one-token step (CUDA only; "
                             "pays off when captioning many images in one process)")
    add_loading_flags(parser)
    add_decoding_flags(parser)
    return parser


def image_paths(arguments: list[str]) -> list[str]:
    """The arguments with each folder replaced by the image files under it, sorted. Files there
    without an image suffix (notes, .DS_Store, captions) are left out, counted in one note; a
    folder with no image file stays, to be reported as a directory like any unreadable path."""
    paths = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            paths.append(argument)
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        # Hidden files and folders (macOS's "._photo.jpg", .thumbnails/) are no one's photos.
        images = [str(p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        if len(images) < len(files):
            left_out = len(files) - len(images)
            print(f"note: {argument}: left out {left_out} file{'s' if left_out != 1 else ''} not named as images "
                  f"({' '.join(sorted(IMAGE_SUFFIXES))}) or hidden", file=sys.stderr)
        paths += images or [argument]
    return paths


def open_images(paths: list[str]) -> list:
    """Each path's RGB image, or the UserError saying why it cannot be read."""
    opened = []
    for path in paths:
        try:
            opened.append(open_image(path))
        except UserError as error:
            if Path(path).is_dir():  # only a folder without image files gets here (see image_paths)
                error = UserError(f"{path} is a folder with no image files in it (looked for "
                                  f"{' '.join(sorted(IMAGE_SUFFIXES))}, sub-folders included)")
            opened.append(error)
    return opened


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    decoding = decoding_from_args(args)
    device = pick_device(args.device)
    checkpoint = Path(args.checkpoint)
    AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG)  # a bad checkpoint is reported before any image
    captioner, failed = None, 0
    paths_to_caption = image_paths(args.images)
    # Decoded a batch at a time (memory stays flat however many images); the backbones are loaded
    # at the first readable image, so a run where every image is bad loads no model at all.
    for start in range(0, len(paths_to_caption), args.batch_size):
        paths = paths_to_caption[start : start + args.batch_size]
        opened = open_images(paths)
        images = [image for image in opened if not isinstance(image, UserError)]
        if images and captioner is None:
            captioner = load_captioner(checkpoint, device=device, dtype=default_dtype(device),
                                       **loading_from_args(args, checkpoint))
            if args.compile and not captioner.enable_compiled_decoding():
                print("note: --compile needs a CUDA device; decoding eagerly", file=sys.stderr)
            torch.manual_seed(args.seed)
        captions = iter(captioner.caption_images(images, decoding) if images else [])
        for path, image in zip(paths, opened):
            if isinstance(image, UserError):
                failed += 1
                print(f"error: {image}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"image": path, "error": str(image)}))
            else:
                caption = next(captions)
                print(json.dumps({"image": path, "caption": caption}) if args.json else f"{path}\t{caption}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
