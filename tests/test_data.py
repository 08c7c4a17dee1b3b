"""Data sources: Hub parquet (Flickr30k schema), Karpathy JSON, caption folders; limits and order."""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hypothesis import given, settings
from hypothesis import strategies as st

from dataset import (PADDING_PAIR, SPLITS, EpochShuffleSampler, dataset_from_data_dir, deal_splits, dealt_names,
                     encoder_fingerprint, extract_features, hash_position, limit_records, load_flickr30k_hub,
                     load_records, one_reading_per_folder, split_deal)
from utils import UserError


def write_image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def test_flickr30k_parquet_export_schema(tmp_path):
    """The Hub loader, pointed at a local parquet file with the nlphuji/flickr30k export's columns."""
    import datasets

    rows = {
        "image": [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)],
        "caption": [[f"caption {i} {j}" for j in range(5)] for i in range(4)],
        "sentids": [[str(5 * i + j) for j in range(5)] for i in range(4)],
        "split": ["train", "val", "test", "train"],
        "img_id": [str(i) for i in range(4)],
        "filename": [f"{1000 + i}.jpg" for i in range(4)],
    }
    table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    path = tmp_path / "flickr.parquet"
    table.to_parquet(str(path))
    train = load_flickr30k_hub("train", str(path))
    assert [r.image_id for r in train] == ["1000.jpg", "1003.jpg"]
    assert train[1].captions == [f"caption 3 {j}" for j in range(5)]
    assert train[0].open().size == (16, 16) and train[0].open().mode == "RGB"
    assert [r.image_id for r in load_records("flickr30k", "test", hub_data_files=str(path))] == ["1002.jpg"]


def test_flickr30k_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    import dataset

    unreachable = str(tmp_path / "absent" / "*.parquet")  # as the Hub's export looks with no network
    monkeypatch.setattr(dataset, "FLICKR30K_PARQUET", unreachable)
    with pytest.raises(UserError, match="without network use --dataset karpathy .*--demo"):
        load_flickr30k_hub("train", unreachable)


def test_karpathy_json_with_restval(tmp_path):
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        write_image(tmp_path / "images" / "train2014" / f"{i}.jpg")
        images.append({"filepath": "train2014", "filename": f"{i}.jpg", "cocoid": 100 + i, "split": split,
                       "sentences": [{"raw": f"A photo {i} .", "tokens": ["a"]}, {"raw": f"  another   {i} "}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    train = load_records("karpathy", "train", str(tmp_path))
    assert [r.image_id for r in train] == ["100", "101"]  # COCO's restval is trained on
    assert train[0].captions == ["A photo 0 .", "another 0"]
    assert train[0].open().size == (32, 32)
    assert [r.image_id for r in load_records("karpathy", "test", str(tmp_path))] == ["103"]


@pytest.mark.parametrize("source", ["karpathy", "folder"])
def test_a_caption_file_is_read_with_the_garbage_collector_paused(tmp_path, monkeypatch, source):
    """COCO's Karpathy file read with the collector on took three times as long (utils.gc_paused): it is off while
    a local caption file is read, and on again after, a failed read included."""
    import gc

    import dataset

    seen = []

    def loader(*args):
        seen.append(gc.isenabled())
        raise UserError("the file says no")

    monkeypatch.setattr(dataset, {"karpathy": "load_karpathy", "folder": "load_caption_folder"}[source], loader)
    assert gc.isenabled()
    with pytest.raises(UserError, match="the file says no"):
        load_records(source, "train", str(tmp_path))
    assert seen == [False] and gc.isenabled()


def test_a_caption_file_read_with_the_collector_already_off_leaves_it_off():
    """The scripts turn the collector off at their top while loading, and resume_gc_after_loading turns it back on
    once (freezing what loading left): a read in between that turned it on undid that."""
    import gc

    from utils import gc_paused

    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_image_keys_resolve_links_as_path_resolve_does(tmp_path, monkeypatch):
    """image_keys resolves each folder once, not each image's whole path: a key still names the file a link leads
    to, through a linked folder, a linked file, a link to a link, a relative path and a hard link alike."""
    import dataset
    from dataset import ImageRecord, image_keys

    write_image(tmp_path / "real" / "a.png")
    write_image(tmp_path / "real" / "b.png", (0, 90, 0))
    write_image(tmp_path / "other" / "c.png", (0, 0, 90))
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "to_c.png").symlink_to(tmp_path / "other" / "c.png")
    (tmp_path / "real" / "to_to_c.png").symlink_to("to_c.png")
    os.link(tmp_path / "real" / "b.png", tmp_path / "other" / "hard_b.png")
    monkeypatch.chdir(tmp_path / "other")
    paths = [tmp_path / "real" / "a.png", tmp_path / "linked" / "a.png", tmp_path / "linked" / "b.png",
             tmp_path / "linked" / "to_c.png", tmp_path / "real" / "to_to_c.png", Path("c.png"),
             Path("hard_b.png"), tmp_path / "linked" / ".." / "other" / "c.png"]
    records = [ImageRecord(str(i), ["a caption"], "train", path=path) for i, path in enumerate(paths)]
    stats = [path.stat() for path in paths]
    keys = image_keys(records)
    assert keys == [f"file|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
                    for path, stat in zip(paths, stats)]
    other = (tmp_path / "other" / "c.png").resolve()  # tmp_path itself may be reached through a link (macOS /var)
    assert keys[0] == keys[1] and keys[3] == keys[4] == keys[5] == keys[7] == f"file|{other}|" \
        f"{stats[5].st_size}|{stats[5].st_mtime_ns}|{stats[5].st_ctime_ns}"
    (tmp_path / "real" / "a.png").unlink()
    with pytest.raises(FileNotFoundError):  # as Path.stat said it
        dataset.image_key(records[0])


@pytest.mark.parametrize("through", ["gone", "a.png"])
def test_an_image_key_through_a_missing_folder_or_a_file_fails_as_path_stat_does(tmp_path, through):
    """os.path.realpath, which image_keys resolves each folder with, takes gone/.. (or a.png/..) as its letters say;
    the kernel finds no file at real/gone/../a.png. The key named real/a.png, so the cache could answer for a path no
    one can open; Path.stat, which the keys stood on, says it is not there."""
    from dataset import ImageRecord, image_keys

    write_image(tmp_path / "real" / "a.png")
    path = tmp_path / "real" / through / ".." / "a.png"
    error = FileNotFoundError if through == "gone" else NotADirectoryError
    with pytest.raises(error):
        path.stat()
    with pytest.raises(error):
        image_keys([ImageRecord("a", ["a caption"], "test", path=path)])


def test_karpathy_image_listed_in_two_splits_is_an_error_and_a_repeat_is_one_image(tmp_path):
    write_image(tmp_path / "images" / "a.jpg")
    entry = {"filename": "a.jpg", "imgid": 7, "sentences": [{"raw": "a dog"}]}
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"images": [{**entry, "split": "train"}, {**entry, "split": "test"}]}))
    with pytest.raises(UserError, match=r"a.jpg is listed in split train \(images\[0\]\) and in split test "
                                        r"\(images\[1\]\)"):
        load_records("karpathy", "train", str(tmp_path))
    # Listed twice in training splits (restval is training data), it is one image with both captions.
    karpathy.write_text(json.dumps({"images": [{**entry, "split": "train"},
                                               {**entry, "split": "restval", "sentences": [{"raw": "a cat"}]}]}))
    [record] = load_records("karpathy", "train", str(tmp_path))
    assert record.captions == ["a dog", "a cat"]

def test_caption_folder_csv_groups_captions_and_assigns_splits(tmp_path):
    lines = ["image,caption"]
    for i in range(20):
        write_image(tmp_path / f"img{i}.png")
        lines += [f"img{i}.png,first caption {i}", f'img{i}.png,"second, with comma {i}"', f"img{i}.png,   "]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    splits = {s: load_records("folder", s, str(tmp_path), seed=3) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [17, 2, 1]  # these names' hashes under seed 3
    every = [r.image_id for s in splits.values() for r in s]
    assert sorted(every) == sorted(f"img{i}.png" for i in range(20))  # each image in exactly one split
    assert splits["train"][0].captions[1].startswith("second, with comma")
    assert all(len(r.captions) == 2 for r in splits["train"])  # the blank caption is dropped
    again = load_records("folder", "val", str(tmp_path), seed=3)
    assert [r.image_id for r in again] == [r.image_id for r in splits["val"]]


def test_a_training_image_left_out_for_its_missing_file_is_not_noted_as_holding_most_captions(tmp_path, capsys):
    """The note counts the pairs training will have: it named an image whose file was missing (skipped, so
    none of its captions was trained on), and counted its captions among the total."""
    for name in ("a.png", "c.png", "d.png"):
        write_image(tmp_path / name)
    spread = {"a.png": 7, "b.png": 300, "c.png": 5, "d.png": 6}
    write_jsonl_captions(tmp_path, [{"image": name, "captions": [f"caption {i}" for i in range(count)], "split": "train"}
                                    for name, count in spread.items()])
    bad_samples = []
    assert len(load_records("folder", "train", str(tmp_path), on_bad_sample="skip", bad_samples=bad_samples)) == 3
    assert [image for image, _ in bad_samples] == ["b.png"]
    assert "b.png has 300" not in capsys.readouterr().out


image_names = st.sets(st.text(min_size=1, max_size=6), min_size=3, max_size=40)
fractions = st.sampled_from([0.05, 0.2])  # 0.05 as load_caption_folder deals; 0.2 fills val and test by hash more often


def stood_in(deal: dict, seed: int, fraction: float) -> set:
    """The images held out though their hash says train: stand-ins for an empty val or test."""
    return {name for name, split in deal.items() if split != "train" and hash_position(seed, name) >= 2 * fraction}


@settings(max_examples=300, deadline=None)
@given(first=image_names, added=image_names, seed=st.integers(0, 2**32 - 1), fraction=fractions)
def test_the_hash_deal_never_moves_a_train_image_to_val_or_test_when_images_are_added(first, added, seed, fraction):
    """What `eval.py` relies on to score an older run on a grown caption folder: its test split holds no image
    the run trained on. Images keep their split, but for the stand-ins a folder with no image hashed into val
    (or test) holds out, which may go back to train or to the other held-out split."""
    before = deal_splits(sorted(first), seed, held_out_fraction=fraction)
    after = deal_splits(sorted(first | added), seed, held_out_fraction=fraction)
    assert not {name for name in first if before[name] == "train" and after[name] != "train"}
    moved = {name for name in first if before[name] != after[name]}
    assert moved <= stood_in(before, seed, fraction)
    assert stood_in(after, seed, fraction) <= stood_in(before, seed, fraction) | (added - first)
    # At least one of each from three images on, but stand-ins come from train: 3 images all hashed into test
    # leave val empty.
    assert {"val", "test"} <= set(after.values()) or "train" not in after.values()
    trained_from = min((hash_position(seed, n) for n in first if before[n] == "train"), default=1.0)
    assert all(hash_position(seed, name) < trained_from for name, split in after.items() if split != "train")


@settings(max_examples=300, deadline=None)
@given(first=image_names, added=st.sets(st.text(min_size=1, max_size=6), max_size=10), data=st.data(),
       seed=st.integers(0, 2**32 - 1), fraction=fractions)
def test_the_hash_deal_moves_only_stand_ins_when_images_are_removed(first, added, data, seed, fraction):
    """Removing images moves no image hashed into a split; a train image is held out afterwards only as a
    stand-in for a val or test split the removal emptied, past where the first deal trained (eval.py refuses
    that)."""
    removed = data.draw(st.sets(st.sampled_from(sorted(first)), max_size=len(first) - 3))
    now = (first - removed) | added
    before = deal_splits(sorted(first), seed, held_out_fraction=fraction)
    after = deal_splits(sorted(now), seed, held_out_fraction=fraction)
    moved = {name for name in first & now if before[name] != after[name]}
    assert moved <= stood_in(before, seed, fraction) | stood_in(after, seed, fraction)
    trained_from = min((hash_position(seed, n) for n in first if before[n] == "train"), default=1.0)
    newly_held = {name for name in first & now if before[name] == "train" and after[name] != "train"}
    assert all(hash_position(seed, name) >= trained_from for name in newly_held)
    assert newly_held <= stood_in(after, seed, fraction)


def test_the_hash_deal_gives_an_image_its_split_whatever_unicode_form_names_it():
    """A caption file saved on macOS spells "é" as e + accent (NFD), one name to a reader and to the file system:
    re-saved so, the images must keep their splits, or the test split would hold images the run trained on."""
    names = [f"caf\u00e9 {i}.png" for i in range(100)]
    respelled = [unicodedata.normalize("NFD", name) for name in names]
    assert respelled != names
    assert list(deal_splits(respelled, seed=0).values()) == list(deal_splits(names, seed=0).values())


def test_where_no_image_hashes_into_val_or_test_the_lowest_train_image_stands_in_for_val_the_next_for_test():
    """img0, img1, img2 hash to 0.34, 0.86, 0.99 under seed 42, none under 0.1. Which stand-in takes which split is
    part of the deal: swapped, a small folder's runs would be scored on the image they were selected by."""
    assert deal_splits(["img2.png", "img1.png", "img0.png"], 42) == {
        "img0.png": "val", "img1.png": "test", "img2.png": "train"}


def test_the_shuffle_deal_holds_out_one_of_each_from_three_images_whatever_the_order_of_the_rows():
    """Runs saved before the hash deal read their folder with the shuffle deal: it must deal as it did then, from
    the names alone (rows reordered in the caption file re-dealt them), with val and test never empty."""
    names = [f"img{i}.png" for i in range(40)]
    assert deal_splits(names[::-1], 42, "shuffle") == deal_splits(names, 42, "shuffle")
    assert sorted(deal_splits(["a.png", "b.png", "c.png"], 0, "shuffle").values()) == ["test", "train", "val"]


def test_a_caption_folder_that_grows_keeps_each_images_split(tmp_path):
    """Through the files: 60 images without a split, then 60 more. Under the shuffle deal, which runs saved
    before the hash deal keep, the second deal moved training images into val and test."""
    def write_folder(count):
        for i in range(count):
            write_image(tmp_path / f"img{i}.png")
        write_jsonl_captions(tmp_path, [{"image": f"img{i}.png", "caption": f"picture {i}"} for i in range(count)])

    def splits(folder_split="hash"):
        return {r.image_id: s for s in SPLITS for r in load_records("folder", s, str(tmp_path), 42,
                                                                     folder_split=folder_split)}
    write_folder(60)
    before, shuffled_before = splits(), splits("shuffle")
    write_folder(120)
    after, shuffled_after = splits(), splits("shuffle")
    assert {name: after[name] for name in before} == before
    assert sum(after[name] != "train" for name in after) > sum(before[name] != "train" for name in before)
    assert any(shuffled_before[name] == "train" != shuffled_after[name] for name in shuffled_before)


@pytest.mark.parametrize("names", [["img20.png", "img23.png", "img31.png"],  # val, test, val by their hashes
                                   ["img20.png", "img31.png", "img136.png", "img0.png"]])  # val x3, img0 stands in
def test_a_small_folder_dealt_no_training_image_says_why_and_what_to_do(tmp_path, names):
    """The hash deal can leave 3 or 4 images without a split no training image; the train split used to load
    empty, which train.py reported as "no training images with captions found"."""
    for name in names:
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [{"image": name, "caption": f"picture {name}"} for name in names])
    assert "train" not in deal_splits(names, 42).values()
    with pytest.raises(UserError, match=rf"no image is left to train on: its {len(names)} images without a split "
                                        r"were all dealt to val and test .* add images .* name each image's split"):
        load_records("folder", "train", str(tmp_path), seed=42)
    assert load_records("folder", "val", str(tmp_path), seed=42)  # the held-out splits load as before
    # An image whose row names train is data to train on; so is a folder of 1 or 2 images (all trained on).
    write_image(tmp_path / "named.png")
    write_jsonl_captions(tmp_path, [{"image": name, "caption": f"picture {name}"} for name in names]
                         + [{"image": "named.png", "caption": "named", "split": "train"}])
    assert [r.image_id for r in load_records("folder", "train", str(tmp_path), seed=42)] == ["named.png"]
    write_jsonl_captions(tmp_path, [{"image": name, "caption": f"picture {name}"} for name in names[:2]])
    assert len(load_records("folder", "train", str(tmp_path), seed=42)) == 2


def test_missing_images_are_reported_up_front(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "gone.png", "captions": ["x"], "split": "train"}))
    with pytest.raises(UserError, match="missing"):
        load_records("folder", "train", str(tmp_path))


def test_train_limit_is_seeded_and_stable(tiny):
    records = load_records("folder", "train", tiny["data_dir"])
    a, b = limit_records(records, 10, seed=1), limit_records(records, 10, seed=1)
    assert len(a) == 10 and [r.image_id for r in a] == [r.image_id for r in b]
    assert [r.image_id for r in limit_records(records, 10, seed=2)] != [r.image_id for r in a]
    assert limit_records(records, 0, seed=1) == records


def test_a_limited_split_keeps_the_caption_files_order():
    """--train-limit, --val-limit, eval.py --limit draw a subset by the seed, but list it as the caption file does:
    predictions.jsonl and the report follow the file, not the draw."""
    from dataset import ImageRecord

    records = [ImageRecord(f"{i:03d}.png", ["x"], "test") for i in range(100)]
    drawn = [r.image_id for r in limit_records(records, 10, seed=1)]
    assert len(set(drawn)) == 10 and drawn == sorted(drawn)


def test_epoch_order_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=7)
    sampler.set_epoch(3)
    first = list(sampler)
    other = EpochShuffleSampler(50, seed=7)
    other.set_epoch(3)
    assert list(other) == first and sorted(first) == list(range(50))
    other.set_epoch(4)
    assert list(other) != first


@pytest.mark.parametrize("pairs", [150, 5])  # 19 batches of 8 for 2 processes; fewer pairs than one batch
def test_two_processes_take_the_pairs_of_one_process_steps_none_twice(pairs):
    """Accelerate deals whole batches to the processes in turn and fills a short last round with
    pairs from the epoch's start again; the padded epoch gives each step of 2 processes x 8 the
    pairs of one process's step of 16, each once (the rest of the rows are padding)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    one = [sorted(batch) for batch in BatchSampler(EpochShuffleSampler(pairs, seed=3), 16, False)]
    sampler = BatchSampler(EpochShuffleSampler(pairs, seed=3, multiple=16), 8, False)  # as make_train_loader
    ranks = [list(BatchSamplerShard(sampler, 2, rank)) for rank in (0, 1)]  # as accelerator.prepare
    two = [sorted(i for batch in step for i in batch if i != PADDING_PAIR) for step in zip(*ranks, strict=True)]
    assert two == one


def test_demo_commands_build_data_and_loadable_backbones(tmp_path, capsys):
    """`python demo.py data` and `python demo.py backbones`, then the backbones through --clip/--lm flags' loader."""
    import demo
    from model import AdapterConfig, build_captioner

    assert demo.main(["data", "--out", str(tmp_path / "shapes")]) == 0
    counts = {s: len(load_records("folder", s, str(tmp_path / "shapes"))) for s in ("train", "val", "test")}
    assert counts == demo.SPLIT_SIZES
    assert demo.main(["backbones", "--captions", str(tmp_path / "shapes"), "--out", str(tmp_path / "tiny"),
                      "--lm-steps", "3"]) == 0
    assert "--clip-model" in capsys.readouterr().out
    umask = os.umask(0o022)
    os.umask(umask)
    for weights in ("clip/model.safetensors", "lm/model.safetensors"):  # safetensors' 0600 hid them from others
        assert (tmp_path / "tiny" / weights).stat().st_mode & 0o777 == 0o666 & ~umask, weights
    captioner = build_captioner(AdapterConfig(clip_model=str(tmp_path / "tiny" / "clip"),
                                              lm_model=str(tmp_path / "tiny" / "lm")))
    tokens = captioner.tokenizer("a red circle on a white background", add_special_tokens=False)["input_ids"]
    assert captioner.tokenizer.decode(tokens) == "a red circle on a white background"
    assert captioner.config.eos_token_id == captioner.tokenizer.convert_tokens_to_ids(demo.EOS_TOKEN)
    # BUILT lists what the build wrote with its sizes: a weights file cut short afterwards is found, not loaded.
    assert demo.backbones_built(tmp_path / "tiny")
    weights = tmp_path / "tiny" / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert demo.damaged_backbone_file(tmp_path / "tiny") == "lm/model.safetensors"



def test_the_demo_lm_is_the_same_whatever_threads_torch_has(tmp_path):
    """Threads split a CPU's sums differently: the tiny LM pre-trained on 2 threads drifted from the one on 1
    until the same `python train.py --demo` scored CIDEr-D 692 on one machine and 732 on another."""
    import demo
    from safetensors.torch import load_file

    groups = [[f"a {colour} {shape} on a {back} background" for back in ("white", "black", "gray")]
              for colour in ("red", "blue", "green", "yellow") for shape in ("circle", "square", "cross")]
    tokenizer = demo.build_tokenizer([caption for group in groups for caption in group])
    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            demo.pretrain_tiny_lm(groups, tokenizer, tmp_path / str(count), steps=20, progress=False)
            assert torch.get_num_threads() == count  # the caller's threads, given back
            weights.append(load_file(tmp_path / str(count) / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def template_order(captions: list[str]) -> tuple[int, ...]:
    """Which of the demo's caption templates each caption of an image follows, in the image's order."""
    import re

    import demo

    patterns = [re.compile(re.escape(template).replace(r"\{colour\}", r"\w+").replace(r"\{shape\}", r"\w+")
                           .replace(r"\{background\}", r"\w+")) for template in demo.TEMPLATES]
    return tuple(next(i for i, pattern in enumerate(patterns) if pattern.fullmatch(caption)) for caption in captions)


def test_the_demo_data_is_the_same_for_a_seed_and_its_captions_come_in_an_image_s_own_order(tmp_path):
    """The demo cache is rebuilt whenever it is cleared, and must come back the same (README: the build is
    seeded), or a demo run's figures change with every rebuild. Each image's paraphrases are shuffled: in template
    order the first caption, which the nearest-neighbour baseline returns, was always the consensus form."""
    import demo

    sizes = {"train": 12, "test": 2}
    first, again = (demo.build_demo_data(tmp_path / name, seed=3, split_sizes=sizes) for name in ("a", "b"))
    other = demo.build_demo_data(tmp_path / "c", seed=4, split_sizes=sizes)
    assert (first / "captions.jsonl").read_text() == (again / "captions.jsonl").read_text()
    images = sorted(path.name for path in (first / "images").iterdir())
    assert len(images) == 14 and images == sorted(path.name for path in (again / "images").iterdir())
    assert all((first / "images" / name).read_bytes() == (again / "images" / name).read_bytes() for name in images)
    assert (other / "captions.jsonl").read_text() != (first / "captions.jsonl").read_text()
    orders = [template_order(json.loads(line)["captions"]) for line in (first / "captions.jsonl").open()]
    assert all(sorted(order) == list(range(len(demo.TEMPLATES))) for order in orders)
    assert len({order[0] for order in orders}) > 1, orders  # the first caption is not always one template's


def test_the_tiny_clip_is_the_same_for_a_seed(tmp_path):
    """Rebuilt after a cleared cache, or on each machine of a run, the demo's CLIP must be the one its runs'
    adapters were trained on."""
    import demo
    from safetensors.torch import load_file

    for name in ("a", "b"):
        demo.build_tiny_clip(tmp_path / name, seed=0)
    first, again = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)


def test_building_the_demo_tokenizer_writes_nothing_to_stdout(capfd):
    # bench.py builds one for its cold-start run folder, and its stdout must stay pure JSON lines.
    from demo import build_tokenizer

    tokenizer = build_tokenizer(["a red circle on a white background", "a blue square on a grey background"] * 50)
    assert tokenizer("a red square").input_ids
    assert capfd.readouterr().out == ""


def test_demo_commands_never_overwrite_a_users_folder(tmp_path, capsys, monkeypatch):
    import demo
    from utils import run_cli

    mine = tmp_path / "my_data"
    mine.mkdir()
    (mine / "captions.jsonl").write_text('{"image": "a.jpg", "caption": "mine"}\n')
    assert run_cli(demo.main, ["data", "--out", str(mine)]) == 2
    assert "is not empty; give a new or empty folder" in capsys.readouterr().err
    assert (mine / "captions.jsonl").read_text() == '{"image": "a.jpg", "caption": "mine"}\n'
    assert run_cli(demo.main, ["data", "--out", str(mine / "captions.jsonl")]) == 2
    assert "is a file; give a new folder" in capsys.readouterr().err
    # A CAPTIONER_HOME that is a file: one line, not NotADirectoryError from deep inside the build.
    monkeypatch.setenv("CAPTIONER_HOME", str(mine / "captions.jsonl"))
    with pytest.raises(UserError, match="is a file; point CAPTIONER_HOME at a folder"):
        demo.ensure_demo_assets(progress=False)


def test_two_processes_starting_the_demo_at_once_build_it_once(tmp_path, capsys, monkeypatch):
    import threading
    import time

    import demo

    built, first_started = [], threading.Event()

    def slow_data(out_dir, *args, **kwargs):  # the real builders take minutes; these mark what they wrote
        first_started.set()
        time.sleep(1.0)
        built.append("data")
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "captions.jsonl").write_text("")

    def backbones(data_dir, out_dir, **kwargs):
        built.append("backbones")
        for name in demo.BACKBONE_FILES:
            (Path(out_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / name).write_text("")
        (Path(out_dir) / "BUILT").write_text(json.dumps({"files": demo.file_sizes(Path(out_dir))}))  # as builds do

    monkeypatch.setattr(demo, "build_demo_data", slow_data)
    monkeypatch.setattr(demo, "build_tiny_backbones", backbones)
    results = []
    first = threading.Thread(target=lambda: results.append(demo.ensure_demo_assets(progress=False)))
    first.start()
    first_started.wait(10)
    results.append(demo.ensure_demo_assets(progress=False))  # a second start while the first builds
    first.join()
    assert built == ["data", "backbones"] and results[0] == results[1]
    assert f"waiting for another process building the demo in {demo.demo_root()}" in capsys.readouterr().err


def fake_demo_builders(monkeypatch, built: list) -> None:
    """demo's two builders, replaced by ones that write the files the real ones mark their work done with
    (captions.jsonl; the backbone files and a BUILT listing them) and record each build in `built`."""
    import demo

    def data(out_dir, *args, **kwargs):
        built.append("data")
        (Path(out_dir) / "images").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "captions.jsonl").write_text("")

    def backbones(data_dir, out_dir, **kwargs):
        built.append("backbones")
        for name in demo.BACKBONE_FILES:
            (Path(out_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / name).write_text("{}")
        (Path(out_dir) / "BUILT").write_text(json.dumps({"version": demo.DEMO_VERSION,
                                                         "files": demo.file_sizes(Path(out_dir))}))

    monkeypatch.setattr(demo, "build_demo_data", data)
    monkeypatch.setattr(demo, "build_tiny_backbones", backbones)


def test_each_demo_asset_cleared_damaged_or_left_half_built_is_built_again_alone(monkeypatch, capsys):
    """The demo cache is only a cache: data cleared (or a build of it stopped before its captions.jsonl, the
    images half there) or a backbone file cut short is built again at the next start, and only that part."""
    import shutil

    import demo

    built = []
    fake_demo_builders(monkeypatch, built)
    assets = demo.ensure_demo_assets(progress=False)
    assert built == ["data", "backbones"] and demo.ensure_demo_assets(progress=False) == assets
    data_dir, backbones = Path(assets["data_dir"]), demo.demo_root() / "backbones"
    shutil.rmtree(data_dir)
    demo.ensure_demo_assets(progress=False)
    (data_dir / "captions.jsonl").unlink()  # a build stopped part way: images/, no captions.jsonl
    demo.ensure_demo_assets(progress=False)
    assert built == ["data", "backbones", "data", "data"]
    (backbones / "lm" / "model.safetensors").write_text("{")
    capsys.readouterr()
    demo.ensure_demo_assets(progress=False)
    assert built[4:] == ["backbones"] and demo.backbones_built(backbones)
    assert "(lm/model.safetensors is missing or changed): building them again" in capsys.readouterr().out


@pytest.mark.slow  # two tiny demo builds in two launched processes: about 15 s on 2 idle cores, 50 s on busy ones
def test_demo_backbones_built_by_a_second_process_of_a_process_group_are_whole(tmp_path):
    """Inside a process group transformers' save_pretrained writes on its first process only: the demo
    built by the first process of machine 1 (its CAPTIONER_HOME a disk of its own) had neither weights
    nor configs, was marked complete all the same, and never loaded there again. Two machines (torchrun
    --nnodes 2 on this one) each build it into a folder of their own: the same, whole backbones."""
    import demo
    from safetensors.torch import load_file
    from test_resilience import launch_two_machines

    script = tmp_path / "build.py"
    script.write_text("import os, sys\n"
                      "import demo\n"
                      "from utils import join_processes\n"
                      "join_processes()\n"
                      "out = os.path.join(sys.argv[1], 'machine-' + os.environ['RANK'])\n"
                      "data = demo.build_demo_data(os.path.join(out, 'data'), split_sizes={'train': 8})\n"
                      "demo.build_tiny_backbones(data, os.path.join(out, 'backbones'), lm_steps=2, progress=False)\n")
    for machine in launch_two_machines(script, [[str(tmp_path)]] * 2, timeout=180):
        assert machine.returncode == 0, machine.stderr[-3000:]
    built = [tmp_path / f"machine-{rank}" / "backbones" for rank in (0, 1)]
    assert [demo.damaged_backbone_file(folder) for folder in built] == [None, None]
    for name in ("clip/model.safetensors", "lm/model.safetensors"):  # seeded: the same, whoever built them
        first, second = load_file(built[0] / name), load_file(built[1] / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name


def test_a_demo_build_marked_complete_without_its_weights_counts_as_damaged(tmp_path):
    """What such a build left (BUILT listing only the tokenizer and preprocessor files it wrote) is built
    again at the next start, instead of failing to load for good."""
    import demo

    for name in ("clip/preprocessor_config.json", "lm/tokenizer.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "BUILT").write_text(json.dumps({"version": 2, "files": demo.file_sizes(tmp_path)}))
    assert demo.damaged_backbone_file(tmp_path) == "clip/config.json"
    assert not demo.backbones_built(tmp_path)


def test_a_demo_build_record_that_does_not_parse_or_a_file_of_another_size_counts_as_damaged(tmp_path):
    """BUILT is written last, but not atomically: a torn one says nothing about the files, and the build is
    made again. A file whose size is not the one built (cut short, or written over) is damaged too."""
    import demo

    for name in demo.BACKBONE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    record = json.dumps({"version": demo.DEMO_VERSION, "files": demo.file_sizes(tmp_path)})
    (tmp_path / "BUILT").write_text(record)
    assert demo.backbones_built(tmp_path)
    for torn in (record[: len(record) // 2], "[]"):
        (tmp_path / "BUILT").write_text(torn)
        assert demo.damaged_backbone_file(tmp_path) == "BUILT", torn
    (tmp_path / "BUILT").write_text(record)
    (tmp_path / "lm" / "config.json").write_text('{"hidden_size": 64}')  # longer than built
    assert demo.damaged_backbone_file(tmp_path) == "lm/config.json"


def test_an_older_versions_demo_build_record_is_checked_by_the_weights_files_headers(tmp_path):
    """A demo cache built before BUILT listed its files (an upgrade keeps it) was trusted whole: its LM's weights
    cut short were loaded, and the user told to "download or copy that model again", which only the build makes."""
    import demo
    from safetensors.torch import save_file

    for name in demo.BACKBONE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file({"weight": torch.zeros(4)}, str(tmp_path / name))
        else:
            (tmp_path / name).write_text("{}")
    # BUILT as versions before 2026-11-30 wrote it: no "files" with their sizes.
    (tmp_path / "BUILT").write_text(json.dumps({"version": 2, "captions": 4500, "steps": 1400, "final_loss": 0.44}))
    assert demo.backbones_built(tmp_path)
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert demo.damaged_backbone_file(tmp_path) == "lm/model.safetensors"


@pytest.mark.slow  # two tiny demo builds: about 7 s on 2 idle cores, 20 s on busy ones
def test_a_damaged_demo_cache_is_built_again_not_loaded(tmp_path, capsys, monkeypatch):
    """Model files deleted or cut short after the build: the next start rebuilds the backbones (the
    same ones: the build is seeded) instead of failing to load them with advice to download them."""
    import functools

    import demo
    from model import load_backbones

    monkeypatch.setattr(demo, "build_demo_data", functools.partial(demo.build_demo_data, split_sizes={"train": 8}))
    monkeypatch.setattr(demo, "build_tiny_backbones", functools.partial(demo.build_tiny_backbones, lm_steps=2))
    built = demo.ensure_demo_assets(progress=False)
    processor = Path(built["clip_model"]) / "preprocessor_config.json"
    weights = Path(built["lm_model"]) / "model.safetensors"
    whole = processor.read_bytes(), weights.read_bytes()
    processor.unlink()
    weights.write_bytes(whole[1][: len(whole[1]) // 2])
    capsys.readouterr()
    assert demo.ensure_demo_assets(progress=False) == built
    said = capsys.readouterr().out
    assert "damaged (clip/preprocessor_config.json is missing or changed): building them again" in said
    assert (processor.read_bytes(), weights.read_bytes()) == whole
    load_backbones(built["clip_model"], built["lm_model"])


@pytest.mark.slow  # two tiny demo builds: about 7 s on 2 idle cores, 20 s on busy ones
def test_a_demo_run_rebuilds_a_cleared_demo_cache(tmp_path, capsys, monkeypatch):
    """The demo cache cleared after training (rm -rf ~/.cache): inference.py on the demo run builds
    the same assets again, as app.py does, instead of saying the backbone folder is gone; its build
    notes go to stderr, as stdout is the captions."""
    import functools
    import shutil

    import demo
    import inference
    from model import AdapterConfig, build_captioner, save_adapter

    monkeypatch.setattr(demo, "build_demo_data", functools.partial(demo.build_demo_data,
                                                                   split_sizes={"train": 6, "test": 1}))
    monkeypatch.setattr(demo, "build_tiny_backbones", functools.partial(demo.build_tiny_backbones, lm_steps=2))
    built = demo.ensure_demo_assets(progress=False)
    captioner = build_captioner(AdapterConfig(clip_model=built["clip_model"], lm_model=built["lm_model"]))
    save_adapter(tmp_path / "demo", captioner.adapter, captioner.config)
    image = tmp_path / "test_0000.png"
    shutil.copy(Path(built["data_dir"]) / "images" / "test_0000.png", image)
    shutil.rmtree(demo.demo_root())
    capsys.readouterr()
    assert inference.main(["--checkpoint", str(tmp_path / "demo"), "--json", str(image)]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(image)]
    assert "are gone (a cleared cache): building them again" in err
    assert Path(built["lm_model"], "model.safetensors").is_file()


def test_a_demo_run_rebuilds_a_demo_backbone_cut_short(monkeypatch):
    """A demo backbone file cut short or deleted after training (its folder still there): eval.py,
    inference.py and app.py on the demo run build the backbones again, as train.py --demo does,
    instead of failing to load them with advice to download a model only the build can make."""
    import shutil

    import demo

    backbones = demo.demo_root() / "backbones"
    for name in demo.BACKBONE_FILES:
        (backbones / name).parent.mkdir(parents=True, exist_ok=True)
        (backbones / name).write_text("{}")
    (backbones / "BUILT").write_text(json.dumps({"version": demo.DEMO_VERSION, "files": demo.file_sizes(backbones)}))
    builds = []
    monkeypatch.setattr(demo, "ensure_demo_assets", lambda: builds.append("built"))
    clip, lm = str(backbones / "clip"), str(backbones / "lm")
    demo.rebuild_cleared_demo(clip, lm)
    assert builds == []  # whole: loaded as it is
    (backbones / "lm" / "model.safetensors").write_text("{")  # cut short
    demo.rebuild_cleared_demo(clip, lm)
    assert builds == ["built"]
    demo.rebuild_cleared_demo("/elsewhere/clip", "/elsewhere/lm")  # not the demo's: never built here
    assert builds == ["built"]
    shutil.rmtree(backbones)  # cleared: this version's assets, built again (an older version's are refused)
    demo.rebuild_cleared_demo(clip, lm)
    assert builds == ["built", "built"]


def test_a_demo_run_under_a_relative_captioner_home_rebuilds_its_cleared_assets_too(tmp_path, monkeypatch):
    """CAPTIONER_HOME=cache make demo: the run named its backbones relative to the current folder, as cache_home
    gave them. They were never taken for the demo cache's (held as an absolute path), so a cleared or cut-short
    cache ended in advice to download a model only the build can make. cache_home is absolute now (a relative
    name broke the run from any other folder); runs saved before still name them relative."""
    import shutil

    import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAPTIONER_HOME", "cache")
    built = []
    fake_demo_builders(monkeypatch, built)
    assets = demo.ensure_demo_assets(progress=False)
    assert Path(assets["lm_model"]) == tmp_path / "cache" / Path(assets["lm_model"]).relative_to(tmp_path / "cache")
    saved = [os.path.relpath(assets[name]) for name in ("clip_model", "lm_model", "data_dir")]  # as an older run
    assert not Path(saved[1]).is_absolute()
    (Path(saved[1]) / "model.safetensors").write_text("{")  # cut short
    demo.rebuild_cleared_demo(*saved)
    shutil.rmtree("cache")  # cleared
    demo.rebuild_cleared_demo(*saved)
    assert built == ["data", "backbones", "backbones", "data", "backbones"]
    assert demo.backbones_built(Path(assets["lm_model"]).parent)


def test_a_demo_run_under_captioner_home_dot_dot_is_the_demo_cache_from_a_sibling_folder(tmp_path, monkeypatch):
    """CAPTIONER_HOME=../cache from work/a: the run named its assets work/a/../cache/... (absolute, not normal).
    From work/b, with the same setting, they were not taken for the demo cache's (work/b/../cache): a cleared
    cache was never rebuilt, and the run ended in advice to download a model only the build can make."""
    import shutil

    import demo

    for folder in ("a", "b"):
        (tmp_path / "work" / folder).mkdir(parents=True)
    monkeypatch.setenv("CAPTIONER_HOME", "../cache")
    built = []
    fake_demo_builders(monkeypatch, built)
    monkeypatch.chdir(tmp_path / "work" / "a")
    assets = demo.ensure_demo_assets(progress=False)
    assert all(Path(assets[name]).is_relative_to(tmp_path / "work" / "cache") for name in assets)  # no `..`: new runs
    # ... and a run saved before cache_home dropped the `..`:
    saved = [str(assets[name]).replace(str(tmp_path / "work"), str(tmp_path / "work" / "a" / ".."), 1)
             for name in ("clip_model", "lm_model", "data_dir")]
    monkeypatch.chdir(tmp_path / "work" / "b")
    assert all(demo.in_demo_cache(path) for path in saved)
    shutil.rmtree(tmp_path / "work" / "cache")  # cleared
    demo.rebuild_cleared_demo(*saved)
    assert built == ["data", "backbones", "data", "backbones"]
    assert all(Path(path).exists() for path in saved)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_unwritable_captioner_home_is_one_line(monkeypatch):
    """A CAPTIONER_HOME this user cannot write (a shared or read-only folder): one line naming it, not
    a PermissionError traceback from deep inside the build."""
    import demo

    monkeypatch.setenv("CAPTIONER_HOME", "/proc/captioner")  # as root too: nothing can be made in /proc
    with pytest.raises(UserError, match=r"could not build the demo in /proc/captioner/demo-v\d+ .*"
                                        "point CAPTIONER_HOME at a folder you can write"):
        demo.ensure_demo_assets(progress=False)


def test_captioner_home_expands_a_tilde_and_ignores_an_empty_value(tmp_path, monkeypatch):
    """CAPTIONER_HOME="~/x" from a quoted value or a .env file (no shell expands it there) names the
    home's x, not a folder literally named `~` under the current one; an empty value is unset."""
    from utils import cache_home

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CAPTIONER_HOME", "~/captioner")
    assert cache_home() == tmp_path / "captioner"
    monkeypatch.setenv("CAPTIONER_HOME", "")
    assert cache_home() == tmp_path / ".cache" / "captioner"


@pytest.fixture(scope="module")
def captioner(tiny):
    from model import AdapterConfig, build_captioner

    return build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))


def _garbage(path, width):
    path.write_bytes(b"\x00\xffnot an array at all" * 20)


def _truncated(path, width):
    path.write_bytes(path.read_bytes()[:150])


def _pickled(path, width):
    np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)


def _too_few_rows(path, width):
    np.save(path, np.zeros((2, width), np.float32))


def _float16(path, width):
    np.save(path, np.load(path).astype(np.float16))


def _float64(path, width):
    np.save(path, np.zeros((3, width), np.float64))


@pytest.mark.parametrize("damage", [_garbage, _truncated, _pickled, _too_few_rows, _float64])
def test_damaged_feature_cache_part_is_dropped_and_extracted_again(tiny, captioner, tmp_path, capsys, damage):
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    [part] = (tmp_path / encoder_fingerprint(captioner)).glob("part-*.npy")
    damage(part, captioner.config.image_feature_dim)
    capsys.readouterr()
    again = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert torch.equal(again, expected)  # re-extracted, not zeros or garbage read from the bad part
    note = [line for line in capsys.readouterr().err.splitlines() if str(part) in line]
    assert len(note) == 1 and "extracted again" in note[0]
    # The bad part is gone and the new one serves the next run without a note.
    assert not part.exists()
    extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert "cannot be read" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", [_too_few_rows, _float16])
def test_a_part_not_float32_n_by_f_is_dropped_even_where_its_digest_matches(tiny, captioner, tmp_path, capsys,
                                                                           damage):
    """A part's digest says its bytes are those written, not that they are what its keys promise (a writer of
    another version, a part copied in with its keys file redone): the shape and dtype are checked on their own."""
    from utils import file_digest

    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    [part] = (tmp_path / encoder_fingerprint(captioner)).glob("part-*.npy")
    damage(part, captioner.config.image_feature_dim)
    entry = json.loads(part.with_suffix(".json").read_text())
    part.with_suffix(".json").write_text(json.dumps({**entry, "blake2b": file_digest(part)}))
    capsys.readouterr()
    assert torch.equal(extract_features(captioner, records, progress=False, cache_dir=tmp_path), expected)
    assert "not float32 (3, " in capsys.readouterr().err and not part.exists()


def test_feature_cache_keys_file_of_garbage_bytes_is_extracted_again(tiny, captioner, tmp_path):
    records = load_records("folder", "train", tiny["data_dir"])[:2]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    [keys_file] = (tmp_path / encoder_fingerprint(captioner)).glob("part-*.json")
    keys_file.write_bytes(b"\xff\xfe\x00garbage")  # not UTF-8: once a UnicodeDecodeError that stopped the run
    assert torch.equal(extract_features(captioner, records, progress=False, cache_dir=tmp_path), expected)
    assert not keys_file.with_suffix(".npy").exists()  # the part it described is removed, not left for good


@pytest.mark.parametrize("bad_rows", [
    ['img.png,"a dog on grass,train', "b.png,a bird,train"],  # open to the end of the file
    ['img.png,"a dog on grass,train', 'b.png,"a bird",train'],  # closed by the next row's quote
    ['img.png,"a dog" on grass,train', "b.png,a bird,train"],  # text after the closing quote
])
def test_csv_quote_left_open_is_an_error_naming_its_line(tmp_path, bad_rows):
    for name in ("a.png", "img.png", "b.png"):
        write_image(tmp_path / name)
    lines = ["image,caption,split", "a.png,a cat,train", *bad_rows]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        load_records("folder", "train", str(tmp_path))
    message = str(error.value)
    assert f"{tmp_path / 'captions.csv'} line 3:" in message and "\n" not in message


def test_csv_caption_over_the_csv_field_limit_is_accepted(tmp_path):
    import csv

    write_image(tmp_path / "a.png")
    long_caption = "a dog " * 30_000  # 180,000 characters: over csv's default limit of 131,072
    (tmp_path / "captions.csv").write_text(f"image,caption\na.png,{long_caption}\na.png,short\n")
    limit = csv.field_size_limit()
    [record] = [r for s in ("train", "val", "test") for r in load_records("folder", s, str(tmp_path))]
    assert record.captions == [long_caption.strip(), "short"]
    assert csv.field_size_limit() == limit  # the process-wide limit is left as it was


def write_jsonl_captions(folder, rows):
    (folder / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_splits_of_one_run_come_from_one_reading_of_the_caption_file(tmp_path):
    # train.py and eval.py read a caption folder once (one_reading_per_folder): COCO's took 3.5 s per split. An edit
    # made while they load is not half seen (an image moved from train to test would be in both); the next run sees it.
    rows = [{"image": f"img{i}.png", "caption": f"caption {i}", "split": split}
            for i, split in enumerate(["train", "train", "train", "val", "test"])]
    for row in rows:
        write_image(tmp_path / row["image"])
    write_jsonl_captions(tmp_path, rows)
    moved = [{**row, "split": "test"} if row["image"] == "img0.png" else row for row in rows]

    def ids(split):
        return [record.image_id for record in load_records("folder", split, str(tmp_path))]

    with one_reading_per_folder():
        assert ids("train") == ["img0.png", "img1.png", "img2.png"]
        write_jsonl_captions(tmp_path, moved)
        assert ids("test") == ["img4.png"]
    assert ids("test") == ["img0.png", "img4.png"]


def test_the_loads_of_one_reading_change_nothing_the_next_reads(tmp_path):
    # The splits, deals and dealt_names of one reading come from one shared grouping of the caption file: loading
    # a split used to write each image's dealt split into it, which left dealt_names nothing to deal.
    for i in range(30):
        write_image(tmp_path / f"img{i}.png")
    write_jsonl_captions(tmp_path, [{"image": f"img{i}.png", "caption": f"caption {i}"} for i in range(30)])
    alone = {(split, deal): load_records("folder", split, str(tmp_path), 42, folder_split=deal)
             for split in SPLITS for deal in ("hash", "shuffle")}
    unassigned = dealt_names(tmp_path, 42)
    assert len(unassigned) == 30
    with one_reading_per_folder():
        for (split, deal), records in alone.items():
            loaded = load_records("folder", split, str(tmp_path), 42, folder_split=deal)
            assert loaded == records
            loaded[0].captions.append("changed by its caller")  # its own records: the next load is unchanged
        assert load_records("folder", "val", str(tmp_path), 42) == alone["val", "hash"]
        assert dealt_names(tmp_path, 42) == unassigned


def test_the_deal_of_a_folder_named_from_home_is_that_folders_deal(tmp_path, monkeypatch):
    # eval.py deals the folder its run_config.json names; "~/coco" there loaded the split, and dealt_names (unlike
    # load_records) read a folder named "~" in the current folder: no caption file, the evaluation stopped.
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "coco"
    for i in range(5):
        write_image(folder / f"img{i}.png")
    write_jsonl_captions(folder, [{"image": f"img{i}.png", "caption": f"caption {i}"} for i in range(5)])
    assert dealt_names("~/coco", 42) == dealt_names(folder, 42) == [f"img{i}.png" for i in range(5)]
    assert split_deal("~/coco", 42) == split_deal(folder, 42) != ""


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_image_listed_in_two_splits_is_an_error_naming_both(tmp_path, file_format):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    rows = [("a.png", "a red square", "train"), ("b.png", "a bird", "train"), ("a.png", "red again", "test")]
    if file_format == "jsonl":
        write_jsonl_captions(tmp_path, [{"image": i, "caption": c, "split": s} for i, c, s in rows])
    else:
        (tmp_path / "captions.csv").write_text("image,caption,split\n" + "".join(f"{i},{c},{s}\n" for i, c, s in rows))
    with pytest.raises(UserError) as error:
        load_records("folder", "train", str(tmp_path))
    message = str(error.value)
    assert "a.png" in message and "split train" in message and "split test" in message and "\n" not in message


def test_image_listed_twice_in_one_split_or_once_without_keeps_all_its_captions(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [
        {"image": "a.png", "caption": "one", "split": "test"},
        {"image": "a.png", "caption": "two", "split": "test"},
        {"image": "a.png", "caption": "three"},  # no split: the image's own
        {"image": "b.png", "caption": "first, no split"},  # the split a later row gives counts
        {"image": "b.png", "caption": "second", "split": "val"},
    ])
    [a] = load_records("folder", "test", str(tmp_path))
    assert a.image_id == "a.png" and a.captions == ["one", "two", "three"]
    [b] = load_records("folder", "val", str(tmp_path))
    assert b.image_id == "b.png" and b.captions == ["first, no split", "second"]
    assert load_records("folder", "train", str(tmp_path)) == []


def test_a_caption_repeated_for_one_image_counts_once_and_is_reported(tmp_path, capsys):
    """A CSV pasted in twice must not double a caption's weight in training or in the references."""
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    rows = [{"image": "a.png", "caption": "a red circle", "split": "train"},
            {"image": "a.png", "caption": "a  red circle ", "split": "train"},  # the same once normalised
            {"image": "a.png", "caption": "a blue circle", "split": "train"},
            {"image": "b.png", "caption": "a red circle", "split": "train"}]  # another image: its own
    write_jsonl_captions(tmp_path, rows + rows[:1])
    a, b = load_records("folder", "train", str(tmp_path))
    assert a.captions == ["a red circle", "a blue circle"] and b.captions == ["a red circle"]
    note = capsys.readouterr().out
    assert "train: a caption written more than once" in note and "1 such" in note, note
    assert "a.png 'a red circle'" in note, note
    write_jsonl_captions(tmp_path, rows[2:])
    load_records("folder", "train", str(tmp_path))
    assert "more than once" not in capsys.readouterr().out


def test_caption_files_name_their_columns_as_imagefolder_does_or_say_what_is_missing(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("file_name,text,split\na.png,a red circle,train\n")
    [record] = load_records("folder", "train", str(tmp_path))  # Hugging Face imagefolder's names
    assert record.captions == ["a red circle"]
    (tmp_path / "captions.csv").write_text("a.png,a red circle\n")  # no header: every row was dropped
    with pytest.raises(UserError, match="first line must be a header naming the image column .* it is "
                                        "'a.png,a red circle'"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "captions.csv").unlink()
    write_jsonl_captions(tmp_path, [{"image": "a.png", "description": "a red circle", "split": "train"}])
    with pytest.raises(UserError, match="row 1 has no caption .*it has image, description, split"):
        load_records("folder", "train", str(tmp_path))


@pytest.mark.parametrize("column, delimiter", [("caption_{}", ","), ("Caption {}", ";"), ("caption{}", "\t"),
                                               ("TEXT_{}", ",")])
def test_a_wide_csv_gives_each_image_its_captions_in_column_order(tmp_path, column, delimiter):
    """Published caption tables keep an image's captions in one row, a column each (image,caption_1,...,caption_5):
    the header was refused as naming no caption column."""
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    header = ["image", *(column.format(i) for i in (1, 2, 3, 4, 5)), "split"]
    rows = [[name, *(f"{name} caption {i}" for i in (1, 2, 3, 4, 5)), "train"] for name in ("a.png", "b.png")]
    (tmp_path / "captions.csv").write_text("".join(delimiter.join(fields) + "\n" for fields in [header, *rows]))
    records = load_records("folder", "train", str(tmp_path))
    assert [r.captions for r in records] == [[f"{name} caption {i}" for i in (1, 2, 3, 4, 5)]
                                             for name in ("a.png", "b.png")]


def test_a_wide_tables_blank_cells_are_no_captions_and_a_row_of_them_no_image(tmp_path, capsys):
    """Images of a wide table have their own numbers of captions: a blank cell is none, not a caption dropped with
    a note (each image short of five captions was noted); a row of blank cells is an image without captions."""
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    (tmp_path / "captions.csv").write_text("image,caption_0,caption_1,caption_2,caption_3,caption_4,split\n"
                                           "a.png,one,,three,  ,\"[\"\"four\"\", \"\"five\"\"]\",train\n"
                                           "b.png,,,,,,train\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["one", "three", "four", "five"]]
    out = capsys.readouterr().out
    assert "train: 1 image has no usable caption (empty, or not text) and is left out (first: b.png)" in out
    assert "empty or not text and" not in out.replace("(empty, or not text) and", ""), out
    # A cell of a list of nothing but blanks is a caption that came out empty, noted as before.
    (tmp_path / "captions.csv").write_text('image,caption_1,caption_2,split\na.png,one,"[""  ""]",train\n')
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["one"]]
    assert "train: 1 caption of 1 image is empty or not text and is left out" in capsys.readouterr().out


def test_a_caption_column_beside_its_numbered_ones_is_read_with_them(tmp_path):
    """image,caption,caption2 read only `caption`, dropping caption2 without a word."""
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,caption,caption2\na.png,a dog,a brown dog\n")
    assert [r.captions for s in SPLITS for r in load_records("folder", s, str(tmp_path))] == [["a dog", "a brown dog"]]
    # Unquoted commas: which caption the pieces belong to is not ours to guess (one caption column: joined back).
    (tmp_path / "captions.csv").write_text("image,caption,caption2\na.png,a dog, brown,a cat\n")
    with pytest.raises(UserError, match="line 2 has 4 fields but the header has 3: put a caption that contains"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "captions.csv").write_text("image,caption_1\na.png,a dog, brown\n")
    assert [r.captions for s in SPLITS for r in load_records("folder", s, str(tmp_path))] == [["a dog, brown"]]


def test_jsonl_rows_with_numbered_caption_fields_are_read_as_a_wide_table_is(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [{"image": "a.png", "caption_1": "one", "caption_2": ["two", "three"],
                                     "split": "train"},
                                    {"image": "b.png", "caption": "four", "caption_1": "five", "split": "train"}])
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["one", "two", "three"],
                                                                                    ["four", "five"]]


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_numbered_caption_fields_beside_other_caption_fields_are_an_error_naming_both(tmp_path, file_format):
    """caption_1 beside text_1 (or text) may be two sets of captions or one set and something else."""
    write_image(tmp_path / "a.png")
    if file_format == "csv":
        (tmp_path / "captions.csv").write_text("image,caption_1,caption_2,text_1\na.png,one,two,three\n")
        where = r"captions.csv: its header"
    else:
        write_jsonl_captions(tmp_path, [{"image": "a.png", "text": "one", "caption_1": "two", "caption_2": "three"}])
        where = "caption row 1"
    with pytest.raises(UserError, match=where + r" has caption fields of two names \(caption_1, caption_2; text"):
        load_records("folder", "train", str(tmp_path))


def test_caption_files_that_are_two_or_not_json_lines_are_named(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('[\n  {"image": "a.png", "caption": "x"}\n]\n')  # pretty JSON
    with pytest.raises(UserError, match="line 1 is not JSON .*one JSON object per line"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "captions.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(UserError, match="holds both captions.jsonl and captions.csv; keep the one that is meant"):
        load_records("folder", "train", str(tmp_path))


def test_a_captions_jsonl_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows Notepad saves UTF-8 with a byte-order mark: the first line was "not JSON" for it."""
    write_image(tmp_path / "a.png")
    row = json.dumps({"image": "a.png", "caption": "a dog"}).encode()
    (tmp_path / "captions.jsonl").write_bytes(b"\xef\xbb\xbf" + row + b"\r\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a dog"]]


def test_an_empty_image_field_gives_way_to_the_next_field_that_names_the_image(tmp_path):
    """A table with both an image and a file_name column, the first left empty or null in some rows: those rows
    name their image by file_name, not "no image"."""
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [{"image": "", "file_name": "a.png", "caption": "one"},
                                    {"image": None, "file_name": "b.png", "caption": "two"}])
    assert [(r.image_id, r.captions) for r in load_records("folder", "train", str(tmp_path))] == [
        ("a.png", ["one"]), ("b.png", ["two"])]


def test_spellings_of_one_image_path_are_one_image(tmp_path):
    write_image(tmp_path / "images" / "x.png")
    write_jsonl_captions(tmp_path, [
        {"image": "./images/x.png", "caption": "one", "split": "train"},
        {"image": "images//x.png", "caption": "two", "split": "train"},
        {"image": "images/x.png", "caption": "three", "split": "train"},
    ])
    [record] = load_records("folder", "train", str(tmp_path))
    assert record.image_id == "images/x.png" and record.captions == ["one", "two", "three"]
    # Spelled differently in two splits, it is still one file: an error, not a train/test leak.
    write_jsonl_captions(tmp_path, [
        {"image": "./images/x.png", "caption": "one", "split": "train"},
        {"image": "images/x.png", "caption": "two", "split": "test"},
    ])
    with pytest.raises(UserError, match="images/x.png .*split train.*split test"):
        load_records("folder", "test", str(tmp_path))
    # Nor does an absolute spelling of the same file get past the check.
    write_jsonl_captions(tmp_path, [
        {"image": "images/x.png", "caption": "one", "split": "train"},
        {"image": str(tmp_path / "images" / "x.png"), "caption": "two", "split": "test"},
    ])
    with pytest.raises(UserError, match="images/x.png .*split train.*split test"):
        load_records("folder", "test", str(tmp_path))


def test_directory_where_an_image_is_expected_is_called_a_directory(tmp_path):
    from dataset import open_image

    (tmp_path / "photo.png").mkdir()
    with pytest.raises(UserError, match=r"photo.png is a directory, not an image file$"):
        open_image(tmp_path / "photo.png")
    write_jsonl_captions(tmp_path, [{"image": "photo.png", "caption": "x", "split": "train"}])
    with pytest.raises(UserError, match="photo.png is a directory"):
        load_records("folder", "train", str(tmp_path))


def test_an_image_without_read_permission_is_called_so_not_damaged(tmp_path, monkeypatch):
    from PIL import Image

    from dataset import open_image

    write_image(tmp_path / "a.png")

    def denied(*args, **kwargs):  # what open() raises on a mode-000 file (tests run as root, which reads it)
        raise PermissionError(13, "Permission denied", str(tmp_path / "a.png"))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(UserError, match=r"cannot read image .*a.png: permission denied$"):
        open_image(tmp_path / "a.png")


def test_a_missing_image_named_on_disk_in_another_unicode_form_or_case_says_so(tmp_path):
    """A caption file's "photo.jpg" and a camera's "Photo.JPG" are different names on Linux: the image was "not
    found" beside the file it meant. (The same name in another Unicode form is read: the test below.)"""
    import unicodedata

    nfc = unicodedata.normalize("NFC", "Café.png")
    for on_disk in (unicodedata.normalize("NFD", "café.png"), "Photo.PNG", "other.png", "beach.jpg"):
        write_image(tmp_path / on_disk)
    names = (nfc, "photo.png", "gone.png", "other.png", "beach.jpg ")
    write_jsonl_captions(tmp_path, [{"image": n, "caption": "x", "split": "train"} for n in names])
    bad_samples = []
    load_records("folder", "train", str(tmp_path), on_bad_sample="skip", bad_samples=bad_samples)
    why = dict(bad_samples)
    assert why[nfc].endswith(f"(its folder holds {unicodedata.normalize('NFD', 'café.png')!r}, the same name in "
                             "another Unicode form, letter case or spacing: spell it in the caption file as the file "
                             "is named)")
    assert "its folder holds 'Photo.PNG'" in why["photo.png"]
    assert "its folder holds 'beach.jpg'" in why["beach.jpg "]  # a space a spreadsheet cell kept, unseen in the line
    assert why["gone.png"] == f"image not found: {tmp_path / 'gone.png'}"  # nothing alike: no hint
    assert set(why) == {nfc, "photo.png", "gone.png", "beach.jpg "}


@pytest.mark.parametrize("dataset", ["folder", "karpathy"])
def test_an_image_named_in_another_unicode_form_than_its_file_is_read_from_that_file(tmp_path, dataset):
    """Files copied from a Mac are named in NFD ("e" + accent), caption files typed elsewhere in NFC ("é"): one
    name to a reader and to macOS, but every such image was "not found" on Linux. The id stays the caption file's."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "Café été 1.jpg") for form in ("NFC", "NFD"))
    write_image(tmp_path / "images" / nfd)
    if dataset == "folder":
        write_jsonl_captions(tmp_path, [{"image": f"images/{nfc}", "caption": "a red square", "split": "train"}])
    else:
        (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [
            {"filename": nfc, "imgid": 7, "split": "train", "sentences": [{"raw": "a red square"}]}]}))
    [record] = load_records(dataset, "train", str(tmp_path))
    assert record.image_id == (f"images/{nfc}" if dataset == "folder" else "7")
    assert record.path == tmp_path / "images" / nfd
    assert record.open().size == (32, 32)


def test_windows_separators_in_image_paths_name_the_files(tmp_path):
    """A caption file written on Windows names "photos\\day 1\\a.png": on Linux a backslash is a letter of a
    file name, so every such image was "not found". Each spelling of one file is one image; a file whose Linux name
    holds a backslash is still read by that name."""
    write_image(tmp_path / "photos" / "day 1" / "a.png")
    write_image(tmp_path / "back\\slash.png")
    write_jsonl_captions(tmp_path, [
        {"image": "photos\\day 1\\a.png", "caption": "one", "split": "train"},
        {"image": ".\\photos\\day 1\\a.png", "caption": "two"},
        {"image": "photos/day 1/a.png", "caption": "three"},
        {"image": "back\\slash.png", "caption": "four", "split": "train"},
    ])
    records = {r.image_id: r for r in load_records("folder", "train", str(tmp_path))}
    assert set(records) == {os.path.join("photos", "day 1", "a.png"), "back\\slash.png"}
    assert records[os.path.join("photos", "day 1", "a.png")].captions == ["one", "two", "three"]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "photos\\day 1", "filename": "a.png", "cocoid": 1, "split": "train",
         "sentences": [{"raw": "x"}]}]}))
    [record] = load_records("karpathy", "train", str(tmp_path))
    assert record.path == tmp_path / "photos" / "day 1" / "a.png"


def test_a_karpathy_image_whose_linux_name_holds_a_backslash_is_still_read_by_that_name(tmp_path):
    """Windows separators were looked for in the data folder only, not in images/ where Karpathy images lie:
    images/x\\y.png, read before, became "image not found: x/y.png"."""
    for name in ("x\\y.png", "b.png", "c.png"):
        write_image(tmp_path / "images" / name)
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [
        {"filename": name, "imgid": i, "split": "train", "sentences": [{"raw": f"caption {i}"}]}
        for i, name in enumerate(("x\\y.png", "b.png", "c.png"))]}))
    paths = {r.path for r in load_records("karpathy", "train", str(tmp_path))}
    assert paths == {tmp_path / "images" / name for name in ("x\\y.png", "b.png", "c.png")}


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_saved_by_excel_with_semicolons_or_tabs_reads_its_columns(tmp_path, delimiter):
    """Excel saves "CSV" with semicolons where the decimal mark is a comma (German, French settings) and "Text (Tab
    delimited)" with tabs, both with a byte-order mark and CRLF: the header was refused as naming no image column."""
    write_image(tmp_path / "a.png")
    lines = [["Image", "Caption", "Notes"], ["a.png", "a red square, small", "x"], ["a.png", '"quoted; twice"', ""]]
    text = "\r\n".join(delimiter.join(fields) for fields in lines) + "\r\n"
    (tmp_path / "captions.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    [record] = load_records("folder", "train", str(tmp_path))
    assert record.captions == ["a red square, small", "quoted; twice"]
    # The errors that ask for quotes name the file's own separator.
    (tmp_path / "captions.csv").write_text(delimiter.join(["caption", "image"]) + "\n" +
                                           delimiter.join(["red", "square", "a.png"]) + "\n")
    name = {";": "semicolons", "\t": "tabs"}[delimiter]
    with pytest.raises(UserError, match=f"put a caption that contains {name} in double quotes"):
        load_records("folder", "train", str(tmp_path))
    # A comma-separated file is read as before, semicolons and tabs in its captions and all.
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a red; square\ta\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a red; square a"]]
    # Unquoted separators in a last caption column are joined back with the file's own separator, not a comma.
    (tmp_path / "captions.csv").write_text(delimiter.join(["image", "caption"]) + "\n" +
                                           delimiter.join(["a.png", "a red", " small square"]) + "\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == \
        [[{";": "a red; small square", "\t": "a red small square"}[delimiter]]]  # a tab is whitespace in a caption


def test_a_csv_row_of_empty_fields_as_spreadsheets_save_them_is_no_row(tmp_path):
    """Excel and LibreOffice save rows that once held something as bare separators (";;"): each stopped the load
    with "caption row 2 names no image". A row that holds a caption but no image still does."""
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes(b"Image;Caption;Split\r\na.png;a red square;train\r\n;;\r\n ; ;\r\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a red square"]]
    (tmp_path / "captions.csv").write_bytes(b"Image;Caption;Split\r\na.png;a red square;train\r\n;a caption;\r\n")
    with pytest.raises(UserError, match="caption row 2 names no image"):
        load_records("folder", "train", str(tmp_path))


def test_a_csv_row_of_blank_fields_is_no_row_and_no_image_to_note(tmp_path, capsys):
    """A row of spaces between separators (" , ,", a spreadsheet's cells once typed in) is no row, as a row of
    empty fields is: read as one, it was an image named " " left out for having no caption, in a note."""
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes(b"image,caption,split\r\na.png,a red square,train\r\n , ,\r\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a red square"]]
    assert capsys.readouterr().out == ""


def test_hugging_face_imagefolder_metadata_files_are_read_as_caption_files(tmp_path):
    """An imagefolder data set (metadata.jsonl or metadata.csv naming each image by file_name, in the folder or in
    each split's folder, whose name is the split) had "neither captions.jsonl nor captions.csv"."""
    for name in ("train/a.png", "train/b.png", "validation/c.png", "test/d.png", "e.png"):
        write_image(tmp_path / name)
    (tmp_path / "train" / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "one"}\n{"file_name": "b.png", "text": "two"}\n')
    (tmp_path / "validation" / "metadata.csv").write_text("file_name,text\nc.png,three\n")
    (tmp_path / "test" / "metadata.jsonl").write_text('{"file_name": "d.png", "text": "four"}\n')
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "e.png", "text": "five", "split": "train"}\n')
    by_split = {split: {r.image_id: r.captions for r in load_records("folder", split, str(tmp_path))}
                for split in SPLITS}
    assert by_split == {"train": {"e.png": ["five"], os.path.join("train", "a.png"): ["one"],
                                  os.path.join("train", "b.png"): ["two"]},
                        "val": {os.path.join("validation", "c.png"): ["three"]},
                        "test": {os.path.join("test", "d.png"): ["four"]}}
    write_jsonl_captions(tmp_path, [{"image": "e.png", "caption": "six", "split": "train"}])
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["six"]]  # captions.jsonl first
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\na.png,one\n")
    (tmp_path / "captions.jsonl").unlink()
    with pytest.raises(UserError, match="train holds both metadata.jsonl and metadata.csv"):
        load_records("folder", "train", str(tmp_path))


def test_a_root_imagefolder_metadata_file_gives_images_in_split_folders_their_split(tmp_path):
    """One metadata.jsonl at the top naming "train/a.png" and "test/b.png": the split folders were ignored and the
    hash deal trained on most of test/ (16 of 20), scoring the run on a test split of training images."""
    rows = []
    for split in ("train", "test"):
        for i in range(20):
            write_image(tmp_path / split / f"{i}.png")
            rows.append({"file_name": f"{split}/{i}.png", "text": f"{split} {i}"})
    rows[0]["split"] = "val"  # a split the row names is kept
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    by_split = {split: {r.image_id for r in load_records("folder", split, str(tmp_path))} for split in SPLITS}
    assert by_split["val"] == {os.path.join("train", "0.png")}
    assert by_split["train"] == {os.path.join("train", f"{i}.png") for i in range(1, 20)}
    assert by_split["test"] == {os.path.join("test", f"{i}.png") for i in range(20)}


def test_an_imagefolder_eval_folder_is_the_test_split_as_hugging_face_reads_it(tmp_path):
    """Hugging Face reads a split folder named eval/ or evaluation/ as test: its metadata file was not read here, and
    its images were left out of every split without a word. A row's own "eval" is still an error (it may mean val)."""
    for split in ("train", "eval"):
        for i in range(3):
            write_image(tmp_path / split / f"{i}.png")
        (tmp_path / split / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,{split} {i}\n"
                                                                                    for i in range(3)))
    assert {r.image_id for r in load_records("folder", "test", str(tmp_path))} == \
        {os.path.join("eval", f"{i}.png") for i in range(3)}
    (tmp_path / "eval" / "metadata.csv").unlink()  # one metadata file at the top, naming eval/ images
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "eval/0.png", "text": "zero"}) + "\n")
    assert [r.image_id for r in load_records("folder", "test", str(tmp_path))] == [os.path.join("eval", "0.png")]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "eval/0.png", "text": "0", "split": "eval"}))
    with pytest.raises(UserError, match="split 'eval' is unknown"):
        load_records("folder", "test", str(tmp_path))


def test_imagefolder_metadata_files_in_any_folder_are_read_as_hugging_face_reads_them(tmp_path):
    """A folder per class (dogs/metadata.csv, train/cats/metadata.jsonl): Hugging Face reads every metadata file under
    the data folder, and here those outside the split folders were left out without a word (all of them: "has
    neither captions.jsonl nor captions.csv"). A hidden or __MACOSX copy is not read, nor a link back up, twice."""
    for name in ("dogs/0.png", "dogs/1.png", "train/cats/0.png", "photos/test/0.png"):
        write_image(tmp_path / name)
    (tmp_path / "dogs" / "metadata.csv").write_text("file_name,text\n0.png,dog zero\n1.png,dog one\n")
    (tmp_path / "train" / "cats" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "cat zero"}\n')
    (tmp_path / "photos" / "test" / "metadata.csv").write_text("file_name,text\n0.png,a test photo\n")
    for skipped in (".ipynb_checkpoints", "__MACOSX"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "metadata.csv").write_text("file_name,text\nnowhere.png,not read\n")
    (tmp_path / "dogs" / "up").symlink_to(tmp_path, target_is_directory=True)
    write_image(tmp_path / "photos" / "test" / "1.png")  # a split folder deeper down, named from the top
    (tmp_path / "metadata.csv").write_text("file_name,text\nphotos/test/1.png,another test photo\n")
    by_split = {split: {r.image_id: r.captions for r in load_records("folder", split, str(tmp_path))}
                for split in SPLITS}
    assert by_split["train"][os.path.join("train", "cats", "0.png")] == ["cat zero"]  # train/'s folder: train
    assert by_split["test"][os.path.join("photos", "test", "0.png")] == ["a test photo"]
    assert by_split["test"]["photos/test/1.png"] == ["another test photo"]
    dealt = {name: captions for found in by_split.values() for name, captions in found.items()}
    assert dealt == {os.path.join("dogs", "0.png"): ["dog zero"], os.path.join("dogs", "1.png"): ["dog one"],
                     os.path.join("train", "cats", "0.png"): ["cat zero"],
                     os.path.join("photos", "test", "0.png"): ["a test photo"],
                     "photos/test/1.png": ["another test photo"]}


def test_a_folder_of_another_caption_layout_says_what_to_do(tmp_path):
    """A COCO captions file, a JSON list saved as captions.json, or a folder given to the other --dataset: "has
    neither captions.jsonl nor captions.csv" did not say what to do with the file the folder does hold."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(UserError, match=r"annotations/captions_train2017.json \(COCO's format\) is not read: convert "
                                        "it to captions.jsonl"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "annotations" / "captions_train2017.json").unlink()
    (tmp_path / "captions.json").write_text('[{"image": "a.png", "caption": "x"}]')
    with pytest.raises(UserError, match=r"captions.json is not read: write its objects one per line as captions.jsonl"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text('{"images": []}')
    with pytest.raises(UserError, match="holds a Karpathy split file, which --dataset karpathy reads"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "dataset_coco.json").unlink()
    write_jsonl_captions(tmp_path, [])
    with pytest.raises(UserError, match="no Karpathy split file .* it holds captions.jsonl, which --dataset folder "
                                        "reads"):
        load_records("karpathy", "train", str(tmp_path))


@pytest.mark.parametrize("name", ["captions.tsv", "captions.txt", "metadata.parquet", "train/metadata.parquet"])
def test_a_caption_table_under_a_name_not_read_says_what_to_rename_it(tmp_path, name):
    """A spreadsheet's captions.tsv, Kaggle Flickr8k's captions.txt ("image,caption" rows), or imagefolder's
    metadata.parquet: "has neither captions.jsonl nor captions.csv" did not say that the table itself is read
    under another name (tabs and all), nor how to make one of the parquet."""
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("image\tcaption\n")
    then = "rename it captions.csv" if name.startswith("captions") else "save it as metadata.csv in its folder"
    with pytest.raises(UserError, match=f"its {name} is not read: .*{then}"):
        load_records("folder", "train", str(tmp_path))
    with pytest.raises(UserError, match=f"its {name} is not read"):
        dataset_from_data_dir(str(tmp_path))


def test_data_dir_alone_on_a_coco_folder_says_to_convert_it(tmp_path):
    """`--data-dir D` without --dataset on the folder holding COCO's annotations/ only asked for --dataset; the advice
    to convert its captions file came a command later. A folder of both layouts gets no such hint."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(UserError, match=r"name it with --dataset karpathy or folder; its annotations/"
                                        r"captions_train2017.json \(COCO's format\) is not read: convert it"):
        dataset_from_data_dir(str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text('{"images": []}')
    write_jsonl_captions(tmp_path, [])
    with pytest.raises(UserError) as both:
        dataset_from_data_dir(str(tmp_path))
    assert str(both.value).endswith("name it with --dataset karpathy or folder")


def test_missing_image_files_are_skipped_and_listed_or_stop(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    names = ("a.png", "gone.png", "b.png")
    write_jsonl_captions(tmp_path, [{"image": n, "caption": "x", "split": "train"} for n in names])
    bad_samples = []
    kept = load_records("folder", "train", str(tmp_path), on_bad_sample="skip", bad_samples=bad_samples)
    assert [r.image_id for r in kept] == ["a.png", "b.png"]
    assert bad_samples == [("gone.png", f"image not found: {tmp_path / 'gone.png'}")]
    with pytest.raises(UserError, match="1 of 3 train images are missing"):
        load_records("folder", "train", str(tmp_path))  # on_bad_sample="error", as eval.py reads
    # Every file missing is a wrong --data-dir, not a bad sample: an error in skip mode too.
    for name in ("a.png", "b.png"):
        (tmp_path / name).unlink()
    with pytest.raises(UserError, match="3 of 3 train images are missing.*check --data-dir"):
        load_records("folder", "train", str(tmp_path), on_bad_sample="skip", bad_samples=[])


def test_a_folder_named_as_an_image_is_skipped_or_stops_but_is_not_called_missing(tmp_path):
    """--on-bad-sample error said "1 of 2 train images are missing (first: .../b.png is a directory, ...)":
    the folder is there, so "missing" sent the user looking for a file that exists."""
    write_image(tmp_path / "a.png")
    (tmp_path / "b.png").mkdir()
    write_jsonl_captions(tmp_path, [{"image": n, "caption": "x", "split": "train"} for n in ("a.png", "b.png")])
    bad_samples = []
    kept = load_records("folder", "train", str(tmp_path), on_bad_sample="skip", bad_samples=bad_samples)
    assert [r.image_id for r in kept] == ["a.png"] and [image for image, _ in bad_samples] == ["b.png"]
    with pytest.raises(UserError) as info:
        load_records("folder", "train", str(tmp_path))
    assert str(info.value) == (f"1 of 2 train images are missing or unreadable (first: {tmp_path / 'b.png'} is a "
                               "directory, not an image file); check --data-dir")


def test_a_split_of_missing_files_and_a_folder_is_called_missing_or_unreadable(tmp_path):
    """"missing" only where every file is not found: a folder named as an image is there."""
    write_image(tmp_path / "a.png")
    (tmp_path / "b.png").mkdir()
    names = ("gone.png", "b.png", "a.png")
    write_jsonl_captions(tmp_path, [{"image": n, "caption": "x", "split": "train"} for n in names])
    with pytest.raises(UserError, match=r"^2 of 3 train images are missing or unreadable \(first: image not found: "):
        load_records("folder", "train", str(tmp_path))


def test_training_skips_a_missing_image_and_lists_it_or_stops_on_it(tiny, tmp_path, capsys):
    import shutil

    import train
    from conftest import train_args
    from utils import read_jsonl, run_cli

    data = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data)
    (data / "images" / "train_0003.png").unlink()
    args = train_args(tiny, tmp_path, "skip", "--final-eval", "false", "--max-steps", "3")
    args[args.index("--data-dir") + 1] = str(data)
    summary = train.train(train.parse_config(args))
    assert summary["step"] == 3 and not summary["interrupted"] and summary["bad_samples"] == 1
    [bad] = read_jsonl(tmp_path / "skip" / "bad_samples.jsonl")
    assert bad["image_id"] == "images/train_0003.png" and "not found" in bad["reason"]
    said = "skipped 1 image that could not be read (missing or unreadable): images/train_0003.png"
    assert said in capsys.readouterr().out

    strict = train_args(tiny, tmp_path, "strict", "--on-bad-sample", "error", "--final-eval", "false")
    strict[strict.index("--data-dir") + 1] = str(data)
    assert run_cli(train.main, strict) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train_0003.png" in err and "\n" not in err


def test_karpathy_entries_with_an_unknown_or_missing_split_are_named_not_left_out(tmp_path):
    """Such an entry used to be left out of every split in silence ("Train", "validation", none), or
    to end in a TypeError from deep inside the loader (a split or filepath that is a list, a number)."""
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "images" / name)
    karpathy = tmp_path / "dataset_flickr8k.json"

    def load(*entries, split="train"):
        karpathy.write_text(json.dumps({"images": [{"sentences": [{"raw": "a dog"}], **e} for e in entries]}))
        return [r.image_id for r in load_records("karpathy", split, str(tmp_path))]

    assert load({"filename": "a.jpg", "split": " Train"}, {"filename": "b.jpg", "split": "train"}) == ["a.jpg", "b.jpg"]
    assert load({"filename": "a.jpg", "split": "validation"}, split="val") == ["a.jpg"]
    for bad in ({"split": "holdout"}, {}, {"split": ["train"]}, {"split": 1}):
        with pytest.raises(UserError, match=r"images\[1\] has split .*; use one of train, restval, val, test"):
            load({"filename": "b.jpg", "split": "train"}, {"filename": "a.jpg", **bad})
    with pytest.raises(UserError, match=r"images\[0\] has filepath 5, not a folder name"):
        load({"filename": "a.jpg", "filepath": 5, "split": "train"})
    karpathy.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")  # nested past Python's recursion limit
    with pytest.raises(UserError, match="is not a Karpathy split file"):
        load_records("karpathy", "train", str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"image": "images/a.jpg", "caption": ' + "[" * 100_000 + "]" * 100_000
                                             + "}\n")
    with pytest.raises(UserError, match="captions.jsonl line 1 is not JSON"):
        load_records("folder", "train", str(tmp_path))


def test_karpathy_image_listed_twice_in_one_split_counts_each_caption_once(tmp_path, capsys):
    write_image(tmp_path / "images" / "a.jpg")
    entry = {"filename": "a.jpg", "imgid": 7, "split": "train", "sentences": [{"raw": "a dog"}, {"raw": "a pet"}]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [
        entry, {**entry, "sentences": [{"raw": "a pet"}, {"raw": "a puppy"}]}]}))
    [record] = load_records("karpathy", "train", str(tmp_path))
    assert record.captions == ["a dog", "a pet", "a puppy"]  # not "a pet" twice: it would weigh double
    assert (f"note: train: 1 caption of images listed more than once in {tmp_path / 'dataset_flickr8k.json'} counts "
            "once (first: a.jpg)") in capsys.readouterr().out


@pytest.mark.parametrize("folder", ["", "images", "Images", "flickr30k-images"])
def test_karpathy_images_are_found_in_the_folders_data_sets_ship_them_in(tmp_path, folder):
    """Karpathy's file names images without a folder: Kaggle's Flickr8k keeps them in Images/, Flickr30k's archive in
    flickr30k-images/. The id is COCO's where the entry has one (dataset_coco.json gives cocoid and imgid)."""
    write_image(tmp_path / folder / "a.jpg")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "imgid": 0, "cocoid": 391895, "split": "train", "sentences": [{"raw": "a dog"}]}]}))
    [record] = load_records("karpathy", "train", str(tmp_path))
    assert record.path == tmp_path / folder / "a.jpg" and record.image_id == "391895"


def test_karpathy_images_sharing_an_id_are_told_apart_by_their_files(tmp_path, capsys):
    # A file merged from two sets reuses ids: predictions.jsonl and bad_samples.jsonl named two images alike.
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "images" / name)
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [
        {"filename": name, "imgid": 7, "split": "train", "sentences": [{"raw": f"caption of {name}"}]}
        for name in ("a.jpg", "b.jpg")]}))
    assert [r.image_id for r in load_records("karpathy", "train", str(tmp_path))] == ["7", "b.jpg"]
    assert (f"note: train: 1 image of {tmp_path / 'dataset_flickr8k.json'} shares its id with another image file and "
            "is named by its file instead (first: 7 (a.jpg, b.jpg))") in capsys.readouterr().out


def test_hub_rows_with_an_unknown_split_are_an_error_not_left_out(tmp_path):
    import datasets

    rows = {"image": [Image.new("RGB", (16, 16))] * 3, "caption": [["a"], ["b"], ["c"]],
            "split": ["train", "Validation", "test"], "filename": ["0.jpg", "1.jpg", "2.jpg"]}
    path = tmp_path / "flickr.parquet"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    assert [r.image_id for r in load_flickr30k_hub("val", str(path))] == ["1.jpg"]  # read as the folders read it
    datasets.Dataset.from_dict({**rows, "split": ["train", None, "holdout"]}).cast_column(
        "image", datasets.Image()).to_parquet(str(path))
    with pytest.raises(UserError, match="row 1 has split None; use one of train, val, test"):
        load_flickr30k_hub("train", str(path))


def test_hub_rows_of_one_image_are_one_record_and_one_image_in_two_splits_is_an_error(tmp_path):
    import datasets

    # One row per caption, as many parquet exports have: one image with its captions, each once.
    rows = {"image": [Image.new("RGB", (16, 16), (0, 0, 0))] * 3 + [Image.new("RGB", (16, 16), (3, 0, 0))],
            "caption": ["a red dog", "a dog", "a red dog", "a cat"],
            "split": ["test", "test", "test", "test"], "filename": ["1.jpg", "1.jpg", "1.jpg", "2.jpg"]}
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    records = load_flickr30k_hub("test", str(path))
    assert [(r.image_id, r.captions, r.row) for r in records] == [("1.jpg", ["a red dog", "a dog"], 0),
                                                                 ("2.jpg", ["a cat"], 3)]
    # The same image in train and test would be trained on and scored on.
    leak = {**rows, "split": ["train", "train", "test", "test"]}
    datasets.Dataset.from_dict(leak).cast_column("image", datasets.Image()).to_parquet(str(path))
    with pytest.raises(UserError, match=r"image 1.jpg is in split train \(row 0\) and in split test \(row 2\)"):
        load_flickr30k_hub("train", str(path))


def test_images_left_without_a_caption_are_counted_in_a_note(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [{"image": "a.png", "captions": ["a dog"], "split": "train"},
                                    {"image": "b.png", "captions": [None, 3, "  "], "split": "train"},
                                    {"image": "c.png", "captions": [], "split": "train"}])
    assert [r.image_id for r in load_records("folder", "train", str(tmp_path))] == ["a.png"]
    assert "train: 2 images have no usable caption (empty, or not text) and are left out (first: b.png)" in \
        capsys.readouterr().out


def test_split_names_are_read_as_data_sets_spell_them(tmp_path):
    """Hugging Face's and spreadsheets' split names ("validation", "dev", "Testing", COCO's "restval") are the
    three splits; an image read into the wrong one would be trained on, or scored on, unseen."""
    spellings = {"validation": "val", "valid": "val", "dev": "val", "Testing": "test", " TEST ": "test",
                 "training": "train", "restval": "train"}
    rows = []
    for i, spelling in enumerate(spellings):
        write_image(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture {i}", "split": spelling})
    write_jsonl_captions(tmp_path, rows)
    read = {r.image_id: split for split in SPLITS for r in load_records("folder", split, str(tmp_path))}
    assert read == {f"{i}.png": split for i, split in enumerate(spellings.values())}


def test_blank_captions_in_the_text_of_a_list_are_counted_in_the_note(tmp_path, capsys):
    """A cell holding a list's text is that list's captions: its blank ones are dropped captions, counted as such
    (counted by the cell, one caption kept of one cell left nothing to say)."""
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text('image,captions,split\na.png,"[""a dog"", "" "", """"]",train\n')
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a dog"]]
    assert "train: 2 captions of 1 image are empty or not text and are left out" in capsys.readouterr().out


def test_a_csv_row_that_ends_before_its_caption_column_is_an_error_naming_its_line(tmp_path):
    """It used to read as an empty caption, dropped in silence with its image (a comma left out)."""
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,split,caption\na.png,train,a dog\na.png train\n")
    with pytest.raises(UserError, match=r"captions.csv line 3 ends before its caption column \(1 of the header's 3"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "captions.csv").write_text("image,caption,split\na.png,a dog\n")  # only the split left out: fine
    assert [r.captions for s in SPLITS for r in load_records("folder", s, str(tmp_path))] == [["a dog"]]


def test_a_path_that_leaves_the_folder_and_comes_back_is_the_same_image(tmp_path):
    """From inside data/, "../data/x.png" is data/x.png: it got past the one-image-one-split check (a leak)."""
    data = tmp_path / "data"
    write_image(data / "images" / "x.png")
    write_image(tmp_path / "outside.png")
    write_jsonl_captions(data, [{"image": "images/x.png", "caption": "one", "split": "train"},
                                {"image": "../data/images/x.png", "caption": "two", "split": "test"}])
    with pytest.raises(UserError, match="images/x.png .*split train.*split test"):
        load_records("folder", "test", str(data))
    write_jsonl_captions(data, [{"image": "../data/images/x.png", "caption": "one", "split": "train"},
                                {"image": "../outside.png", "caption": "two", "split": "train"}])
    # A file outside the folder is used as the row names it (README: Other data).
    assert [r.image_id for r in load_records("folder", "train", str(data))] == ["images/x.png", "../outside.png"]


def test_hub_parquet_written_by_pyarrow_has_its_image_bytes_read(tmp_path):
    # Parquet written without `datasets` (pandas, pyarrow) lacks the schema note that the column holds
    # images: its {bytes, path} structs came back as dicts ("'dict' object has no attribute 'load'").
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def image_bytes(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 8), colour).save(buffer, "PNG")
        return buffer.getvalue()

    path = tmp_path / "own.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"image": {"bytes": image_bytes((200, 0, 0)), "path": "a.png"}, "caption": ["red"], "split": "train",
         "filename": "a.png"},
        {"image": {"bytes": image_bytes((0, 200, 0)), "path": "b.png"}, "caption": ["green"], "split": "test",
         "filename": "b.png"}]), path)
    [record] = load_records("flickr30k", "test", hub_data_files=str(path))
    assert record.open().size == (16, 8) and record.open().getpixel((0, 0)) == (0, 200, 0)
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": b"not an image", "path": "c.png"}, "caption": ["grey"],
                                          "split": "test", "filename": "c.png"}]), path)
    [record] = load_records("flickr30k", "test", hub_data_files=str(path))
    with pytest.raises(UserError, match=r"^cannot read image c.png \(row 0\): its bytes are no image Pillow recogn"):
        record.open()  # Pillow said "cannot identify image file <_io.BytesIO object at 0x7f...>"
    pq.write_table(pa.Table.from_pylist([{"image": 7, "caption": ["seven"], "split": "train"}]), path)
    with pytest.raises(UserError, match="column 'image' holds Value.*int64.*, not images; give it the image file's"):
        load_records("flickr30k", "train", hub_data_files=str(path))


def test_one_training_image_holding_most_captions_is_noted(tmp_path, capsys):
    """A caption file joined wrongly can give one image thousands of rows: 88% of the training pairs went
    to one image in silence. Ordinary spreads (5 to 7 captions, a tiny set) say nothing."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_image(tmp_path / name)
    spread = {"a.png": 7, "b.png": 5, "c.png": 5, "d.png": 6}
    write_jsonl_captions(tmp_path, [{"image": name, "captions": [f"caption {i}" for i in range(count)], "split": "train"}
                                    for name, count in spread.items()])
    load_records("folder", "train", str(tmp_path))
    assert "note: train:" not in capsys.readouterr().out
    write_jsonl_captions(tmp_path, [{"image": name, "captions": [f"caption {i}" for i in range(count)],
                                     "split": "train" if name != "c.png" else "test"}
                                    for name, count in {**spread, "b.png": 300}.items()])
    load_records("folder", "test", str(tmp_path))
    assert "note:" not in capsys.readouterr().out  # a test image's references are not training pairs
    load_records("folder", "train", str(tmp_path))
    assert ("note: train: b.png has 300 of the 313 captions (96%; the median image has 7); each caption is a "
            "training pair") in capsys.readouterr().out


def test_tiny_backbones_pre_train_on_the_training_split_train_py_deals_by_default(tmp_path, monkeypatch):
    """On a caption folder without splits the builder dealt with its own seed (0), so its LM pre-trained on
    captions of images train.py (seed 42) then validates and tests on: smoke-test scores that flatter."""
    import demo
    from dataset import DEFAULT_SEED

    for i in range(40):
        write_image(tmp_path / "data" / f"{i}.png")
    write_jsonl_captions(tmp_path / "data", [{"image": f"{i}.png", "caption": f"picture {i}"} for i in range(40)])
    seen = []

    def pretrain(caption_groups, *rest, **kwargs):
        seen.extend(caption for group in caption_groups for caption in group)
        raise KeyboardInterrupt  # the captions are all this test needs

    monkeypatch.setattr(demo, "pretrain_tiny_lm", pretrain)
    monkeypatch.setattr(demo, "process_group_rank", lambda: 0)
    with pytest.raises(KeyboardInterrupt):
        demo.build_tiny_backbones(tmp_path / "data", tmp_path / "tiny", seed=0, progress=False)
    trained = load_records("folder", "train", str(tmp_path / "data"), seed=DEFAULT_SEED)
    assert sorted(seen) == sorted(c for r in trained for c in r.captions) and len(seen) < 40


def test_a_data_note_is_printed_by_the_first_process_of_each_machine_only(tmp_path, capsys, monkeypatch):
    """Every process of a launch loads the same caption file and finds the same things to say: the second
    process of a machine (LOCAL_RANK 1) says nothing, the first says it once, as a lone process does."""
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [{"image": "a.png", "captions": ["a dog", "a  dog"], "split": "train"},
                                    {"image": "b.png", "captions": [" "], "split": "train"}])
    for local_rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert [r.image_id for r in load_records("folder", "train", str(tmp_path))] == ["a.png"]
        printed = capsys.readouterr().out
        assert ("a caption written more than once" in printed and "no usable caption" in printed) == says, printed


def test_hub_rows_of_one_filename_holding_different_images_are_an_error_not_merged(tmp_path):
    # Photos of two folders with one name, or a filename column of one value: merged, the first image was
    # kept with every row's captions and the others were lost without a word.
    import datasets

    rows = {"image": [Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16)), noise_image((24, 24)),
                      Image.new("RGB", (8, 8))],
            "caption": [["a dog"], ["a black dog"], ["a cat"], ["a bird"]], "split": ["train"] * 3 + ["test"],
            "filename": ["1.jpg", "1.jpg", "1.jpg", "2.jpg"]}
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    with pytest.raises(UserError, match=r"rows 0 and 2 both name image 1.jpg but hold different images; give each"):
        load_flickr30k_hub("train", str(path))
    one_image = {**rows, "image": rows["image"][:2] * 2}  # rows 0-2 the same image: its captions, merged
    datasets.Dataset.from_dict(one_image).cast_column("image", datasets.Image()).to_parquet(str(path))
    assert [r.captions for r in load_flickr30k_hub("train", str(path))] == [["a dog", "a black dog", "a cat"]]


def noise_image(size):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_captions_saved_as_the_text_of_a_list_are_that_lists_captions(tmp_path):
    # nlphuji/flickr30k's CSV holds an image's captions as one JSON list, pandas writes a list column to CSV
    # as its repr: each was one caption, brackets and quotes included.
    import datasets

    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text('image,captions,split\na.png,"[""a dog"", ""a brown dog""]",train\n'
                                           "a.png,\"['a dog runs', \"\"it's brown\"\"]\",train\n"
                                           "a.png,[sic] a dog,train\n"
                                           "a.png,[2],train\n")  # a list, but not of captions: one caption
    [record] = load_records("folder", "train", str(tmp_path))
    assert record.captions == ["a dog", "a brown dog", "a dog runs", "it's brown", "[sic] a dog", "[2]"]
    rows = {"image": [Image.new("RGB", (8, 8))], "caption": [json.dumps(["a cat", "a grey cat"])], "split": ["test"]}
    path = tmp_path / "own.parquet"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    assert load_flickr30k_hub("test", str(path))[0].captions == ["a cat", "a grey cat"]


def test_a_list_column_written_to_csv_by_datasets_as_numpy_text_is_that_lists_captions(tmp_path):
    """datasets' Dataset.to_csv (pandas, on numpy arrays) writes a list column as "['a dog' 'a cat']", wrapped at 75
    characters: ast.literal_eval joins adjacent strings, and an image's captions were read as one, "a doga cat"."""
    import datasets

    captions = ["a dog on the grass", "a brown dog runs in the park", "it's \"fetch\"", "two dogs", "x"]
    write_image(tmp_path / "a.png")
    datasets.Dataset.from_dict({"file_name": ["a.png"], "text": [captions]}).to_csv(str(tmp_path / "metadata.csv"))
    assert "' '" in (tmp_path / "metadata.csv").read_text()  # numpy's text, as this test means
    [record] = load_records("folder", "train", str(tmp_path))
    assert record.captions == captions
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,\"['a dog' 'a cat', 'a pet']\"\n")  # neither
    assert load_records("folder", "train", str(tmp_path))[0].captions == ["['a dog' 'a cat', 'a pet']"]


def test_captions_dropped_from_images_that_keep_others_are_counted_in_a_note(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    write_jsonl_captions(tmp_path, [{"image": "a.png", "captions": ["a dog", None, 7], "split": "train"},
                                    {"image": "b.png", "captions": ["a cat"], "split": "train"},
                                    {"image": "b.png", "caption": "  ", "split": "train"},
                                    {"image": "c.png", "captions": ["a bird"], "split": "train"}])
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a dog"], ["a cat"], ["a bird"]]
    assert ("train: 3 captions of 2 images are empty or not text and are left out; the images keep their other "
            "captions (first: a.png)") in capsys.readouterr().out


def test_names_of_one_file_are_dealt_one_split_and_a_new_name_moves_no_train_image(tmp_path):
    """A symlink and its target, hard links, a path through a linked folder: one file, dealt two splits by their
    names' hashes, put training images into the test split. Now each file is dealt as one, by its name of highest
    hash, so naming a file once more never deals it out of train (what eval.py relies on for a grown folder; a
    val or test split left empty takes a stand-in from train, as when images are removed)."""
    rows = []
    for i in range(60):
        write_image(tmp_path / "images" / f"img{i}.png", (i * 4, 0, 0))
        rows.append({"image": f"images/img{i}.png", "caption": f"picture {i}"})
    write_jsonl_captions(tmp_path, rows)
    before = {r.image_id: s for s in SPLITS for r in load_records("folder", s, str(tmp_path), seed=42)}
    (tmp_path / "linked").symlink_to(tmp_path / "images")
    other_name = {}
    for i in range(0, 60, 2):
        target = tmp_path / "images" / f"img{i}.png"
        kind = ("symlink", "hardlink", "linked")[i % 3]
        other_name[f"images/img{i}.png"] = name = f"linked/img{i}.png" if kind == "linked" else f"images/{kind}{i}.png"
        if kind == "symlink":
            (tmp_path / name).symlink_to(target)
        elif kind == "hardlink":
            os.link(target, tmp_path / name)
    write_jsonl_captions(tmp_path, rows + [{"image": name, "caption": "again"} for name in other_name.values()])
    after = {r.image_id: s for s in SPLITS for r in load_records("folder", s, str(tmp_path), seed=42)}
    assert {name: after[other] for name, other in other_name.items()} == {name: after[name] for name in other_name}
    assert not [name for name, split in before.items() if split == "train" != after[name]]
    assert {"val", "test"} <= set(after.values())


def test_a_file_named_in_train_and_in_test_under_two_names_is_said_in_one_line(tmp_path, capsys):
    """Where rows name the splits, the user's split stands; a held-out split holding training files under other
    names says how many and which. A name without a split takes the one its file is given."""
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / f"{name}.png", (ord(name), 0, 0))
    (tmp_path / "b-link.png").symlink_to(tmp_path / "b.png")
    os.link(tmp_path / "c.png", tmp_path / "c-hard.png")
    os.link(tmp_path / "d.png", tmp_path / "d-hard.png")
    write_jsonl_captions(tmp_path, [{"image": "a.png", "caption": "a", "split": "train"},
                                    {"image": "b.png", "caption": "b", "split": "train"},
                                    {"image": "c.png", "caption": "c", "split": "train"},
                                    {"image": "b-link.png", "caption": "b again", "split": "test"},
                                    {"image": "c-hard.png", "caption": "c again", "split": "test"},
                                    {"image": "d.png", "caption": "d", "split": "test"},
                                    {"image": "d-hard.png", "caption": "d again"}])
    assert [r.image_id for r in load_records("folder", "test", str(tmp_path))] == [
        "b-link.png", "c-hard.png", "d.png", "d-hard.png"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("note: test: 2 of its 4 images are files the train split lists "
                                                   "under another name"), out
    assert "b-link.png = train's b.png, c-hard.png = train's c.png" in out and "optimistic" in out
    load_records("folder", "train", str(tmp_path))
    assert "another name" not in capsys.readouterr().out


def test_one_file_named_in_train_and_in_val_is_said_in_the_singular(tmp_path, capsys):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", (0, 0, 200))
    (tmp_path / "a-link.png").symlink_to(tmp_path / "a.png")
    write_jsonl_captions(tmp_path, [{"image": "a.png", "caption": "a", "split": "train"},
                                    {"image": "a-link.png", "caption": "a again", "split": "val"},
                                    {"image": "b.png", "caption": "b", "split": "val"}])
    assert [r.image_id for r in load_records("folder", "val", str(tmp_path))] == ["a-link.png", "b.png"]
    assert capsys.readouterr().out.startswith("note: val: 1 of its 2 images is a file the train split lists under "
                                              "another name (a symlink, a hard link, or a path through a linked "
                                              "folder), so its scores on them are optimistic (a-link.png = train's "
                                              "a.png); give each file one split in ")


def test_files_on_a_file_system_without_inode_numbers_are_told_apart_by_their_paths(tmp_path, monkeypatch):
    """A file system that reports no inode numbers gives 0 for every file: taken as one, all would share a split."""
    from dataset import file_identity

    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: os.stat_result(
        (real_stat(path)[0], 0, *real_stat(path)[2:10])))
    assert file_identity(tmp_path / "a.png") != file_identity(tmp_path / "b.png")
    assert file_identity(tmp_path / "a.png") == file_identity(tmp_path / "." / "a.png")


def test_hub_rows_rewritten_in_place_are_encoded_again_not_read_from_the_feature_cache(captioner, tmp_path):
    """A Hub row's cache key is the data set's fingerprint and the row: parquet files rewritten with other images
    in the same rows are another data set, whose features must not be those of the images the rows held before."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "own.parquet"

    def hub_records(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, "PNG")
        pq.write_table(pa.Table.from_pylist([{"image": {"bytes": buffer.getvalue(), "path": "a.png"},
                                              "caption": ["a square"], "split": "train", "filename": "a.png"}]), path)
        return load_records("flickr30k", "train", hub_data_files=str(path))

    red = extract_features(captioner, hub_records((200, 0, 0)), progress=False, cache_dir=tmp_path / "cache")
    blue_records = hub_records((0, 0, 200))
    blue = extract_features(captioner, blue_records, progress=False, cache_dir=tmp_path / "cache")
    assert torch.equal(blue, extract_features(captioner, blue_records, progress=False, use_cache=False))
    assert not torch.equal(blue, red)
