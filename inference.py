"""Caption your own images with a trained run.

    python inference.py --checkpoint saved_models/demo photo.jpg other.png
    python inference.py --checkpoint saved_models/demo --strategy beam --num-beams 5 --json *.jpg
    python inference.py --checkpoint saved_models/demo --json photos/ > captions.jsonl      # a whole folder
    find photos -name '*.jpg' | python inference.py --checkpoint saved_models/demo -       # paths on stdin
    python inference.py --checkpoint saved_models/demo --lm-quantization 4bit photo.jpg   # a small GPU
    torchrun --nproc_per_node 8 inference.py --checkpoint saved_models/demo --json photos/ > captions.jsonl  # 8 GPUs

Needs only the run folder and the backbones its adapter_config.json names (said on stderr before they load,
unless --clip-model/--lm-model name them or they are the demo's own). Prints one caption per image
("path<TAB>caption"; a path with a tab, newline, line separator or other control character in its name, or
one that starts with a quote or is not UTF-8, is written as a quoted JSON string), or one JSON object per line
with --json. A file named twice (or by a link too) is captioned each time, under the name given. A folder
stands for the image files under it (by name: .jpg .jpeg .png .bmp .gif .webp .tif .tiff, any case), sorted,
its sub-folders included; other files there are left out with one note. "-" reads more paths from standard
input, one a line (a name with a newline in it must be given as an argument). An image that cannot be read
gets one line on stderr ("error: ..." naming it; {"image", "error"} on stdout with --json), the others are
still captioned, and the exit status is 1. A progress bar (stderr, only on a terminal) counts the images.
Under torchrun (or accelerate launch) each process captions a share of whole batches and process 0 alone prints,
the same lines as one process; each batch is sampled with --seed plus its index, whichever process captions it.
There every process loads the model before any captioning, and all stop in one line unless they loaded the same
adapter and backbones with the same flags.
"""
from __future__ import annotations

import gc
import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly, not in a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # run_cli turns it back into KeyboardInterrupt
    gc.disable()  # until the first batch is captioned: see resume_gc

import argparse
import contextlib
import json
import os
import sys
import unicodedata
from pathlib import Path

import torch

from dataset import IMAGE_SUFFIXES, open_image
from eval import (add_decoding_flags, add_loading_flags, chosen_dtype, decoding_from_args, loaded_as_the_run_names_note,
                  loaded_facts, loading_from_args, pick_device, seed_from_args)
from model import ADAPTER_CONFIG, AdapterConfig, checkpoint_folder, load_captioner
from utils import (HelpFormatter, Processes, UserError, another_process_ended, escape_surrogates, note,
                   resume_gc_after_loading, run_cli, run_folder_argument, stopping_together,
                   usage_errors_once_per_machine, whole_number)

SAME_RUN_EVERYWHERE = ("every machine needs the run folder and the backbones at the same paths, the same files (a "
                       "shared disk, or copies made whole), and the same flags")


class ImagesParser(argparse.ArgumentParser):
    """argparse reads every argument that starts with "-" as a flag, an image named "-x.png" too, and
    its error ("unrecognized arguments: -x.png", or "the following arguments are required: IMAGE" when
    it is the only one) does not say how to pass such a file. Where one of those arguments is a file
    or folder here, the error says so."""

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        files = [arg for arg in getattr(self, "given", []) if arg.startswith("-") and arg != "-"
                 and arg not in self._option_string_actions and os.path.lexists(arg)]
        if files:
            message += (f"; {files[0]} is a file: put -- before the images (inference.py --checkpoint RUN -- "
                        f"{files[0]}) or write ./{files[0]}")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = ImagesParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files to caption, folders of them (searched with their sub-folders), or - to "
                             "read paths from standard input, one a line")
    parser.add_argument("--checkpoint", required=True, type=run_folder_argument,
                        help="run folder (best adapter) or its last/ sub-folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--batch-size", type=whole_number(1), default=32, help="images captioned together")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown only on a terminal)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--compile", action="store_true",
                        help="greedy decoding with a static KV cache and a compiled one-token step (CUDA only; "
                             "pays off when captioning many images in one process)")
    add_loading_flags(parser)
    add_decoding_flags(parser)
    return usage_errors_once_per_machine(parser)  # under torchrun: one usage line, not one per process


def compile_applies(compile: bool, strategy: str) -> bool:
    """Whether --compile (`compile`) changes anything: it compiles the greedy loop's one-token step, and beam search
    and sampling run through transformers' generate, eagerly. Said in a note where it does not (it was silent)."""
    if compile and strategy != "greedy":
        note(f"note: --compile speeds up greedy decoding only; --strategy {strategy} decodes eagerly", file=sys.stderr)
        return False
    return compile


def check_no_empty_argument(arguments: list[str]) -> None:
    """An empty argument (an unset "$PHOTO") is the path "" that Path reads as ".": the current folder, whose
    every image, sub-folders and linked folders included, was captioned instead of an error."""
    if "" in arguments:
        raise UserError('an image argument is empty (an unset shell variable?): name an image, a folder ("." for '
                        'this one) or - for paths on standard input')


def with_stdin_paths(arguments: list[str], stdin=None) -> list[str]:
    """The arguments with "-" replaced by the paths read from standard input, one a line (`find ... |`,
    `ls`'s output, a saved list); blank lines are skipped, other whitespace is part of a name. A file
    named "-" is ./-."""
    if "-" not in arguments:
        return arguments
    if arguments.count("-") > 1:
        raise UserError('"-" (read the image paths from standard input) is given twice; give it once')
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None or stdin.isatty():
        raise UserError('"-" reads image paths from standard input, but none is piped in: pipe a list into it '
                        "(find photos -name '*.jpg' | inference.py --checkpoint RUN -) or name the images")
    raw = getattr(stdin, "buffer", None)  # bytes where there are: a name need not be valid UTF-8
    listed = [(os.fsdecode(line) if raw is not None else line).rstrip("\r\n") for line in (raw or stdin)]
    listed = [line for line in listed if line.strip()]
    if not listed:
        raise UserError('"-" was given but standard input listed no image paths (one a line)')
    at = arguments.index("-")
    return arguments[:at] + listed + arguments[at + 1:]


def image_paths(arguments: list[str]) -> tuple[list[str], dict[str, str]]:
    """The arguments with each folder replaced by the image files under it, sorted, and the folders
    that could not be read (path: why). Linked folders are followed, each real folder once; links
    named as images are kept even when broken, to be reported as missing. Files there without an
    image suffix (notes, .DS_Store, captions) and hidden ones are left out, counted in one note;
    hidden folders (.git, .thumbnails) are not searched."""
    paths, unreadable = [], {}
    for argument in arguments:
        if not os.path.isdir(argument):  # False where stat fails (a folder above it locked): open_image says why
            paths.append(argument)
            continue
        images, left_out = walk_images(Path(argument), unreadable)
        if left_out:
            print(f"note: {argument}: left out {left_out} file{'s' if left_out != 1 else ''} not named as images "
                  f"({' '.join(sorted(IMAGE_SUFFIXES))}) or hidden", file=sys.stderr)
        paths += images
        if not images and str(Path(argument)) not in unreadable:  # reported as a folder with no image files
            paths.append(argument)
    paths += [folder for folder in unreadable if folder not in paths]
    return paths, unreadable


def walk_images(folder: Path, unreadable: dict[str, str]) -> tuple[list[str], int]:
    """(image files under `folder`, sorted; how many other files were left out). Folders that cannot
    be listed go into `unreadable`."""
    images, left_out, seen = [], 0, set()

    def cannot_list(error: OSError) -> None:
        unreadable[error.filename] = f"cannot read folder {error.filename}: {error.strerror or error}"

    for root, folders, files in os.walk(folder, onerror=cannot_list, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            folders[:] = []
            continue
        seen.add(real)
        # Hidden files and folders (macOS's "._photo.jpg", .thumbnails/) are no one's photos.
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                images.append(str(Path(root) / name))
            else:
                left_out += 1
    return sorted(images, key=lambda path: Path(path).parts), left_out


def open_images(paths: list[str], unreadable: dict[str, str]) -> list:
    """Each path's RGB image, or the UserError saying why it cannot be read."""
    opened = []
    for path in paths:
        if path in unreadable:  # a folder that could not be listed
            opened.append(UserError(unreadable[path]))
            continue
        try:
            opened.append(open_image(path))
        except UserError as error:
            if os.path.isdir(path):  # only a folder without image files gets here (see image_paths)
                error = UserError(f"{path} is a folder with no image files in it (looked for "
                                  f"{' '.join(sorted(IMAGE_SUFFIXES))}, sub-folders included)")
            opened.append(error)
    return opened


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun / accelerate launch the processes join first, and each captions a share of the images
    # (each used to caption and print every one); a lone `python inference.py` joins no process group.
    processes = Processes.from_environment("inference.py", args.device)
    try:
        return caption_images(args, processes)
    except RuntimeError as error:  # another process stopped (a signal, a crash) and said why: not a gather traceback
        return another_process_ended(error, "captioning")


def caption_images(args, processes: Processes) -> int:
    """Caption the images args names, this process's share of them under a launcher; returns the exit status."""
    # Read alike by every process: a line one of them stops on (a bad checkpoint) stops all, said once, or names
    # the one process whose machine has no such run folder.
    with stopping_together(processes, SAME_RUN_EVERYWHERE):
        checkpoint = checkpoint_folder(args.checkpoint)
        trained = AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG)  # a bad checkpoint is reported before any image
        decoding = decoding_from_args(args, trained.max_caption_tokens)
        args.seed = seed_from_args(args, [decoding])
        args.compile = compile_applies(args.compile, decoding.strategy)
        device = processes.device or pick_device(args.device)  # a launcher's process: the GPU it was given
        check_no_empty_argument(args.images)
        check_stdout_open()
        # Process 0 alone reads "-" (a pipe's lines go to whichever process reads them) and the folders (their
        # notes said once), and hands the list to the others.
        listed = [image_paths(with_stdin_paths(args.images))] if processes.is_main else []
    paths_to_caption, unreadable = processes.gather(listed)[0]
    # Alone, the backbones are loaded at the first readable image, so a run where every image is bad loads no model
    # at all; under a launcher every process loads them first, to compare what it loaded with the others.
    captioner = loaded_alike(args, checkpoint, device, processes) if processes.count > 1 else None
    # Decoded a batch at a time (memory stays flat however many images).
    with stopping_together(processes), captions_to_stdout():
        failed, held = caption_batches(args, captioner, checkpoint, device, decoding, paths_to_caption, unreadable,
                                       processes)
    # Process 0 printed its share (the first batches) as it went; the others' lines follow, in batch order.
    shares = processes.gather([(failed, held)])
    if processes.is_main:
        with captions_to_stdout():
            for _, lines in shares[1:]:
                write_lines(lines)
    return 1 if sum(failed for failed, _ in shares) else 0


def loaded_alike(args, checkpoint: Path, device, processes: Processes):
    """The captioner, loaded by each of several processes, once all of them are seen to have loaded the same one
    with the same flags. Each machine may read its own copy of the run folder and the backbones: copies that differ
    captioned their shares with different models without a word, and different flags (--max-new-tokens, --json,
    --batch-size) mixed the output or hung. Loaded before any captioning, its notes are said before any caption (a
    process 0 whose share failed or was empty used to say them after every process had captioned)."""
    with stopping_together(processes, SAME_RUN_EVERYWHERE):  # an adapter missing on one machine: named, all stop
        captioner = load_model(args, checkpoint, device)
    # The image arguments may differ: process 0 alone reads them.
    processes.agree(loaded_facts(args, checkpoint, captioner, per_machine=frozenset({"images"})),
                    advice=SAME_RUN_EVERYWHERE)
    return captioner


def check_stdout_open() -> None:
    """Started with stdout closed (`>&-`), Python's sys.stdout is None and print() drops every caption in
    silence: the whole run's captions were lost, and the exit status was 0."""
    if sys.stdout is None:
        raise UserError("standard output is closed, so the captions would be lost: redirect it to a file "
                        "(> captions.txt) or leave it open")


@contextlib.contextmanager
def captions_to_stdout():
    """Standard output that cannot take the captions (redirected to a file on a full disk) ends the run in
    one line, not print's traceback; flushed here, where an error can still be told (at exit it could not).
    A closed pipe (`| head -1`) is run_cli's to end quietly."""
    try:
        yield
        sys.stdout.flush()  # never None here: main refuses a closed stdout
    except BrokenPipeError:
        raise
    except OSError as error:
        raise UserError(f"cannot write the captions to standard output ({error.strerror or error}); free some "
                        "space where it is redirected and run again") from None


def caption_batches(args, captioner, checkpoint: Path, device, decoding, paths_to_caption: list, unreadable: dict,
                    processes: Processes) -> tuple[int, list]:
    """Caption this process's share of the images (all of them, alone) with `captioner` (None: loaded at the first
    readable image), a batch at a time; the main process prints each image's caption (or its error) as it goes,
    another holds its lines for it. Returns how many images failed and the lines held."""
    from tqdm.auto import tqdm

    failed, held = 0, []
    share = processes.shard(len(paths_to_caption), args.batch_size)
    # On stderr, and only on a terminal (disable=None), so --json lines and redirected logs stay clean.
    bar = tqdm(total=len(share), unit="image", file=sys.stderr,
               desc=f"captioning{processes.share_label(len(share), len(paths_to_caption))}",
               disable=True if args.no_progress or len(share) < 2 or not processes.is_main else None)
    for start in range(share.start, share.stop, args.batch_size):
        paths = paths_to_caption[start : start + args.batch_size]
        seed = args.seed + start // args.batch_size  # by the batch's index: whichever process captions it
        captioner, failed_here, lines = caption_batch(args, captioner, checkpoint, device, decoding, paths,
                                                      unreadable, seed)
        failed += failed_here
        if processes.is_main:
            write_lines(lines)
        else:
            held += lines
        # Piped (`inference.py *.jpg > out.tsv`, or into another program) stdout is block-buffered: without
        # this, nothing of a long job shows until 8 KiB of captions pile up or the process ends.
        sys.stdout.flush()
        bar.update(len(paths))
        resume_gc()  # here, where nothing is left of the batch's images but garbage
    bar.close()
    return failed, held


def write_lines(lines: list[tuple[str, str]]) -> None:
    """Print caption_batch's lines: ("stdout", a caption or --json's error object) or ("stderr", a note or error)."""
    from tqdm.auto import tqdm

    for stream, line in lines:
        if stream == "stderr":
            tqdm.write(line, file=sys.stderr)  # above the bar, not through it
        elif stream == "stdout":
            print(line)


def caption_batch(args, captioner, checkpoint: Path, device, decoding, paths: list, unreadable: dict, seed: int):
    """The lines (see write_lines) of each of `paths`: its caption or its error; returns the captioner, loaded here
    for the first readable image, how many of the images failed, and the lines. Sampled after torch.manual_seed(seed).
    """
    failed, lines = 0, []
    opened = open_images(paths, unreadable)
    images = [image for image in opened if not isinstance(image, UserError)]
    if images and captioner is None:
        captioner = load_model(args, checkpoint, device)
    torch.manual_seed(seed)
    captions = iter(captioner.caption_images(images, decoding) if images else [])
    for path, image in zip(paths, opened):
        if isinstance(image, UserError):
            failed += 1
            lines.append(("stderr", f"error: {image}"))
            if args.json:
                lines.append(("stdout", json.dumps({"image": path, "error": str(image)})))
        else:
            caption = next(captions)
            if not caption:  # else a bare "path<TAB>" line, easy to take for a lost caption
                lines.append(("stderr", f"note: the model wrote no words for {path} (it ended the caption at once)"))
            lines.append(("stdout", json.dumps({"image": path, "caption": caption}) if args.json
                          else tab_line(path, caption)))
    return captioner, failed, lines


def load_model(args, checkpoint: Path, device):
    """The captioner args and the run folder `checkpoint` ask for, after the note naming what it loads."""
    from tqdm.auto import tqdm

    loading = loading_from_args(args, checkpoint)  # a setting it refuses stops the run before the note
    if announce := loaded_as_the_run_names_note(checkpoint, args.clip_model, args.lm_model):
        with tqdm.external_write_mode(file=sys.stderr):  # above the bar, not through it
            note(announce, file=sys.stderr)
    captioner = load_captioner(checkpoint, device=device, dtype=chosen_dtype(args.dtype, device), **loading)
    if args.compile and not captioner.enable_compiled_decoding():
        note("note: --compile needs a CUDA device; decoding eagerly", file=sys.stderr)
    return captioner


def resume_gc() -> None:
    """Run as a script, inference.py starts with Python's cyclic garbage collector off (at the top of this file).
    Torch, transformers and the backbones bring some 380,000 objects that live as long as the process, and the
    collector went through all of them six times while they loaded and again at the exit: nearly a third of the
    CPU time of captioning one demo image. After the first batch (the backbones loaded for it, unless its images
    all failed), one collection frees what was left in reference cycles (a bad image's error holds its batch
    through its traceback's frames), the survivors are set aside for good (gc.freeze: later collections and the
    exit pass them over), and the collector goes on as usual. Here, not right after loading: what is frozen is
    never collected, and the batch's images would have been. A no-op when main() is called from Python, and
    once done."""
    if __name__ == "__main__":
        resume_gc_after_loading()


# JSON leaves U+2028 and U+2029 as they are inside a string; \uXXXX escapes are the same string to json.loads.
ESCAPED_LINE_SEPARATORS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})


def tab_line(path: str, caption: str) -> str:
    """The line "path<TAB>caption". A path that holds a tab, a newline or another control character
    (legal in file names) would split or break the line, so it is written as a JSON string instead, in
    quotes; so is one that starts with a quote. So is a name whose bytes are not UTF-8: Python holds them
    as lone surrogates, which a UTF-8 terminal's stdout refuses (a traceback after the captions so far);
    they are written as JSON's \\udcXX escapes, which json.loads and os.fsencode turn back into the name.
    Unicode's line and paragraph separators (U+2028, U+2029) end a line for str.splitlines() and many editors,
    so they are quoted too, and escaped inside the quotes. Captions are single-spaced already."""
    if path.startswith('"') or any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in path):
        path = escape_surrogates(json.dumps(path, ensure_ascii=False)).translate(ESCAPED_LINE_SEPARATORS)
    return f"{path}\t{caption}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
