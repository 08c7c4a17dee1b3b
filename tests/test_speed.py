"""Fast paths give the same answers as the plain ones: feature cache, compiled loss, lean decoding."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import (FEATURE_CACHE_LOCK, FeatureCache, ImageRecord, encoder_fingerprint, extract_features,
                     load_records)
from model import IGNORE_INDEX, AdapterConfig, Captioner, DecodingConfig, build_captioner


@pytest.fixture(scope="module")
def captioner(tiny):
    return build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))


def forbid_clip(monkeypatch, captioner):
    def fail(pixel_values):
        raise AssertionError("CLIP ran although every feature was cached")

    monkeypatch.setattr(captioner, "clip_embeddings", fail)


def count_clip_images(monkeypatch, captioner) -> list[int]:
    seen, real = [], captioner.clip_embeddings

    def counting(pixel_values):
        seen.append(len(pixel_values))
        return real(pixel_values)

    monkeypatch.setattr(captioner, "clip_embeddings", counting)
    return seen


def test_cached_features_equal_fresh_ones_and_skip_clip(tiny, captioner, tmp_path, monkeypatch):
    records = load_records("folder", "train", tiny["data_dir"])[:12]
    fresh = extract_features(captioner, records, batch_size=5, progress=False, use_cache=False)
    first = extract_features(captioner, records, batch_size=5, progress=False, cache_dir=tmp_path)
    assert torch.equal(first, fresh)
    assert len(list(tmp_path.glob("*/part-*.npy"))) == 1

    with monkeypatch.context() as patch:
        forbid_clip(patch, captioner)
        again = extract_features(captioner, records, batch_size=5, progress=False, cache_dir=tmp_path)
        # A different subset and order is served from the same cache.
        subset = extract_features(captioner, records[::-3], progress=False, cache_dir=tmp_path)
    assert torch.equal(again, fresh)
    assert torch.equal(subset, fresh[list(range(len(records)))[::-3]])

    # Only images not yet cached are encoded.
    more = load_records("folder", "train", tiny["data_dir"])[:15]
    seen = count_clip_images(monkeypatch, captioner)
    extract_features(captioner, more, batch_size=5, progress=False, cache_dir=tmp_path)
    assert sum(seen) == 3


def test_changed_encoder_or_image_is_never_served_stale(tiny, tmp_path, monkeypatch):
    import shutil

    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    # A copy: the image rewritten below would otherwise be one that other tests (and workers) read.
    data_dir = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    records = load_records("folder", "train", str(data_dir))[:4]
    extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    base = encoder_fingerprint(captioner)

    # Different weights at the same path: a new fingerprint, everything encoded again.
    with torch.no_grad():
        captioner.clip.visual_projection.weight.mul_(1.01)
    captioner._encoder_fingerprint = None
    assert encoder_fingerprint(captioner) != base
    seen = count_clip_images(monkeypatch, captioner)
    extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert sum(seen) == 4

    # Different preprocessing: a new fingerprint as well.
    captioner._encoder_fingerprint = None
    before = encoder_fingerprint(captioner)
    captioner.processor.image_mean = [0.5, 0.5, 0.5]
    captioner._encoder_fingerprint = None
    assert encoder_fingerprint(captioner) != before

    # An image rewritten in place (new size or mtime) is encoded again; the others are not.
    captioner._encoder_fingerprint = None
    extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    stat = records[0].path.stat()
    os.utime(records[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    seen.clear()
    extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert sum(seen) == 1


def test_an_image_rewritten_with_its_old_size_and_mtime_is_encoded_again(captioner, tmp_path, monkeypatch):
    """`cp -p`, `rsync -a` or an EXIF edit that keeps the date: same path, size and mtime, other pixels
    (BMPs of one size are all the same length)."""
    from PIL import Image

    from dataset import ImageRecord

    def bmp(path, colour):
        Image.new("RGB", (64, 64), colour).save(path, format="BMP")
        return path

    records = [ImageRecord(f"im{i}", ["a caption"], "train", path=bmp(tmp_path / f"im{i}.bmp", (40 * i, 90, 200)))
               for i in range(3)]
    first = extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache")
    before = records[0].path.stat()
    bmp(records[0].path, (250, 250, 20))
    os.utime(records[0].path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = records[0].path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    seen = count_clip_images(monkeypatch, captioner)
    again = extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache")
    assert sum(seen) == 1 and torch.equal(again[1:], first[1:])
    assert torch.equal(again[0], extract_features(captioner, records[:1], progress=False, use_cache=False)[0])
    assert not torch.equal(again[0], first[0])


def test_the_same_clip_in_another_folder_shares_the_cache_and_pillow_counts(tiny, tmp_path, monkeypatch):
    import shutil

    import PIL

    base = encoder_fingerprint(build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"])))
    moved = shutil.copytree(tiny["clip_model"], tmp_path / "moved-clip")
    copy = build_captioner(AdapterConfig(clip_model=str(moved), lm_model=tiny["lm_model"]))
    assert encoder_fingerprint(copy) == base  # a moved or copied CLIP is not encoded again
    # Another Pillow may decode the same file to other pixels (its JPEG decoder, its EXIF handling).
    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    copy._encoder_fingerprint = None
    assert encoder_fingerprint(copy) != base


def test_interrupted_cache_write_is_ignored(tiny, captioner, tmp_path, monkeypatch):
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    folder = tmp_path / encoder_fingerprint(captioner)
    # A part whose keys file never got written (killed between the two writes) does not count.
    for keys_file in folder.glob("part-*.json"):
        keys_file.unlink()
    assert FeatureCache(tmp_path, encoder_fingerprint(captioner)).missing(["x"]) == [0]
    seen = count_clip_images(monkeypatch, captioner)
    again = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert sum(seen) == 3 and torch.equal(again, expected)



def _nan_row(stored):
    stored[1] = np.nan


def _zeroed_rows(stored):  # what a crash can leave of blocks never flushed to the disk
    stored[:2] = 0


def _flipped_bit(stored):  # still a finite number, only slightly off
    stored.view(np.uint32)[2, 5] ^= 1 << 20


@pytest.mark.parametrize("damage", [_nan_row, _zeroed_rows, _flipped_bit])
def test_cached_features_whose_bytes_changed_are_extracted_again(tiny, captioner, tmp_path, monkeypatch, capsys,
                                                                 damage):
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    [part] = (tmp_path / encoder_fingerprint(captioner)).glob("part-*.npy")
    stored = np.load(part, mmap_mode="r+")
    damage(stored)
    stored.flush()
    del stored
    seen = count_clip_images(monkeypatch, captioner)
    again = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert sum(seen) == 3 and torch.equal(again, expected)  # re-encoded, not read from the damaged part
    assert "(its bytes are not those it was written with); deleting it" in capsys.readouterr().err
    assert not part.exists()


def test_a_damaged_part_that_cannot_be_deleted_is_never_read_again(tiny, captioner, tmp_path, monkeypatch, capsys):
    """A read-only cache: the damaged part stays on the disk, and the second look must not take it
    back (it once did: NaN features for one image, left out of training unreported)."""
    import dataset

    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    [part] = (tmp_path / encoder_fingerprint(captioner)).glob("part-*.npy")
    stored = np.load(part, mmap_mode="r+")
    stored[0] = np.nan
    stored.flush()
    del stored
    real_unlink = type(part).unlink

    def read_only_unlink(self, missing_ok=False):
        if self.parent == part.parent:
            raise PermissionError(13, "Read-only file system", str(self))
        return real_unlink(self, missing_ok)

    monkeypatch.setattr(type(part), "unlink", read_only_unlink)
    monkeypatch.setattr(dataset, "replace_durably", lambda tmp, path: (_ for _ in ()).throw(
        OSError(30, "Read-only file system", str(path))))
    monkeypatch.setattr(dataset, "_UNWRITABLE_CACHES", set())
    monkeypatch.setattr(dataset, "_DROPPED_PARTS", set())
    again = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert torch.equal(again, expected) and part.exists()
    err = capsys.readouterr().err
    assert err.count("cannot be read") == 1 and "cannot be written" in err


def test_a_cache_write_that_fails_leaves_no_file_behind(tiny, captioner, tmp_path, monkeypatch, capsys):
    """A full disk: the run goes on with its features in memory, and the half-written part is
    removed (left behind, each run would add one to a disk that is already full)."""
    import dataset

    def disk_full(tmp, path):
        raise OSError(28, "No space left on device", str(tmp))

    monkeypatch.setattr(dataset, "replace_durably", disk_full)
    monkeypatch.setattr(dataset, "_UNWRITABLE_CACHES", set())
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    features = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert torch.equal(features, extract_features(captioner, records, progress=False, use_cache=False))
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != FEATURE_CACHE_LOCK] == []


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_cache_write_stopped_between_a_parts_two_files_leaves_neither(tiny, captioner, tmp_path, monkeypatch,
                                                                         stop):
    """Ctrl-C or a full disk after the part's .npy and before its keys file: the whole .npy stayed, never read
    (it has no keys) and never deleted, one more on the disk for each run this happened to."""
    import dataset

    def keys_file_not_written(path, data):
        raise stop

    monkeypatch.setattr(dataset, "write_json", keys_file_not_written)
    monkeypatch.setattr(dataset, "_UNWRITABLE_CACHES", set())
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    with pytest.raises(KeyboardInterrupt) if isinstance(stop, KeyboardInterrupt) else contextlib.nullcontext():
        extract_features(captioner, records, progress=False, cache_dir=tmp_path)  # a full disk: kept in memory
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != FEATURE_CACHE_LOCK] == []


def test_pieces_a_killed_cache_write_left_are_deleted_once_old(tiny, captioner, tmp_path):
    """SIGKILL or a power cut part way through a part leaves pieces that are never read: they are deleted once
    an hour old, not while another run sharing the cache may be writing them now."""
    import dataset

    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    folder = tmp_path / encoder_fingerprint(captioner)
    whole = sorted(folder.iterdir())
    loose = ["part-a.npy", "part-b.npy.tmp", "part-c.json.tmp", "part-d.json"]  # (d: its .npy deleted by hand)
    fresh = [name.replace("part-", "part-new-") for name in loose]
    for name in loose + fresh:
        (folder / name).write_bytes(b"left over")
    hour_ago = time.time() - dataset.LOOSE_PIECE_AGE_S - 60
    for path in [*whole, *(folder / name for name in loose)]:
        os.utime(path, (hour_ago, hour_ago))
    cache = FeatureCache(tmp_path, encoder_fingerprint(captioner))
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(p.name for p in whole), *fresh])
    assert cache.missing([dataset.image_key(record) for record in records]) == []  # the whole part stays in use
    assert torch.equal(extract_features(captioner, records, progress=False, cache_dir=tmp_path), expected)


def test_an_image_whose_clip_features_are_not_finite_is_a_bad_sample_never_cached(tiny, captioner, tmp_path,
                                                                                  monkeypatch):
    from utils import UserError

    records = load_records("folder", "train", tiny["data_dir"])[:3]
    real = captioner.clip_embeddings

    def overflowing(pixel_values):  # as an fp16 CLIP can overflow on one image
        out = real(pixel_values)
        out[1] = float("inf")
        return out

    monkeypatch.setattr(captioner, "clip_embeddings", overflowing)
    bad = []
    features = extract_features(captioner, records, progress=False, cache_dir=tmp_path, on_bad_sample="skip",
                                bad_samples=bad)
    assert [image for image, _ in bad] == [records[1].image_id] and "NaN or infinite features" in bad[0][1]
    assert torch.isnan(features[1]).all() and torch.isfinite(features[[0, 2]]).all()
    assert FeatureCache(tmp_path, encoder_fingerprint(captioner)).missing(
        [__import__("dataset").image_key(r) for r in records]) == [1]
    with pytest.raises(UserError, match=f"{records[1].image_id}: CLIP gave NaN or infinite features"):
        extract_features(captioner, records, progress=False, cache_dir=tmp_path / "other", on_bad_sample="error")


def test_a_feature_cache_that_cannot_be_written_is_a_note_not_a_stop(tiny, captioner, tmp_path, monkeypatch, capsys):
    import dataset

    monkeypatch.setattr(dataset, "FEATURE_PART_SIZE", 2)  # several parts: the first failure is not the last write
    monkeypatch.setattr(dataset, "_UNWRITABLE_CACHES", set())
    records = load_records("folder", "train", tiny["data_dir"])[:5]
    expected = extract_features(captioner, records, progress=False, use_cache=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the cache folder would be inside a file: every write fails, as on a read-only disk
    features = extract_features(captioner, records, progress=False, cache_dir=blocker / "cache")
    assert torch.allclose(features, expected, atol=1e-5)  # (CLIP batches of 2 here, of 5 there)
    assert capsys.readouterr().err.count("cannot be written") == 1
    # The next split of the same run (validation after training) says nothing new.
    val = extract_features(captioner, load_records("folder", "val", tiny["data_dir"])[:2], progress=False,
                           cache_dir=blocker / "cache")
    assert torch.isfinite(val).all() and "cannot be written" not in capsys.readouterr().err
    # Under a launcher every process meets the same read-only cache: only each machine's first says so.
    monkeypatch.setattr(dataset, "_UNWRITABLE_CACHES", set())
    monkeypatch.setenv("LOCAL_RANK", "1")
    features = extract_features(captioner, records, progress=False, cache_dir=blocker / "cache")
    assert torch.allclose(features, expected, atol=1e-5) and "cannot be written" not in capsys.readouterr().err


def _noise_images(folder, count: int = 3) -> list:
    """Images CLIP's preprocessing must resize (the demo's are already its 64x64), so that its resampling counts."""
    from PIL import Image

    from dataset import ImageRecord

    generator = np.random.default_rng(0)
    folder.mkdir()
    records = []
    for i in range(count):
        path = folder / f"im{i}.png"
        Image.fromarray(generator.integers(0, 256, (83, 97, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(f"im{i}", ["a caption"], "train", path=path))
    return records


@pytest.mark.parametrize("setting, value", [("size", {"shortest_edge": 80}), ("resample", 2), ("image_mean", [0.5] * 3),
                                            ("image_std", [0.5] * 3), ("rescale_factor", 1 / 200)])
def test_features_cached_under_other_preprocessing_are_extracted_again(captioner, tmp_path, monkeypatch, setting,
                                                                       value):
    """Every preprocessing setting changes what CLIP sees (image size, resize mode, normalisation): features cached
    under the old one are stale."""
    import copy

    records = _noise_images(tmp_path / "images")
    old = extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache")
    changed = copy.deepcopy(captioner.processor)
    setattr(changed, setting, value)
    monkeypatch.setattr(captioner, "processor", changed)
    monkeypatch.setattr(captioner, "_encoder_fingerprint", None)
    expected = extract_features(captioner, records, progress=False, use_cache=False)
    assert not torch.allclose(expected, old, atol=1e-4)  # the setting matters to these images
    seen = count_clip_images(monkeypatch, captioner)
    assert torch.equal(extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache"), expected)
    assert sum(seen) == 3


def test_without_the_cache_clip_runs_every_time_and_writes_nothing(tiny, captioner, tmp_path, monkeypatch):
    """use_cache=False (train.py --no-feature-cache) re-encodes, even images a cache holds, and leaves no file."""
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache")
    before = sorted(tmp_path.rglob("*"))
    seen = count_clip_images(monkeypatch, captioner)
    assert torch.equal(extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache",
                                        use_cache=False), expected)
    extract_features(captioner, records, progress=False, use_cache=False)
    assert sum(seen) == 6 and sorted(tmp_path.rglob("*")) == before  # the default cache (in tmp_path) untouched


def test_the_default_feature_cache_is_under_captioner_home(tiny, captioner, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path / "home"))
    extract_features(captioner, load_records("folder", "train", tiny["data_dir"])[:2], progress=False)
    assert [p.parent.relative_to(tmp_path) for p in tmp_path.rglob("part-*.npy")] == \
        [Path("home", "features", encoder_fingerprint(captioner))]


def test_a_run_folders_cache_that_exists_but_holds_no_features_is_not_used(tmp_path, capsys):
    """The path a run folder names may be any folder on this machine (~/.ssh): extraction would write there."""
    from dataset import run_feature_cache

    (tmp_path / "somewhere").mkdir()
    assert run_feature_cache(str(tmp_path / "somewhere")) is None
    assert "holds no features on this machine" in capsys.readouterr().err


def test_a_partial_hit_with_an_unreadable_image_gives_each_record_its_own_features(tiny, captioner, tmp_path):
    """Records in another order than the cache holds them, some cached and some not, one unreadable between them:
    each gets its own image's features, as extracted and as read back, and the unreadable one a row of NaN."""
    from dataset import ImageRecord

    records = load_records("folder", "train", tiny["data_dir"])[:4]
    expected = extract_features(captioner, records, progress=False, use_cache=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    extract_features(captioner, [records[2]], progress=False, cache_dir=tmp_path / "cache")
    mixed = [records[3], ImageRecord("broken", ["a caption"], "train", path=broken), records[0], records[2], records[1]]
    for _ in ("extracted", "read back"):
        bad = []
        features = extract_features(captioner, mixed, batch_size=2, progress=False, cache_dir=tmp_path / "cache",
                                    on_bad_sample="skip", bad_samples=bad)
        assert [image for image, _ in bad] == ["broken"] and torch.isnan(features[1]).all()
        assert torch.allclose(features[[0, 2, 3, 4]], expected[[3, 0, 2, 1]], atol=1e-6)


def test_extraction_progress_counts_every_image_and_a_cached_split_says_so(tiny, captioner, tmp_path, capsys):
    from dataset import ImageRecord

    records = load_records("folder", "train", tiny["data_dir"])[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    extract_features(captioner, [*records, ImageRecord("broken", ["a caption"], "train", path=broken)], batch_size=2,
                     desc="CLIP features (val)", cache_dir=tmp_path / "cache", on_bad_sample="skip", bad_samples=[])
    said = capsys.readouterr()
    assert said.out == "" and said.err.rstrip().splitlines()[-1].startswith("CLIP features (val): 100%")
    assert " 4/4 [" in said.err.rstrip().splitlines()[-1]  # the unreadable image counted
    extract_features(captioner, records, desc="CLIP features (val)", cache_dir=tmp_path / "cache")
    said = capsys.readouterr()
    assert said.err == ""  # no bar: nothing to encode
    assert said.out == f"CLIP features (val): 3 images read from the feature cache " \
                       f"{tmp_path / 'cache' / encoder_fingerprint(captioner)}\n"


@dataclasses.dataclass
class NotingWhereDecoded(ImageRecord):
    """A record that notes, in a file named by the process id, which process decoded it (at module level: a worker
    started by spawn or forkserver, Python 3.14's default, unpickles it by name)."""

    noted_in: Path | None = None

    def open(self):
        (self.noted_in / str(os.getpid())).touch()
        return super().open()


def test_images_are_decoded_in_num_workers_processes_and_encoded_batch_size_at_a_time(tiny, captioner, tmp_path,
                                                                                      monkeypatch):
    (tmp_path / "decoded-in").mkdir()
    records = [NotingWhereDecoded(r.image_id, r.captions, r.split, path=r.path, noted_in=tmp_path / "decoded-in")
               for r in load_records("folder", "train", tiny["data_dir"])[:5]]
    seen = count_clip_images(monkeypatch, captioner)
    extract_features(captioner, records, batch_size=2, num_workers=2, progress=False, use_cache=False)
    assert seen == [2, 2, 1]
    decoded_in = {int(path.name) for path in (tmp_path / "decoded-in").iterdir()}
    assert len(decoded_in) == 2 and os.getpid() not in decoded_in


def test_a_run_opening_the_cache_while_a_part_is_written_neither_reads_it_nor_deletes_it(tiny, captioner, tmp_path,
                                                                                          monkeypatch, capsys):
    """Runs share a cache: another one may open it at any moment of a part's write. A file's bytes reach the disk a
    piece at a time; seen half-written, the part was taken as damaged and deleted under its writer."""
    import pathlib

    from dataset import image_keys

    records = load_records("folder", "train", tiny["data_dir"])[:3]
    fingerprint, real_write_bytes, opened = encoder_fingerprint(captioner), pathlib.Path.write_bytes, []

    def written_in_two_halves(path, data):
        if path.parent.name != fingerprint:
            return real_write_bytes(path, data)
        with path.open("wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            other_run = FeatureCache(tmp_path, fingerprint, captioner.config.image_feature_dim)
            opened.append(other_run.missing(image_keys(records)))
            file.write(data[len(data) // 2 :])
        return len(data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", written_in_two_halves)
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert opened == [[0, 1, 2]] and "cannot be read" not in capsys.readouterr().err
    seen = count_clip_images(monkeypatch, captioner)
    assert torch.equal(extract_features(captioner, records, progress=False, cache_dir=tmp_path), expected)
    assert sum(seen) == 0


def test_a_run_encoding_into_the_cache_makes_another_wait_and_then_read_its_part(tiny, captioner, tmp_path,
                                                                                    monkeypatch, capsys):
    """Two runs started at once on the same images (train.py twice, each its own run name) both found every image
    missing from the shared cache: each encoded all of them, CLIP twice per image and two copies on the disk. The
    second now waits while the first writes, then reads what it wrote and encodes nothing."""
    import shutil
    import threading

    from utils import waiting_lock

    records = load_records("folder", "train", tiny["data_dir"])[:6]
    fresh = extract_features(captioner, records, progress=False, cache_dir=tmp_path / "first")
    written = sorted((tmp_path / "first" / encoder_fingerprint(captioner)).glob("part-*"), key=lambda p: p.suffix)
    folder = tmp_path / encoder_fingerprint(captioner)
    folder.mkdir()
    seen, second_run = count_clip_images(monkeypatch, captioner), {}
    with waiting_lock(folder / FEATURE_CACHE_LOCK, "the first run's"):
        waiter = threading.Thread(target=lambda: second_run.update(features=extract_features(
            captioner, records, progress=False, cache_dir=tmp_path)))
        waiter.start()
        said, deadline = "", time.monotonic() + 60
        while "waiting for another run encoding into the feature cache" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().err
        assert "waiting for another run" in said and seen == []
        for path in reversed(written):  # as the first run writes a part: its .npy, then its keys
            shutil.copy(path, folder)
    waiter.join(60)
    assert seen == [] and torch.equal(second_run["features"], fresh)
    assert len(list(folder.glob("part-*.npy"))) == 1


def test_the_processes_of_one_evaluation_encode_their_shards_without_taking_turns(tiny, captioner, tmp_path,
                                                                                   monkeypatch):
    """eval.py's processes each encode a shard of their own at once: taking turns at the cache, as separate runs
    do, would have made 8 GPUs encode one after another. A lone evaluation takes its turn."""
    import eval as eval_script
    from utils import Processes

    records = load_records("folder", "train", tiny["data_dir"])[:4]
    took, original = [], FeatureCache.writing
    monkeypatch.setattr(FeatureCache, "writing", lambda cache: took.append(cache) or original(cache))
    features = eval_script.clip_features(captioner, records[:2], 2, 0, False, "shard", {"cache_dir": str(tmp_path)},
                                         processes=Processes(0, 2))
    assert took == [] and torch.equal(features, extract_features(captioner, records[:2], progress=False,
                                                                  use_cache=False))
    eval_script.clip_features(captioner, records[2:], 2, 0, False, "alone", {"cache_dir": str(tmp_path)},
                              processes=Processes())
    assert len(took) == 1


def test_a_shard_whose_cached_part_was_damaged_encodes_it_again_without_taking_turns(tiny, captioner, tmp_path,
                                                                                       monkeypatch):
    """The extraction again after a damaged part (take_turns=False, as eval.py's processes ask) takes no turns
    either."""
    records = load_records("folder", "train", tiny["data_dir"])[:2]
    expected = extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    [part] = (tmp_path / encoder_fingerprint(captioner)).glob("part-*.npy")
    stored = np.load(part, mmap_mode="r+")
    stored[0, 0] += 1.0
    stored.flush()
    del stored
    took, original = [], FeatureCache.writing
    monkeypatch.setattr(FeatureCache, "writing", lambda cache: took.append(cache) or original(cache))
    again = extract_features(captioner, records, progress=False, cache_dir=tmp_path, take_turns=False)
    assert took == [] and torch.equal(again, expected)


def test_parts_encode_each_image_once_an_unreadable_one_too_and_count_on(tiny, captioner, tmp_path, monkeypatch):
    """Each part takes the next images still missing: an unreadable one (never cached, so still missing) is not
    encoded again with the next part, and each part's label counts on from the last."""
    import dataset

    records = load_records("folder", "train", tiny["data_dir"])[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records[0] = ImageRecord("broken", ["a caption"], "train", path=broken)
    encoded, real_encode = [], dataset._encode
    monkeypatch.setattr(dataset, "FEATURE_PART_SIZE", 2)
    monkeypatch.setattr(dataset, "_encode", lambda captioner, chunk, *args: encoded.append(
        ([record.image_id for record in chunk], args[3])) or real_encode(captioner, chunk, *args))
    extract_features(captioner, records, progress=False, desc="CLIP", cache_dir=tmp_path, on_bad_sample="skip",
                     bad_samples=[])
    assert [ids for ids, _ in encoded] == [[record.image_id for record in records[:2]],
                                           [record.image_id for record in records[2:]]]
    assert [label for _, label in encoded] == ["CLIP 2/4 new", "CLIP 4/4 new"]


def test_greedy_loop_gives_the_tokens_of_generate(captioner):
    torch.manual_seed(3)
    features = torch.nn.functional.normalize(torch.randn(6, captioner.config.image_feature_dim), dim=-1)
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=12)
    prefix = captioner.prefix_embeds(features)
    reference = captioner.hf_generate_tokens(prefix, decoding)
    ours = captioner.greedy_tokens(prefix, decoding.max_new_tokens)
    eos = captioner.config.eos_token_id
    assert (reference == eos).any(), "the fixture should end some captions early"
    assert captioner.decode(ours) == captioner.decode(reference)
    width = min(ours.shape[1], reference.shape[1])
    assert torch.equal(ours[:, :width], reference[:, :width])
    # One image at a time (inference.py's path) gives the same captions as the batch.
    singles = [captioner.decode(captioner.greedy_tokens(prefix[i : i + 1], 12))[0] for i in range(6)]
    assert singles == captioner.decode(reference)


def test_the_lm_head_gets_dense_rows_from_every_decoding(captioner):
    """The first step of each decoding asks for the last position's logits, a strided slice of the prefix's
    hidden states: F.linear then multiplied by a copy of the whole head per row on a CPU (38 s instead of
    43 ms for 16 rows in bf16). The head must see its rows with the default strides, alone or in a batch,
    greedy (the product's loop) or through `generate` (beam search, sampling)."""
    from model import default_strides

    head = captioner.lm.get_output_embeddings()
    seen = []
    spy = head.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape, args[0].stride())))
    try:
        torch.manual_seed(3)
        features = torch.nn.functional.normalize(torch.randn(3, captioner.config.image_feature_dim), dim=-1)
        prefix = captioner.prefix_embeds(features)
        for rows in (prefix[:1], prefix):
            captioner.greedy_tokens(rows, 4)
            captioner.hf_generate_tokens(rows, DecodingConfig(strategy="beam", num_beams=2, max_new_tokens=4))
    finally:
        spy.remove()
    assert any(shape[0] == 1 for shape, _ in seen) and any(shape[0] == 3 for shape, _ in seen)
    assert [(shape, stride) for shape, stride in seen if stride != default_strides(shape)] == []


def counting_aot_eager(graphs: list):
    """A torch.compile backend that traces as inductor would (aot_eager: graph breaks,
    functionalisation, no C++ compilation) and records each graph it is given."""

    def backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    return backend


def test_static_cache_decoding_gives_the_tokens_of_the_eager_loop(captioner):
    """The compiled-decoding path (static KV cache, one compiled step, reused and reset across
    calls and shapes) without CUDA graphs. Eight batch sizes, as inference.py meets them when
    some images are unreadable, compile one graph per power of two, not one per size (which
    would reach torch.compile's limit of 8 and then quietly run eager)."""
    torch.manual_seed(6)
    features = torch.nn.functional.normalize(torch.randn(8, captioner.config.image_feature_dim), dim=-1)
    prefix = captioner.prefix_embeds(features)
    batches = [prefix[:n] for n in (6, 1, 2, 3, 5, 7, 8, 4)]
    eager = [captioner.greedy_tokens(p, 12) for p in batches]
    eager_longer = captioner.greedy_tokens(prefix[:2], 16, stop_at_eos=False)
    assert not captioner.enable_compiled_decoding()  # on a CPU the default keeps the eager loop
    graphs, reused = [], {}
    try:
        assert captioner.enable_compiled_decoding(backend=counting_aot_eager(graphs), mode=None, cuda_only=False)
        for _ in range(2):  # the second round reuses (and resets) the static caches of the first
            static = [captioner.greedy_tokens(p, 12) for p in batches]
            for ours, reference in zip(static, eager, strict=True):
                assert torch.equal(ours, reference)
            if not reused:
                reused = dict(captioner._static_caches)
        assert sorted(batch for batch, _ in captioner._static_caches) == [1, 2, 4, 8]
        # The second round's caches are the first's: a captured CUDA graph reads the buffers it was captured with.
        assert all(captioner._static_caches[shape] is cache for shape, cache in reused.items())
        assert len(graphs) == 4
        # A longer budget for a batch size seen before is a cache of its own length, not the shorter one's.
        assert torch.equal(captioner.greedy_tokens(prefix[:2], 16, stop_at_eos=False), eager_longer)
        assert captioner.decode_step is not None, "the longer budget fell back to eager decoding"
        assert (2, captioner.config.prefix_length + 16) in captioner._static_caches
    finally:
        captioner.decode_step, captioner._static_caches = None, {}


def test_compiled_decoding_that_cannot_compile_falls_back_to_the_eager_loop(captioner, capsys):
    torch.manual_seed(7)
    prefix = captioner.prefix_embeds(torch.nn.functional.normalize(torch.randn(3, captioner.config.image_feature_dim),
                                                                    dim=-1))
    eager = captioner.greedy_tokens(prefix, 12)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("CUDA graphs unavailable")

    try:
        assert captioner.enable_compiled_decoding(backend=broken_backend, mode=None, cuda_only=False)
        assert torch.equal(captioner.greedy_tokens(prefix, 12), eager)
        assert captioner.decode_step is None, "decoding must stay eager after a failed compilation"
        assert "torch.compile could not run (BackendCompilerFailed" in capsys.readouterr().err
    finally:
        captioner.decode_step, captioner._static_caches = None, {}


class LargestTensor:
    """Records the most elements any op produced while active (a dispatch mode sees every op)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                record.numel = max([record.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
                return out

        self.numel, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_head_loss_equals_cross_entropy_without_the_full_logits(compiled):
    import torch.nn.functional as F

    from model import frozen_head_cross_entropy

    torch.manual_seed(5)
    rows, vocab, chunk = 40, 300, 8
    weight = torch.randn(vocab, 4, dtype=torch.float64)  # fewer elements than one chunk of logits
    labels = torch.randint(0, vocab, (rows,))
    labels[[0, 7, 39]] = -100
    hidden = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
    reference = F.cross_entropy(hidden @ weight.t(), labels)
    (reference_grad,) = torch.autograd.grad(3 * reference, hidden)

    loss_function = lambda h: frozen_head_cross_entropy(h, weight, labels, chunk_rows=chunk)  # noqa: E731
    if compiled:  # masks unlabelled rows instead of dropping them: static shapes, one graph
        loss_function = torch.compile(loss_function, backend="aot_eager", fullgraph=True)
    with LargestTensor() if not compiled else contextlib.nullcontext() as seen:  # (compiling can't be watched)
        loss = loss_function(hidden)
        (grad,) = torch.autograd.grad(3 * loss, hidden)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)  # fp32 softmax inside
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the loss alone, same value (compiled too, where padding rows are kept)
        torch.testing.assert_close(loss_function(hidden).double(), reference, rtol=1e-6, atol=1e-6)
    if not compiled:
        assert seen.numel <= chunk * vocab, "the loss built logits for more rows than one chunk"
        with LargestTensor() as plain:  # the detector itself sees a full-logits loss
            F.cross_entropy(hidden @ weight.t(), labels).backward()
        assert plain.numel == rows * vocab


def test_the_default_chunk_holds_about_logits_chunk_bytes_of_logits(monkeypatch):
    """Rows per chunk come from the vocabulary (the logits' width), not the hidden size: Qwen3's head is 148 times
    wider than its hidden states, and chunks of that many more rows would not fit in memory."""
    import model

    torch.manual_seed(5)
    rows, vocab, width = 40, 300, 4
    monkeypatch.setattr(model, "LOGITS_CHUNK_BYTES", 4 * vocab * 8)  # fp32 logits of 8 rows
    weight, labels = torch.randn(vocab, width), torch.randint(0, vocab, (rows,))
    hidden = torch.randn(rows, width, requires_grad=True)
    with LargestTensor() as seen:
        model.frozen_head_cross_entropy(hidden, weight, labels).backward()
    assert seen.numel <= 8 * vocab


def test_a_batch_of_padding_rows_only_has_a_loss_of_0_and_no_nan_gradient(captioner):
    """A process's last batch may hold padding rows only (EpochShuffleSampler): the chunked loss, in training and in
    evaluation, is 0 there, not the NaN of an empty mean, which the trainer would take for a diverged step."""
    ids = torch.randint(1, 300, (2, 5))
    batch = {"image_features": torch.randn(2, captioner.config.image_feature_dim), "input_ids": ids,
             "labels": torch.full_like(ids, IGNORE_INDEX)}
    captioner.adapter.zero_grad(set_to_none=True)
    try:
        loss = captioner(**batch)
        loss.backward()
        assert loss.item() == 0
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in captioner.adapter.parameters())
    finally:
        captioner.adapter.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert captioner(**batch).item() == 0


def test_out_of_memory_in_a_compiled_step_is_raised_not_taken_for_a_failed_compilation(captioner, capsys):
    """Running out of memory is the batch's size, not the compiler's failing: turning it into "torch.compile could not
    run" would drop --compile for the rest of the run, and retry eagerly at the same size."""
    from model import TrainingLoss

    class OutOfMemory(torch.nn.Module):  # a module: the compiled step it stands for is one
        def forward(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    out_of_memory = OutOfMemory()
    loss = TrainingLoss(captioner)
    loss.compiled = out_of_memory
    ids = torch.randint(1, 300, (2, 5))
    with pytest.raises(torch.OutOfMemoryError):
        loss(image_features=torch.randn(2, captioner.config.image_feature_dim), input_ids=ids, labels=ids)
    assert loss.compiled is out_of_memory
    prefix = captioner.prefix_embeds(torch.randn(2, captioner.config.image_feature_dim)).detach()
    captioner.decode_step = out_of_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):
            captioner.greedy_tokens(prefix, 4, stop_at_eos=False)
        assert captioner.decode_step is out_of_memory
    finally:
        captioner.decode_step, captioner._static_caches = None, {}
    assert "could not run" not in capsys.readouterr().err


def test_chunked_head_loss_gradient_survives_the_fp16_loss_scale():
    # Under --mixed-precision fp16 the loss is back-propagated times the scaler's scale, 65,536 at first. The
    # chunked loss's backward cast that scale to fp16 (inf there: every gradient inf or NaN, the step skipped)
    # and had divided each row's gradient by the token count in fp16 (where it underflows).
    from model import frozen_head_cross_entropy

    torch.manual_seed(8)
    rows, vocab, width = 16384, 64, 16
    weight = torch.randn(vocab, width) * 0.05
    hidden = torch.randn(rows, width, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    (reference,) = torch.autograd.grad(frozen_head_cross_entropy(hidden, weight, labels), hidden)
    for scale in (2.0**16, 2.0**10):
        half = hidden.detach().half().requires_grad_()
        (grad,) = torch.autograd.grad(frozen_head_cross_entropy(half, weight.half(), labels) * scale, half)
        assert torch.isfinite(grad).all(), scale
        error = (grad.float() / scale - reference).abs().max() / reference.abs().max()
        assert error < 2e-3, (scale, float(error))  # fp16's own rounding of the logits and rows: ~9e-4


def test_compiled_loss_equals_eager_and_falls_back(captioner, capsys):
    from model import TrainingLoss

    torch.manual_seed(4)
    ids = torch.randint(1, 300, (4, 9))
    labels = ids.clone()
    labels[:2, 6:] = -100
    batch = {"image_features": torch.randn(4, captioner.config.image_feature_dim), "input_ids": ids, "labels": labels}

    def loss_and_grad(loss_function):
        captioner.adapter.zero_grad()
        loss = loss_function(**batch)
        loss.backward()
        return loss.detach(), captioner.adapter.net[0].weight.grad.clone()

    eager_loss, eager_grad = loss_and_grad(captioner)
    # aot_eager traces the graph as inductor would (graph breaks, functionalisation) without the
    # minute of C++ compilation; the loss and gradients must not change.
    compiled = TrainingLoss(captioner, compile=True, backend="aot_eager")
    compiled_loss, compiled_grad = loss_and_grad(compiled)
    assert compiled.compiled is not None
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    def broken_backward(graph, example_inputs):
        raise RuntimeError("the backward graph does not compile")

    from torch._dynamo.backends.common import aot_autograd

    # A backend that compiles the forward but not the backward: torch.compile would normally meet
    # that only in loss.backward(), beyond the fallback.
    for backend in (broken_backend, aot_autograd(fw_compiler=lambda graph, inputs: graph, bw_compiler=broken_backward)):
        fallback = TrainingLoss(captioner, compile=True, backend=backend)
        fallback_loss, fallback_grad = loss_and_grad(fallback)
        assert fallback.compiled is None
        assert "torch.compile could not run" in capsys.readouterr().err
        assert torch.equal(fallback_loss, eager_loss) and torch.equal(fallback_grad, eager_grad)


def test_compiled_training_meets_few_shapes_and_keeps_each_batch_loss(captioner):
    """Real captions run from a few tokens to the cut-off: padding each batch exactly to its longest
    would compile one graph per length until torch.compile's limit (8), then silently run eager.
    Under --compile the trainer's batches come in a few bucketed shapes, and padding changes no
    batch's loss or gradient."""
    import random

    from dataset import CaptionPairs, ImageRecord
    from model import TrainingLoss
    from train import COMPILED_LENGTH_BUCKETS, make_loader, make_train_loader, parse_config

    words = "a red blue green circle square triangle on in with".split()
    rng = random.Random(0)
    records = [ImageRecord(f"im{i}", [" ".join(rng.choices(words, k=rng.randint(1, 8)))], "train") for i in range(61)]
    pairs = CaptionPairs(records, torch.randn(len(records), captioner.config.image_feature_dim), captioner.tokenizer,
                         captioner.config.eos_token_id, max_tokens=16)
    config = parse_config(["--compile", "--batch-size", "3", "--max-caption-tokens", "16", "--seed", "3"])
    pad = captioner.config.pad_token_id
    bucketed = list(make_train_loader(pairs, config, pad))
    exact = list(make_loader(pairs, 3, pad, make_train_loader(pairs, config, pad).sampler))  # same pairs, unpadded
    exact_shapes = {tuple(batch["input_ids"].shape) for batch in exact}
    bucketed_shapes = {tuple(batch["input_ids"].shape) for batch in bucketed}
    assert len(exact_shapes) > 8, "the test data should need bucketing"
    assert len(bucketed_shapes) <= COMPILED_LENGTH_BUCKETS and {rows for rows, _ in bucketed_shapes} == {3}

    graphs = []
    compiled = TrainingLoss(captioner, compile=True, backend=counting_aot_eager(graphs))
    for padded, plain in zip(bucketed, exact, strict=True):
        assert torch.equal(padded["pair_index"], plain["pair_index"])
        results = []
        for loss_function, batch in ((compiled, padded), (captioner, plain)):
            captioner.adapter.zero_grad()
            loss = loss_function(**{k: v for k, v in batch.items() if k != "pair_index"})
            loss.backward()
            results.append((loss.detach(), captioner.adapter.net[0].weight.grad.clone()))
        torch.testing.assert_close(results[0], results[1])
    assert compiled.compiled is not None
    assert len(graphs) == len(bucketed_shapes), "one graph per shape: no graph breaks, no fallback to eager"


def test_bench_tiny_prints_one_json_line_per_measurement(capsys):
    import json

    import bench

    assert bench.main(["--shapes", "tiny", "--only", "train,loss,extract,generate,latency,quantized", "--repeats",
                       "1", "--batches", "8", "--generate-batch", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    records = [r for r in lines if "bench" in r]
    assert {(r["bench"], r.get("path")) for r in records} == {
        ("train", "naive"), ("train", "product"), ("loss", "plain"), ("loss", "chunked"), ("extract", None), ("generate", "plain-generate"),
        ("generate", "product"), ("latency", "plain-generate"), ("latency", "product"), ("quantized", None)}
    assert [r["lm_quantization"] for r in records if r["bench"] == "quantized"] == ["none", "8bit", "4bit"]
    for record in records:
        assert record["device"] and record["shapes"] == "tiny"
    assert all(r["rows"] == 8 * 24 and r["peak_mem_gib"] is not None for r in records if r["bench"] == "loss")
    train_rows = [r for r in records if r["bench"] == "train"]
    assert all(r["batch"] == 8 and r["samples_per_s"] > 0 and r["caption_tokens"] == 24 for r in train_rows)
    assert all(r["median_cpu_ms"] > 0 for r in records if r["bench"] == "latency")  # on a CPU, beside wall time


def test_interleaved_timing_reports_cpu_time_that_waiting_does_not_stretch():
    """Time spent off the CPU (here a sleep; on a shared machine, other jobs' turns) counts in the wall-clock
    median but not in the CPU one, which is why a CPU's latency lines carry both."""
    import bench

    def spin():
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass

    wall, cpu = bench.interleaved_medians({"sleep": lambda: time.sleep(0.05), "spin": spin},
                                          torch.device("cpu"), repeats=3, warmup=0)
    assert wall["sleep"] >= 0.05 and cpu["sleep"] < 0.01
    assert cpu["spin"] >= 0.02 and wall["spin"] >= cpu["spin"] * 0.9


def test_target_table_judges_the_best_product_figure_never_a_baseline():
    import bench

    def row(bench_name, path, **values):
        return {"bench": bench_name, "path": path, **values}

    records = [row("train", "naive", batch=256, samples_per_s=9000, peak_mem_gib=40),  # a baseline: ignored
               row("train", "product", batch=256, samples_per_s=3000, peak_mem_gib=20),
               row("train", "product+compile", batch=256, samples_per_s=4200, peak_mem_gib=14),
               row("train", "product+compile", batch=512, samples_per_s=5000, peak_mem_gib=30),  # other batch
               row("train", "full-logits+compile", batch=256, samples_per_s=4500, peak_mem_gib=21),  # a baseline
               row("train", "product+compile", batch=256, samples_per_s=4100, peak_mem_gib=13,
                   compile_mode="reduce-overhead"),
               row("generate", "plain-generate", captions_per_s=2000), row("generate", "product", captions_per_s=900),
               row("latency", "product", median_ms=120),
               row("latency", "product+compiled-decode", median_ms=80, compiled=False)]
    table = bench.target_table(records).splitlines()
    assert len(table) == 2 + len(bench.TARGETS)
    training, memory, generate, latency, extract = table[2:]
    assert "4,200 (product+compile, batch 256)" in training and training.endswith("| yes |")
    assert "14 (product+compile, batch" in memory and memory.endswith("| yes |")
    assert "900 (product" in generate and generate.endswith("| **no** |")
    assert "80 (product+compiled-decode, compile failed: ran eager" in latency and latency.endswith("| yes |")
    # Another compile mode is named in the label.
    [reduce_overhead] = [r for r in records if r.get("compile_mode") == "reduce-overhead"]
    reduce_overhead["samples_per_s"] = 4300
    assert "4,300 (product+compile mode=reduce-overhead, batch 256)" in bench.target_table(records).splitlines()[2]
    assert "not measured" in extract



def test_targets_table_from_the_out_files_of_split_runs(tmp_path, capsys):
    import json

    import bench
    from utils import run_cli

    train = [{"bench": "train", "path": "product+compile", "batch": 256, "samples_per_s": 4100, "peak_mem_gib": 12}]
    rest = [{"bench": "generate", "path": "product", "captions_per_s": 1600},
            {"bench": "extract", "images_per_s": 3500}]
    for name, records in (("a.jsonl", train), ("b.jsonl", rest)):
        lines = [{"torch": "2.x", "device": "cpu"}] + records  # the header line a run prints first
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bench.main(["--targets-from", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    assert capsys.readouterr().out.strip() == bench.target_table(train + rest)
    assert "4,100" in bench.target_table(train + rest) and "1,600" in bench.target_table(train + rest)
    assert "note:" not in bench.target_table(train + rest)
    tiny = [{**r, "shapes": "tiny"} for r in rest]
    assert bench.target_table(tiny).endswith("the targets are for the real shapes (--shapes real) on an H100")
    assert run_cli(bench.main, ["--targets-from", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err
    assert run_cli(bench.main, ["--targets-from", str(tmp_path)]) == 2  # gpu_bench.sh's output folder, say
    assert f"is a folder; give the --out files of earlier bench.py runs in it ({tmp_path / 'a.jsonl'} " \
        in capsys.readouterr().err
    readme = tmp_path / "README.md"  # a likely slip: the file the table goes into
    for text in ("# Speed\n\n| device | figure |\n", "\n".join(map(json.dumps, train)) + "\n# note\n"):
        readme.write_text(text)
        assert run_cli(bench.main, ["--targets-from", str(readme)]) == 2
        assert capsys.readouterr().err.strip() == f"error: --targets-from {readme}: not a JSON-lines file; give the " \
            "--out files of earlier bench.py runs"


def test_bench_out_file_keeps_each_measurement_when_the_run_is_cut_short(tmp_path, monkeypatch):
    import bench
    from utils import read_jsonl

    def killed(args, captioner):  # a time limit's kill, in the middle of the next section
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "bench_generate", killed)
    out = tmp_path / "bench.jsonl"
    out.write_text('{"bench": "stale"}\n')  # an earlier run's file is replaced, not added to
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shapes", "tiny", "--only", "extract,generate", "--repeats", "1", "--out", str(out)])
    assert [r["bench"] for r in read_jsonl(out)] == ["extract"]


def bench_args(**extra):
    import argparse

    import bench

    args = argparse.Namespace(shapes="tiny", device=torch.device("cpu"), repeats=1, profile=False, compile=True,
                              batches_list=[8], records=[], adapter_kind="mlp", **extra)
    args.device_name = bench.device_name(args.device)
    return args


def test_bench_train_peak_memory_is_the_step_not_the_random_init(monkeypatch):
    """On a GPU the product's backbones are built in fp32 and cast to bf16: that transient must not be the
    figure the line gives as the step's peak memory (GPU memory simulated here: weights, then the step)."""
    import bench

    memory = {"now": 0.0, "peak": 0.0}

    def allocate(gib: float) -> None:
        memory["now"] += gib
        memory["peak"] = max(memory["peak"], memory["now"])

    real_make, real_step = bench.make_captioner, bench.training_step

    def make_captioner(*args, **kwargs):
        allocate(2.5)  # the fp32 random init ...
        allocate(-1.25)  # ... cast to bf16: 1.25 GiB of weights stay
        return real_make(*args, **kwargs)

    def training_step(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def measured_step():
            allocate(0.5)  # the step's activations, freed when it ends
            step()
            allocate(-0.5)

        measured_step.loss_function = step.loss_function
        return measured_step

    monkeypatch.setattr(bench, "make_captioner", make_captioner)
    monkeypatch.setattr(bench, "training_step", training_step)
    monkeypatch.setattr(bench, "reset_peak", lambda device: memory.update(peak=memory["now"]))
    monkeypatch.setattr(bench, "peak_gib", lambda device: memory["peak"])
    args = bench_args()
    bench.bench_train(args, "product", 4)
    assert args.records[0]["peak_mem_gib"] == 1.75  # weights + the step's activations


def test_bench_says_when_a_compiled_path_ran_eager_and_survives_a_failed_measurement(monkeypatch):
    import functools

    import bench
    from model import TrainingLoss

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler")

    args = bench_args()
    monkeypatch.setattr(bench, "TrainingLoss", functools.partial(TrainingLoss, backend=broken_backend))
    bench.bench_train(args, "product+compile", 8)
    assert args.records[-1]["compiled"] is False and args.records[-1]["samples_per_s"] > 0

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "make_captioner", out_of_memory)
    bench.bench_train(args, "naive", 8)  # must not raise: the run goes on to its other measurements
    assert args.records[-1]["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_a_failed_profile_keeps_the_step_figure_and_lets_the_run_go_on(monkeypatch, capsys):
    # On a GPU the compiled step is profiled (--profile) before the --variants are timed, and outside
    # bench_train's own try: a profiler failing there ended bench.py and lost every variant after it.
    import functools

    import bench
    from model import TrainingLoss

    def broken_profile(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(bench, "TrainingLoss", functools.partial(TrainingLoss, backend="eager"))  # fast
    monkeypatch.setattr(bench, "profile_step", broken_profile)
    args = bench_args()
    args.profile = True
    bench.bench_train(args, "product+compile", 8)  # must not raise
    assert args.records[-1]["path"] == "product+compile" and args.records[-1]["samples_per_s"] > 0
    printed = capsys.readouterr().out
    assert "profile of product+compile batch 8 failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in printed


@pytest.mark.parametrize("backend", ["aot_eager", "broken"])
def test_bench_times_compiled_decoding_and_says_whether_it_held(monkeypatch, capsys, backend):
    import json

    import bench

    def broken_backend(graph, example_inputs):
        raise RuntimeError("CUDA graphs unavailable")

    real = Captioner.enable_compiled_decoding
    monkeypatch.setattr(Captioner, "enable_compiled_decoding", lambda self: real(
        self, backend=broken_backend if backend == "broken" else backend, mode=None, cuda_only=False))
    assert bench.main(["--shapes", "tiny", "--only", "generate,latency", "--compile", "--repeats", "1",
                       "--generate-batch", "4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"device')]
    compiled = [r for r in records if r["path"] == "product+compiled-decode"]
    # After every eager figure (compiling must not weigh on them), latency first: the target it serves.
    assert [r["bench"] for r in compiled] == ["latency", "generate"]
    assert all(r["path"] == "product+compiled-decode" for r in records[-2:])
    assert all(r["compiled"] is (backend == "aot_eager") for r in compiled)


def test_bench_product_step_is_the_trainers_step_with_its_nonfinite_check(monkeypatch):
    # The product's figures must be what train.py reaches, its per-step check (and host sync) included:
    # a NaN loss goes through that check and leaves the adapter as it was.
    import bench
    from model import TrainingLoss

    captioner = bench.make_captioner("tiny", torch.device("cpu"), torch.float32)
    real = TrainingLoss.__call__
    monkeypatch.setattr(TrainingLoss, "__call__", lambda self, **batch: real(self, **batch) * float("nan"))
    before = {name: value.clone() for name, value in captioner.adapter.state_dict().items()}
    step = bench.training_step(captioner, "product", 4, bench.SHAPES["tiny"]["image_size"], torch.device("cpu"),
                               autocast_bf16=False)
    step()
    for name, value in captioner.adapter.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_quantized_bench_frees_each_lm_before_measuring_the_next(monkeypatch):
    import gc

    import bench
    from transformers import PreTrainedModel

    def live_lms() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel) and hasattr(o, "lm_head")}

    before, live_at_reset = live_lms(), []  # other tests' fixtures may hold LMs of their own

    def counting_reset(device):
        live_at_reset.append(len(live_lms() - before))

    monkeypatch.setattr(bench, "reset_peak", counting_reset)
    bench.bench_quantized(bench_args())
    # Before each mode's load, none: a previous mode's LM would count in the next mode's peak memory. After its
    # warm-up, its own: the peak is the step's, loading's transients left out.
    assert live_at_reset == [0, 1, 0, 1, 0, 1]


def test_a_quantization_that_fails_is_a_line_and_the_next_one_is_still_measured(monkeypatch):
    # The GPU's one call measures 8-bit then 4-bit: an 8-bit failure (bitsandbytes' CUDA library, its int8
    # kernels) ended the section, and the 4-bit figure, which needs none of that, was never measured.
    import bench
    import model

    real = model.lm_quantization_config

    def no_int8(mode, device):
        if mode == "8bit":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return real(mode, device)

    monkeypatch.setattr(model, "lm_quantization_config", no_int8)
    args = bench_args()
    bench.bench_quantized(args)
    modes = {r["lm_quantization"]: r for r in args.records}
    assert list(modes) == ["none", "8bit", "4bit"]
    assert modes["8bit"]["error"].startswith("RuntimeError: CUDA Setup failed")
    assert modes["none"]["samples_per_s"] > 0 and modes["4bit"]["samples_per_s"] > 0


def test_a_head_with_a_bias_keeps_its_bias_in_the_loss(captioner):
    import torch.nn.functional as F

    torch.manual_seed(7)
    head = captioner.lm.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data.copy_(head.weight.data)
    biased.bias.data.normal_(0, 2.0)
    biased.requires_grad_(False)
    ids = torch.randint(1, 300, (3, 7))
    batch = {"image_features": torch.randn(3, captioner.config.image_feature_dim), "input_ids": ids, "labels": ids}
    captioner.lm.set_output_embeddings(biased)
    try:
        loss = captioner(**batch)
        k = captioner.config.prefix_length
        embeds = torch.cat([captioner.prefix_embeds(batch["image_features"]),
                            captioner.lm.get_input_embeddings()(ids[:, :-1])], dim=1)
        hidden = captioner.lm.base_model(inputs_embeds=embeds).last_hidden_state[:, k - 1 :]
        torch.testing.assert_close(loss, F.cross_entropy(biased(hidden).reshape(-1, biased.out_features), ids.reshape(-1)))
        # A batch of padding rows only (a process's last one, see EpochShuffleSampler) adds nothing: 0, not NaN.
        assert captioner(**{**batch, "labels": torch.full_like(ids, IGNORE_INDEX)}).item() == 0
    finally:
        captioner.lm.set_output_embeddings(head)


def test_image_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    from utils import default_image_workers

    for cores, expected in ((range(1), 1), (range(3), 3), (range(64), 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(cores))
        assert default_image_workers() == expected


def test_building_image_processors_prints_no_library_warning(tiny, tmp_path):
    """Without torchvision (as on these CPU machines), transformers warns on the first import of
    CLIPImageProcessor that it falls back to the PIL backend: noise under bench.py's JSON lines and
    the demo build. Once per process, so only a fresh one shows whether it is silenced."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import bench, demo, model; from pathlib import Path; bench.image_processor('tiny'); "
              f"demo.build_tiny_clip(Path({str(tmp_path / 'clip')!r})); "
              f"model.load_backbones({tiny['clip_model']!r}, {tiny['lm_model']!r})")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr and "warn" not in done.stderr.lower(), done.stderr


def test_bench_cpu_bf16_times_the_step_train_py_runs_in_bf16_and_it_gives_the_same_loss(capsys):
    """--cpu-bf16 adds the product step as `train.py --mixed-precision bf16` runs it on a CPU (frozen weights
    in bf16, bf16 autocast, the adapter in fp32), whose loss is the fp32 step's to bf16's precision, and greedy
    captions with bf16 frozen weights."""
    import json

    import bench
    from model import TrainingLoss

    assert bench.main(["--shapes", "tiny", "--only", "train,generate,latency", "--repeats", "1", "--batches", "4",
                       "--generate-batch", "2", "--cpu-bf16"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()[1:]]
    # Captions with bf16 frozen weights too: a bf16 run captions its validation images so.
    for section in ("generate", "latency"):
        paths = {r["path"]: r for r in records if r["bench"] == section}
        assert set(paths) == {"plain-generate", "product", "product+bf16"} and paths["product+bf16"]["batch"] > 0
    lines = {r["path"]: r for r in records if r["bench"] == "train"}
    assert set(lines) == {"naive", "product", "product+bf16"}
    assert (lines["product+bf16"]["weights_dtype"], lines["product+bf16"]["autocast_bf16"]) == ("bfloat16", True)
    assert (lines["product"]["weights_dtype"], lines["product"]["autocast_bf16"]) == ("float32", False)

    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)  # the same random backbones and adapter, in either dtype
        captioner = bench.make_captioner("tiny", torch.device("cpu"), dtype)
        assert next(captioner.lm.parameters()).dtype == dtype
        assert next(captioner.adapter.parameters()).dtype == torch.float32  # trained in fp32 under autocast
        torch.manual_seed(1)
        batch = bench.random_batch(captioner, 4, bench.SHAPES["tiny"]["image_size"], torch.device("cpu"))
        del batch["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            losses[dtype] = TrainingLoss(captioner)(**batch).item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=2e-2)


def test_bench_says_cpu_bf16_changes_nothing_on_a_gpu(monkeypatch, capsys):
    """--cpu-bf16 adds lines on a CPU only: on a GPU it was silently ignored."""
    import bench

    monkeypatch.setattr(bench, "pick_device", lambda name: torch.device(name))
    for device, said in (("cuda", True), ("cpu", False)):
        bench.check_args(bench.build_parser().parse_args(["--device", device, "--cpu-bf16"]))
        assert ("--cpu-bf16" in capsys.readouterr().err) == said


def test_bench_measures_the_transformer_adapter_and_keeps_it_out_of_the_targets(capsys):
    import json

    import bench

    assert bench.main(["--shapes", "tiny", "--only", "train,latency", "--repeats", "1", "--batches", "4",
                       "--adapter-kind", "transformer"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"bench"' in line]
    assert {r["bench"] for r in records} == {"train", "latency"} and all(r["adapter"] == "transformer" for r in records)
    assert all(r["samples_per_s"] > 0 for r in records if r["bench"] == "train")
    # The targets are the MLP product's: another adapter's figures are not candidates.
    product = next(r for r in records if r["bench"] == "train" and r["path"] == "product")
    table = bench.target_table(records + [{**product, "adapter": "mlp", "batch": 256, "samples_per_s": 1.0}])
    assert "| 1.0 (product, batch 256) |" in table
    assert bench.target_table(records).count("not measured") == len(bench.TARGETS)


def test_bench_on_a_cpu_says_when_a_compiled_step_ran_eager_and_survives_a_failed_batch(monkeypatch, capsys):
    # The CPU path times the training paths in turn; its lines must carry what a GPU line says.
    import functools
    import json

    import bench
    from model import TrainingLoss

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(bench, "TrainingLoss", functools.partial(TrainingLoss, backend=broken_backend))
    real_step = bench.training_step

    def step_out_of_memory_at_8(captioner, path, batch, *args, **kwargs):
        if batch == 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_step(captioner, path, batch, *args, **kwargs)

    monkeypatch.setattr(bench, "training_step", step_out_of_memory_at_8)
    assert bench.main(["--shapes", "tiny", "--only", "train", "--compile", "--repeats", "1", "--batches", "4,8",
                       "--device", "cpu"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"bench"' in line]
    measured = {(r["path"], r["batch"]): r for r in records}
    assert measured["product+compile", 4]["compiled"] is False  # it ran eager: the line says so
    assert measured["product", 4]["compiled"] is None and measured["naive", 4]["compiled"] is None
    assert "compile failed: ran eager" in bench.target_table([{**measured["product+compile", 4], "batch": 256}])
    for path in ("product", "product+compile"):  # the failed batch size is a line each; the run went on
        assert measured[path, 8]["error"].startswith("RuntimeError: [enforce fail")


def test_bench_naive_and_quantized_default_to_the_smallest_batch_in_any_order(monkeypatch):
    import bench

    seen = {}
    monkeypatch.setattr(bench, "bench_train_interleaved",
                        lambda args, batches, naive_batches: seen.update(naive=naive_batches))
    assert bench.main(["--shapes", "tiny", "--only", "train", "--batches", "16,4", "--device", "cpu"]) == 0
    assert seen["naive"] == [4]  # --naive-batches' help: "the smallest of --batches"

    def no_step(captioner, path, batch, *args, **kwargs):
        seen.setdefault("quantized", []).append(batch)
        return lambda: None

    monkeypatch.setattr(bench, "training_step", no_step)
    args = bench_args()
    args.batches_list = [16, 4]
    bench.bench_quantized(args)
    assert seen["quantized"] == [4, 4, 4]  # its docstring: "at the smallest --batches batch"


def test_a_failed_section_is_a_line_and_the_run_goes_on(monkeypatch, capsys):
    import json
    import subprocess

    import bench

    def out_of_memory(args, captioner):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def inference_fails(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nValueError: no such weights\n")

    monkeypatch.setattr(bench, "bench_extract", out_of_memory)
    monkeypatch.setattr(bench.subprocess, "run", inference_fails)
    assert bench.main(["--shapes", "tiny", "--only", "extract,cold,generate", "--repeats", "1",
                       "--generate-batch", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"bench"' in line]
    assert [(r["bench"], r.get("error")) for r in records if "error" in r] == [
        ("extract", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("cold", "RuntimeError: inference.py failed: ValueError: no such weights")]
    assert {r.get("path") for r in records if r["bench"] == "generate"} == {"plain-generate", "product"}


def test_targets_from_refuses_files_of_several_devices_or_shapes_and_names_the_device(tmp_path, capsys):
    import json

    import bench
    from utils import run_cli

    train = {"bench": "train", "path": "product+compile", "batch": 256, "samples_per_s": 4100, "peak_mem_gib": 12,
             "device": "NVIDIA H100 80GB HBM3", "shapes": "real"}
    latency = {"bench": "latency", "path": "product", "median_ms": 90, "device": "NVIDIA H100 80GB HBM3",
               "shapes": "real"}
    (tmp_path / "a.jsonl").write_text(json.dumps(train) + "\n")
    mixed = [({**latency, "device": "NVIDIA A100-SXM4-80GB"}, "device"), ({**latency, "shapes": "tiny"}, "shapes")]
    for other, word in mixed:
        (tmp_path / "b.jsonl").write_text(json.dumps(other) + "\n")
        assert run_cli(bench.main, ["--targets-from", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and f"measurements of more than one {word}" in error
    (tmp_path / "b.jsonl").write_text(json.dumps(latency) + "\n")
    assert bench.main(["--targets-from", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    assert "measured on: NVIDIA H100 80GB HBM3" in capsys.readouterr().out


def test_bench_rates_keep_three_significant_digits_when_slow(monkeypatch, capsys):
    # A real-shaped step on a busy 2-core CPU took 102.2 s for 4 samples: 0.0391 samples/s, not "0.0".
    import json

    import bench

    monkeypatch.setattr(bench, "timed_interleaved",
                        lambda functions, device, repeats, warmup: {name: 102.2211 for name in functions})
    assert bench.main(["--shapes", "tiny", "--only", "train,generate", "--batches", "4", "--generate-batch", "2",
                       "--device", "cpu"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"bench"' in line]
    assert {r["samples_per_s"] for r in records if r["bench"] == "train"} == {0.0391}
    assert {r["captions_per_s"] for r in records if r["bench"] == "generate"} == {0.0196}
    assert bench.per_second(256, 0.0607) == 4217.5 and bench.per_second(8, 0.5) == 16.0


@pytest.mark.parametrize("capability, bf16", [(7, False), (8, True)])
def test_bf16_is_chosen_only_on_gpus_that_compute_in_it(monkeypatch, capability, bf16):
    # A T4 or V100 (compute capability 7) only emulates bf16, and torch.cuda.is_bf16_supported() says yes
    # there: the automatic choices must look at the hardware, or every run on such a GPU crawls in bf16.
    from types import SimpleNamespace

    import bench
    import eval as eval_script
    import model
    import train

    pytest.importorskip("bitsandbytes")  # imported before CUDA is faked: it sets itself up by what it finds
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=capability))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    gpu = torch.device("cuda")
    assert train.auto_mixed_precision() == ("bf16" if bf16 else "no")
    assert eval_script.default_dtype(gpu) == bench.compute_dtype(gpu) == (torch.bfloat16 if bf16 else torch.float32)
    assert model.lm_quantization_config("4bit", gpu).bnb_4bit_compute_dtype == (torch.bfloat16 if bf16 else torch.float16)
    if not bf16:
        with pytest.raises(model.UserError, match="^--dtype bf16: the GPU .* has no bf16"):
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
            eval_script.chosen_dtype("bf16", gpu)


# Cold start: `python inference.py --checkpoint RUN photo.jpg`, process start to printed caption.

# Run as __main__ the way `python inference.py` runs it, counting the cyclic collector's full passes
# from the script's first line; prints the script's exit code, the modules it imported and how the
# collector was left, as one JSON line after the caption.
COLD_START = """
import gc, json, runpy, sys
full_passes = []
gc.callbacks.append(lambda phase, info: full_passes.append(1) if phase == "stop" and info["generation"] == 2 else 0)
sys.argv = ["inference.py", *sys.argv[1:]]
try:
    runpy.run_path("inference.py", run_name="__main__")
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "modules": sorted(sys.modules), "full_passes": len(full_passes),
                  "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""

# Imported lazily by the paths that need them (data from the Hub, metrics, the report, the web page,
# --lm-quantization); none is used to caption an image.
NOT_FOR_A_CAPTION = ("datasets", "pyarrow", "pandas", "sklearn", "nltk", "rouge_score", "pycocoevalcap", "matplotlib",
                     "gradio", "bitsandbytes")


def test_one_caption_from_a_cold_start_imports_and_collects_only_what_it_needs(tiny, checkpoint):
    """Torch, transformers and the backbones left some 380,000 objects that the cyclic collector went through six
    times while they loaded and again at the exit (nearly a third of the CPU time of captioning a demo image);
    Pillow imported all its ~45 format modules for the first PNG."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dataset import IMAGE_FORMAT_MODULES

    image = sorted((Path(tiny["data_dir"]) / "images").glob("*.png"))[0]
    done = subprocess.run([sys.executable, "-c", COLD_START, "--checkpoint", str(checkpoint), str(image)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    *captions, last = done.stdout.strip().splitlines() or [""]
    assert done.returncode == 0 and last.startswith("{"), done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(last)
    assert report["code"] == 0 and [line.split("\t")[0] for line in captions] == [str(image)], done.stderr[-2000:]
    modules = set(report["modules"])
    assert not {name for name in modules if name.split(".")[0] in NOT_FOR_A_CAPTION}
    # Pillow imports these five for any image (Image.preinit); the other formats' modules are never needed.
    first_ones = {"BmpImagePlugin", "GifImagePlugin", "JpegImagePlugin", "PpmImagePlugin", "PngImagePlugin"}
    formats = {name[len("PIL."):] for name in modules if name.startswith("PIL.") and name.endswith("ImagePlugin")}
    assert formats <= first_ones | set(IMAGE_FORMAT_MODULES), sorted(formats)
    # One full pass (resume_gc's), not one per few thousand objects loaded; then the collector is on again,
    # with what start-up left set aside.
    assert report["full_passes"] == 1 and report["gc_enabled"] and report["frozen"] > 100_000, report


def test_main_called_from_python_leaves_the_garbage_collector_alone(tiny, checkpoint, capsys):
    import gc
    from pathlib import Path

    import inference

    image = sorted((Path(tiny["data_dir"]) / "images").glob("*.png"))[0]
    frozen = gc.get_freeze_count()
    assert inference.main(["--checkpoint", str(checkpoint), str(image)]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen  # a test process's objects were never frozen for good


def test_loading_an_adapter_draws_no_random_weights_only_to_overwrite_them(checkpoint):
    """An adapter for the real backbones (55M parameters) took 0.2-0.4 s to draw random weights that the
    checkpoint's then replaced; the adapter loaded holds exactly the saved tensors all the same."""
    from safetensors.torch import load_file

    from model import ADAPTER_WEIGHTS, load_captioner

    load_captioner(checkpoint)  # once, so that first-time set-up in the libraries is not counted
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    adapter = load_captioner(checkpoint).adapter
    assert torch.equal(torch.random.get_rng_state(), before)
    saved = load_file(str(checkpoint / ADAPTER_WEIGHTS))
    state = adapter.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[name], saved[name]) for name in saved)


def test_the_adapters_file_is_let_go_once_loaded_while_the_collector_is_paused(checkpoint):
    """inference.py captions its first batch with the cyclic collector paused; the adapter file's tensors, held
    by the frames that torch.fx.wrap's frame keeps in a reference cycle while the backbones load, were the
    adapter's size again at the peak memory (219 MiB of 3.3 GiB for the real backbones)."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import gc, sys, weakref
gc.disable()  # as inference.py starts
import model
read, tensors = model.load_adapter_state, []
def tracked(*args, **kwargs):
    state = read(*args, **kwargs)
    tensors.extend(weakref.ref(tensor) for tensor in state.values())
    return state
model.load_adapter_state = tracked
captioner = model.load_captioner(sys.argv[1])
print(len(tensors), sum(tensor() is not None for tensor in tensors))
"""
    done = subprocess.run([sys.executable, "-c", script, str(checkpoint)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    read, alive = map(int, done.stdout.split())
    assert read > 0 and alive == 0


def test_a_new_decoding_version_or_a_vision_config_that_computes_otherwise_is_a_new_cache(tiny, tmp_path,
                                                                                          monkeypatch):
    """Two things beside the weights decide a CLIP feature: our decoding (FEATURE_CACHE_VERSION, bumped when it
    changes, since a cached feature is never decoded again) and the vision config (the same weights with another
    activation give other features). Either changed, the cached features are stale."""
    import json
    import shutil

    import dataset

    base = encoder_fingerprint(build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"])))
    with monkeypatch.context() as patch:
        patch.setattr(dataset, "FEATURE_CACHE_VERSION", dataset.FEATURE_CACHE_VERSION + 1)
        assert encoder_fingerprint(build_captioner(AdapterConfig(clip_model=tiny["clip_model"],
                                                                 lm_model=tiny["lm_model"]))) != base
    other = shutil.copytree(tiny["clip_model"], tmp_path / "other-activation")
    config = json.loads((other / "config.json").read_text())
    vision = config["vision_config"]
    vision["hidden_act"] = "gelu" if vision["hidden_act"] != "gelu" else "quick_gelu"
    (other / "config.json").write_text(json.dumps(config))
    same_weights = build_captioner(AdapterConfig(clip_model=str(other), lm_model=tiny["lm_model"]))
    original = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    pixels = torch.rand(1, 3, vision["image_size"], vision["image_size"])
    assert not torch.equal(same_weights.clip_embeddings(pixels), original.clip_embeddings(pixels))  # it matters
    assert encoder_fingerprint(same_weights) != base


def test_a_cache_damaged_again_while_it_is_read_stops_with_one_line(tiny, captioner, tmp_path, monkeypatch):
    """A part found damaged is dropped and its images extracted again, once: damaged again at the second read
    (another writer in the cache folder, a failing disk), the run stops saying so, where it would otherwise
    extract again and again until Python's recursion limit."""
    import dataset
    from utils import UserError

    records = load_records("folder", "train", tiny["data_dir"])[:2]
    extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    checks = []
    monkeypatch.setattr(dataset.FeatureCache, "verify", lambda self, keys: checks.append(keys) or list(keys))
    with pytest.raises(UserError, match=r"^the feature cache .* is being damaged while this run reads it; check"):
        extract_features(captioner, records, progress=False, cache_dir=tmp_path)
    assert len(checks) == 2
