"""The offline demo: a synthetic image set and tiny backbones that load like the real ones.

    python demo.py data --out DIR                   # coloured shapes, 5 captions each, train/val/test
    python demo.py backbones --captions DIR --out DIR   # tiny CLIP + tokenizer + pre-trained tiny Qwen3

`python train.py --demo` builds both once (under $CAPTIONER_HOME, default ~/.cache/captioner) and
trains on them through exactly the code path a real run uses. The backbone builder takes any
caption folder (captions.jsonl/.csv, see dataset.py), so you can smoke-test your own data offline:

    python demo.py backbones --captions my_data --out tiny
    python train.py --dataset folder --data-dir my_data --clip-model tiny/clip --lm-model tiny/lm

Why the tiny LM is pre-trained: a frozen random LM cannot be steered by a prefix (adapter
training plateaus); a briefly pre-trained, then frozen, one mirrors the real setting.
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends quietly, not in a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # run_cli turns it back into KeyboardInterrupt

import argparse
import contextlib
import json
import math
import random
import re
import sys
from pathlib import Path

import torch

from utils import (HelpFormatter, UserError, cache_home, nearest_existing, normal_path, run_cli, seed_everything,
                   waiting_lock, whole_number, with_usual_mode)

DEMO_VERSION = 2  # bump when the recipe below changes, so cached assets are rebuilt
BACKBONE_FILES = ("clip/config.json", "clip/model.safetensors", "lm/config.json", "lm/model.safetensors")
EOS_TOKEN = "<|endoftext|>"

SHAPE_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "purple": (140, 60, 170), "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} on {background}",
    "a {colour} {shape} in front of a {background} background",
    "there is a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape} on {background}",
)
SPLIT_SIZES = {"train": 900, "val": 60, "test": 150}
IMAGE_SIZE = 64


# ----------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------

def draw_shape(shape: str, colour: str, background: str, rng: random.Random, size: int = IMAGE_SIZE):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), _jitter(BACKGROUNDS[background], rng))
    draw = ImageDraw.Draw(image)
    # Centred with a little jitter: a random-init tower sees colour anywhere, but shape only
    # where it sits still (see README: the demo measures the pipeline, not vision).
    extent = rng.uniform(0.55, 0.8) * size
    x0 = (size - extent) / 2 + rng.uniform(-3, 3)
    y0 = (size - extent) / 2 + rng.uniform(-3, 3)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = _jitter(SHAPE_COLOURS[colour], rng)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:  # cross: two bars a third of the extent wide
        third = extent / 3
        draw.rectangle((x0 + third, y0, x0 + 2 * third, y0 + extent), fill=fill)
        draw.rectangle((x0, y0 + third, x0 + extent, y0 + 2 * third), fill=fill)
    return image


def _jitter(rgb, rng: random.Random, amount: int = 12):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def demo_captions(colour: str, shape: str, background: str) -> list[str]:
    return [t.format(colour=colour, shape=shape, background=background) for t in TEMPLATES]


def build_demo_data(out_dir: str | Path, seed: int = 0, split_sizes: dict | None = None) -> Path:
    """Write coloured-shape PNGs and captions.jsonl (with splits) in the `folder` format."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # Each image's paraphrases in a random order, as in real data sets, whose captions are written
    # independently: in template order the first caption, which the nearest-neighbour baseline
    # returns, was always the consensus form (its n-grams in 3 of the 5 references), an edge no
    # real data set gives retrieval.
    order_rng = random.Random(seed + 1)
    combos = [(c, s, b) for c in SHAPE_COLOURS for s in SHAPES for b in BACKGROUNDS]
    lines = []
    for split, count in (split_sizes or SPLIT_SIZES).items():
        for i in range(count):
            colour, shape, background = combos[rng.randrange(len(combos))]
            name = f"images/{split}_{i:04d}.png"
            draw_shape(shape, colour, background, rng).save(out_dir / name)
            captions = demo_captions(colour, shape, background)
            order_rng.shuffle(captions)
            lines.append(json.dumps({"image": name, "captions": captions,
                                     "split": split}))
    tmp = out_dir / "captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_dir / "captions.jsonl")  # written last: its presence marks a complete set
    return out_dir


# ----------------------------------------------------------------------------------------------
# Tiny backbones
# ----------------------------------------------------------------------------------------------

def build_tokenizer(captions: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer (Qwen's kind) trained on the captions, EOS = PAD = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    # No progress bar: it takes a moment, and the bar's blank lines would land in bench.py's JSON lines on stdout.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def build_tiny_clip(out_dir: Path, image_size: int = IMAGE_SIZE, seed: int = 0) -> None:
    """A random-init tiny CLIP, saved whole like openai/clip-vit-base-patch32 (vision tower loaded from it)."""
    from transformers import CLIPConfig, CLIPModel

    from model import clip_image_processor

    torch.manual_seed(seed)
    projection_dim = 256
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection_dim,
                         bos_token_id=1, eos_token_id=2, pad_token_id=1),
        # One layer and a wider init keep a random tower's output about the image rather than
        # its constant class embedding (measured: nearest-neighbour colour accuracy 0.90 -> 0.95).
        # Coarse patches, half the image wide (ViT-B/32's are a seventh of its 224 pixels), keep
        # the shape in the pooled feature: on the demo test split a small MLP probe of the feature
        # names the shape 99% right (55% with 8-pixel patches), and 1-nearest-neighbour 95% (53%).
        vision_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                           image_size=image_size, patch_size=image_size // 2, projection_dim=projection_dim,
                           initializer_range=0.1),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(out_dir)
    with_usual_mode(Path(out_dir) / "model.safetensors")  # safetensors writes 0600: other users of a shared cache
    clip_image_processor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out_dir)


def pretrain_tiny_lm(caption_groups: list[list[str]], tokenizer, out_dir: Path, steps: int = 1400, seed: int = 0,
                     progress: bool = True):
    """A tiny Qwen3 taught the captions' language in a few hundred steps, then saved (and later frozen).

    Each training sequence packs 1-5 captions of one image, EOS after each: like a real LM's
    coherent documents, this teaches the model to carry what its context says into the next
    caption. A tiny LM trained on lone captions ignores any prefix, and no adapter can steer it.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    seed_everything(seed)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    lm = Qwen3ForCausalLM(config)
    groups = [[tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in g] for g in caption_groups if g]
    rng = random.Random(seed)
    # A fixed step count, not a time budget, and one thread, so the same seed builds the same LM on any
    # machine (of one instruction set): a CPU's threads split each sum differently, and the LM built on
    # 2 cores drifted from the 1-core one's until the demo run scored CIDEr-D 692 instead of 732.
    with one_torch_thread():
        loss_value = pretraining_steps(lm, groups, eos, steps, rng, progress)
    lm.generation_config.eos_token_id = eos
    lm.generation_config.pad_token_id = eos
    lm.save_pretrained(out_dir)
    with_usual_mode(Path(out_dir) / "model.safetensors")
    tokenizer.save_pretrained(out_dir)
    return {"steps": steps, "final_loss": loss_value}


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside, as many as before after (the caller's own work keeps its threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretraining_steps(lm, groups: list[list[list[int]]], eos: int, steps: int, rng: random.Random,
                      progress: bool) -> float:
    """The pre-training loop: batches of 64 packed caption groups; the last step's loss."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(lm.parameters(), lr=5e-3, weight_decay=0.0)
    loss_value = math.nan
    for step in tqdm(range(steps), desc="pre-training tiny LM", unit="step", disable=not progress, mininterval=1.0):
        for group_ in optimizer.param_groups:  # linear decay
            group_["lr"] = 5e-3 * max(0.05, 1 - step / steps)
        # One group size per batch, not per row: rows then differ only by caption lengths, and the
        # padding that a mix of 1- and 5-caption rows wastes (about half the tokens) is not computed.
        size = rng.randint(1, 5)
        batch = []
        for _ in range(64):
            group = groups[rng.randrange(len(groups))]
            picked = rng.sample(group, k=min(size, len(group)))
            batch.append([token for caption in picked for token in caption])
        longest = max(map(len, batch))
        ids = torch.full((len(batch), longest), eos)
        labels = torch.full((len(batch), longest), -100)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        loss = lm(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
    return loss_value


def build_tiny_backbones(captions_dir: str | Path, out_dir: str | Path, lm_steps: int = 1400, seed: int = 0,
                         progress: bool = True) -> dict:
    """Tiny CLIP at out/clip and tokenizer + tiny Qwen3 at out/lm, from a caption folder's training split."""
    from dataset import DEFAULT_SEED, load_caption_folder

    from transformers.utils import logging as hf_logging

    if process_group_rank() > 0:
        return build_in_a_process_of_its_own(captions_dir, out_dir, lm_steps, seed, progress)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars for one tiny shard: noise
    out_dir = Path(out_dir)
    # Dealt as train.py deals the folder by default (`seed` seeds the builds only): an LM pre-trained on
    # captions of the images train.py then validates and tests on would flatter the smoke test's scores.
    records = load_caption_folder(Path(captions_dir), "train", DEFAULT_SEED)
    captions = [c for r in records for c in r.captions]
    if not captions:
        raise UserError(f"{captions_dir} has no training captions to build a tokenizer from")
    tokenizer = build_tokenizer(captions)
    build_tiny_clip(out_dir / "clip", seed=seed)
    stats = pretrain_tiny_lm([r.captions for r in records], tokenizer, out_dir / "lm", lm_steps, seed, progress)
    if missing := [name for name in BACKBONE_FILES if not (out_dir / name).is_file()]:
        raise UserError(f"building the demo backbones in {out_dir} wrote no {missing[0]}; delete that folder and "
                        "build them again")
    (out_dir / "BUILT").write_text(json.dumps({"version": DEMO_VERSION, "captions": len(captions), **stats,
                                               "files": file_sizes(out_dir)}) + "\n")
    return {"clip": str(out_dir / "clip"), "lm": str(out_dir / "lm"), **stats}


def process_group_rank() -> int:
    """This process's rank in an initialised torch.distributed process group (train.py under a launcher),
    or -1 outside one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def build_in_a_process_of_its_own(captions_dir, out_dir, lm_steps: int, seed: int, progress: bool) -> dict:
    """build_tiny_backbones in a fresh Python process. Inside a process group, transformers' save_pretrained
    writes on its first process only: any other (the first process of another machine, whose
    CAPTIONER_HOME is a disk of its own) saved the backbones without their weights or configs, and marked
    the build complete, so that machine's demo could never load again. The same seeds, the same backbones."""
    import subprocess

    script = ("import json, sys\n"
              f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
              "from utils import run_cli\n"
              "import demo\n"
              f"built = {{}}\n"
              f"code = run_cli(lambda argv: built.update(demo.build_tiny_backbones({str(captions_dir)!r}, "
              f"{str(out_dir)!r}, {lm_steps}, {seed}, {progress})))\n"
              "print(json.dumps(built))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:  # it said why on stderr
        raise UserError(f"building the demo backbones in {out_dir} failed (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` (as a relative path) and its size in bytes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def damaged_backbone_file(backbones: Path) -> str | None:
    """A file the backbone build wrote that is now missing or another size, or None. BUILT alone does
    not say the files are whole: a deleted or truncated one was later loaded as if complete, and the
    user was told to download a model that only this build can make. BUILT files written before it
    listed the files (an older version's cache, kept on upgrading) are checked by the weights files' own
    headers (whole_safetensors)."""
    try:
        listed = json.loads((backbones / "BUILT").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return "BUILT"
    for name, size in listed.items():
        path = backbones / name
        if not path.is_file() or path.stat().st_size != size:
            return name
    # A build marked complete without its weights (one made by a second process of a process group,
    # before build_in_a_process_of_its_own) lists only the files it wrote: it is built again.
    missing = next((name for name in BACKBONE_FILES if not (backbones / name).is_file()), None)
    if missing or listed:
        return missing
    # An older version's BUILT lists no sizes: a weights file cut short there was loaded, and the user told to
    # download or copy a model only this build makes.
    return next((name for name in BACKBONE_FILES if name.endswith(".safetensors")
                 and not whole_safetensors(backbones / name)), None)


def whole_safetensors(path: Path) -> bool:
    """Whether a safetensors file holds all that its header lists (one cut short or grown does not)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return True
    except (SafetensorError, OSError):
        return False


def backbones_built(backbones: Path) -> bool:
    return (backbones / "BUILT").is_file() and damaged_backbone_file(backbones) is None


def demo_root() -> Path:
    return cache_home() / f"demo-v{DEMO_VERSION}"


def in_demo_cache(path: str) -> bool:
    """Whether `path` (a backbone or data folder a run names) is in this version's demo cache: built here from
    seeds, it downloads nothing and reads nothing of anyone else's."""
    return normal_path(path).is_relative_to(demo_root())


def ensure_demo_assets(progress: bool = True) -> dict[str, str]:
    """Build the demo data and backbones once; later calls reuse the cache."""
    root = demo_root()
    blocker = nearest_existing(root)
    if not blocker.is_dir():
        raise UserError(f"the demo is built in {root}, but {blocker} is a file; point CAPTIONER_HOME at a folder")
    data_dir, backbones = root / "data", root / "backbones"
    built = {"data_dir": str(data_dir), "clip_model": str(backbones / "clip"), "lm_model": str(backbones / "lm")}
    if (data_dir / "captions.jsonl").is_file() and backbones_built(backbones):  # each written last: complete
        return built
    try:
        build_missing_assets(root, progress)
    except OSError as error:  # a CAPTIONER_HOME that is not writable here, or a full disk: not a traceback
        where = f": {error.filename}" if error.filename else ""
        raise UserError(f"could not build the demo in {root} ({error.strerror or error}{where}); "
                        "point CAPTIONER_HOME at a folder you can write, with about 20 MB free") from None
    return built


def build_missing_assets(root: Path, progress: bool) -> None:
    data_dir, backbones = root / "data", root / "backbones"
    root.mkdir(parents=True, exist_ok=True)
    # One builder at a time (`make demo` and `python app.py` started together on a fresh machine): a
    # second would rewrite the model files the first has started to train on, and spend the minutes twice.
    with waiting_lock(root / ".build.lock", f"waiting for another process building the demo in {root} ..."):
        if (backbones / "BUILT").is_file() and (damaged := damaged_backbone_file(backbones)):
            print(f"the demo backbones in {backbones} are damaged ({damaged} is missing or changed): building "
                  "them again", flush=True)
            (backbones / "BUILT").unlink()
        if not (data_dir / "captions.jsonl").is_file():
            print(f"building the synthetic demo images in {data_dir} ...", flush=True)
            build_demo_data(data_dir)
        if not (backbones / "BUILT").is_file():
            print(f"building the tiny demo backbones in {backbones} ...", flush=True)
            build_tiny_backbones(data_dir, backbones, progress=progress)


def rebuild_cleared_demo(*paths) -> None:
    """A demo run names backbones and data in the demo cache, which can be cleared like any cache
    (app.py rebuilds it too): where one of `paths` is in it and gone, build it again, the same
    seeded assets, rather than tell the user to put back a folder they cannot get anywhere else."""
    root = demo_root()
    if gone := gone_older_demo_path(*paths):
        raise UserError(f"{gone} is gone: it is in the demo assets of an older version of this project "
                        f"({gone_older_demo_folder(gone)}), which this version no longer builds (it builds "
                        f"{root.name}); train a new demo run with python train.py --demo")
    # Absolute, as in_demo_cache takes them: a run trained under a relative CAPTIONER_HOME names them relative.
    named = [normal_path(path) for path in paths if path]
    ours = [path for path in named if path.is_relative_to(root)]
    if any(not path.exists() for path in ours):
        print(f"the demo assets in {root} are gone (a cleared cache): building them again", file=sys.stderr)
    elif not any(damaged_demo_backbones(path, root) for path in ours):
        return
    # A damaged backbone file says so itself as it is built again (build_missing_assets).
    with contextlib.redirect_stdout(sys.stderr):  # the caller's stdout is its output (inference.py --json)
        ensure_demo_assets()


def damaged_demo_backbones(path: Path, root: Path) -> bool:
    """Whether `path` is one of the demo's backbones and a file of their build is missing or cut short:
    only the build can make them again, so loading it would end in advice to download it."""
    backbones = root / "backbones"
    return path.is_relative_to(backbones) and (backbones / "BUILT").is_file() and not backbones_built(backbones)


def gone_older_demo_folder(path) -> str | None:
    """The demo-v<N> folder of the demo cache that `path` is in, where N is an older DEMO_VERSION; else None."""
    try:
        folder = normal_path(path).relative_to(cache_home()).parts[0]
    except (ValueError, IndexError):
        return None
    match = re.fullmatch(r"demo-v(\d+)", folder)
    return folder if match and int(match.group(1)) < DEMO_VERSION else None


def gone_older_demo_path(*paths) -> str | None:
    """The first of `paths` that a run trained by an older version named in its demo cache (demo-v1 where
    this version builds demo-v2) and that is gone. Such a run was told to put the folder back or pass its
    new place, which the user cannot do: only that older version builds those assets."""
    return next((str(path) for path in paths if path and gone_older_demo_folder(path) and not Path(path).exists()),
                None)


def check_new_folder(out: Path) -> None:
    """--out must be a new or empty folder: the builders write fixed names (captions.jsonl, images/,
    clip/, lm/) and would silently replace a user's own files of those names."""
    folder = nearest_existing(out)
    if folder == out and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new folder")
    if folder == out and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new or empty folder (nothing in it is overwritten)")
    if not folder.is_dir():
        raise UserError(f"--out {out} is inside {folder}, which is a file; give a new folder")


# Each sub-command's own --help (its usage line alone said nothing of what it writes, or what comes next).
DATA_HELP = f"""Write the synthetic coloured-shapes set: images/ and captions.jsonl ({len(TEMPLATES)} captions each,
{SPLIT_SIZES['train']} train / {SPLIT_SIZES['val']} val / {SPLIT_SIZES['test']} test images), a caption folder that
train.py reads with --dataset folder.

    python demo.py data --out shapes
"""
BACKBONES_HELP = """Build a tiny CLIP, a byte-level BPE tokenizer and a briefly pre-trained tiny Qwen3 from the
training captions of a caption folder (captions.jsonl or captions.csv, or Hugging Face imagefolder's metadata
files: whatever train.py --dataset folder reads), to smoke-test your own data offline:

    python demo.py backbones --captions my_data --out tiny
    python train.py --dataset folder --data-dir my_data --clip-model tiny/clip --lm-model tiny/lm --run-name smoke
"""


def build_parser() -> argparse.ArgumentParser:
    from dataset import DEFAULT_SEED

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write the synthetic coloured-shapes data set",
                               description=DATA_HELP, formatter_class=HelpFormatter)
    data.add_argument("--out", required=True, help="folder to write images/ and captions.jsonl into")
    data.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0, help="random seed for the drawings")
    backbones = commands.add_parser("backbones", help="build tiny CLIP + tokenizer + pre-trained tiny Qwen3",
                                    description=BACKBONES_HELP, formatter_class=HelpFormatter)
    backbones.add_argument("--captions", required=True,
                           help="a caption folder (captions.jsonl, captions.csv or imagefolder metadata files)")
    backbones.add_argument("--out", required=True, help="output folder; writes clip/ and lm/ inside")
    backbones.add_argument("--lm-steps", type=whole_number(1), default=1400,
                           help="pre-training steps of the tiny LM (batch 64)")
    # Not the deal's seed: a user who read "dealt with train.py's default --seed (42)" saw "(default: 0)" here.
    backbones.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0,
                           help="seeds the tiny CLIP's weights and the LM's pre-training; the captions it pre-trains "
                                "on are always the training split as train.py deals the folder with its default "
                                f"--seed {DEFAULT_SEED}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_new_folder(Path(args.out))
    if args.command == "data":
        print(f"wrote {build_demo_data(args.out, args.seed)}")
    else:
        built = build_tiny_backbones(args.captions, args.out, args.lm_steps, args.seed)
        print(f"tiny backbones ready: --clip-model {built['clip']} --lm-model {built['lm']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
