"""Caption your own images with a trained run.

    python inference.py --checkpoint saved_models/demo photo.jpg other.png
    python inference.py --checkpoint saved_models/demo --strategy beam --num-beams 5 --json *.jpg

Needs only the run folder and the backbones its adapter_config.json names. Prints one caption
per image ("path<TAB>caption"), or one JSON object per line with --json.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dataset import open_image
from eval import add_decoding_flags, decoding_from_args, default_dtype, pick_device
from model import load_captioner
from utils import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to caption")
    parser.add_argument("--checkpoint", required=True, help="run folder (best adapter) or its last/ sub-folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images captioned together")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--compile", action="store_true",
                        help="greedy decoding with a static KV cache and a compiled one-token step (CUDA only; "
                             "pays off when captioning many images in one process)")
    add_decoding_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    decoding = decoding_from_args(args)
    device = pick_device(args.device)
    captioner = load_captioner(args.checkpoint, device=device, dtype=default_dtype(device))
    if args.compile and not captioner.enable_compiled_decoding():
        print("note: --compile needs a CUDA device; decoding eagerly", file=sys.stderr)
    images = [open_image(path) for path in args.images]
    torch.manual_seed(args.seed)
    captions = []
    for start in range(0, len(images), args.batch_size):
        captions += captioner.caption_images(images[start : start + args.batch_size], decoding)
    for path, caption in zip(args.images, captions):
        print(json.dumps({"image": path, "caption": caption}) if args.json else f"{path}\t{caption}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
