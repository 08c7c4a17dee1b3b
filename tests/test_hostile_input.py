"""Hostile input: broken and unusual images, odd captions. Every valid kind of image opens as the
right RGB picture; every bad one is a one-line UserError naming the file."""
from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from dataset import (ImageRecord, load_records, normalize_caption, open_image, to_rgb,
                     tokenize_caption)
from utils import UserError

WHITE = (255, 255, 255)


def pixel(image, xy=(0, 0)):
    assert image.mode == "RGB"
    return image.getpixel(xy)


def near(rgb, expected, tolerance=8):
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, expected))


def noise_image(size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def saved(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def assert_one_line_error(path, *words):
    with pytest.raises(UserError) as info:
        open_image(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    what = message.replace(str(path), "").replace(path.name, "").lower()  # the test's tmp path names words too
    for word in words:
        assert word in what, message
    return message


# ----------------------------------------------------------------------------------------------
# Bad images: a one-line UserError naming the file
# ----------------------------------------------------------------------------------------------

def test_missing_empty_and_text_files(tmp_path):
    assert_one_line_error(tmp_path / "absent.jpg", "not found")
    (tmp_path / "zero.png").write_bytes(b"")
    assert_one_line_error(tmp_path / "zero.png", "empty")
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    assert_one_line_error(tmp_path / "notes.jpg", "not a jpeg, png")


def test_truncated_jpeg_and_png(tmp_path):
    for suffix in ("jpg", "png"):
        whole = saved(noise_image(), tmp_path / f"whole.{suffix}").read_bytes()
        (tmp_path / f"half.{suffix}").write_bytes(whole[: len(whole) // 2])
        assert_one_line_error(tmp_path / f"half.{suffix}")


def test_corrupt_png_data(tmp_path):
    data = bytearray(saved(noise_image(), tmp_path / "ok.png").read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # compressed pixels overwritten: the chunk's CRC no longer matches
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    assert_one_line_error(tmp_path / "corrupt.png")


def test_tiff_with_a_rational_height(tmp_path):
    """Pillow raises ValueError here, not OSError: every decoder error must become a UserError."""
    import struct

    data = bytearray(saved(noise_image((12, 9)), tmp_path / "ok.tif").read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        offset = ifd + 2 + 12 * entry
        if struct.unpack("<H", data[offset : offset + 2])[0] == 257:  # ImageLength
            data[offset + 2 : offset + 4] = struct.pack("<H", 5)  # LONG -> RATIONAL
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    assert_one_line_error(tmp_path / "bad.tif", "invalid dimensions")


def test_decompression_bomb_is_refused(tmp_path):
    # 10,000 x 10,000 one-bit pixels compress to ~12 kB, yet are 100M pixels (> Pillow's 89M limit,
    # below the 179M at which Pillow itself raises rather than warns).
    bomb = saved(Image.new("1", (10_000, 10_000)), tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    assert_one_line_error(bomb, "decompression bomb", "100000000 pixels")


def test_a_header_claiming_a_giant_image_is_refused_under_the_limit_that_applies(tmp_path):
    """A 68-byte PNG whose header claims 100,000 x 100,000 pixels is over twice the limit, where Pillow raises
    instead of warning and names twice the limit (178956970): the same refusal under two limits."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    giant = tmp_path / "giant.png"
    giant.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    message = assert_one_line_error(giant, "decompression bomb", "10000000000 pixels")
    assert f"limit of {Image.MAX_IMAGE_PIXELS} pixels" in message and "178956970" not in message, message


@pytest.mark.parametrize("head, says", [
    (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic", "a heic (heif) photo, as iphones save them, which pillow cannot read"),
    (b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf", "an avif image, which is not read here"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "an svg drawing"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "a pdf document")], ids=["heic", "avif", "svg", "pdf"])
def test_a_photo_format_that_is_not_read_is_named_with_what_to_do(tmp_path, head, says):
    """An iPhone's HEIC photo was only "not a JPEG, PNG, GIF, BMP, WEBP, TIFF image": not what it is, nor
    what to do. Named by content, so a renamed one is named too."""
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(head + bytes(200))
    assert_one_line_error(path, f"it is {says}", "convert it to jpeg or png")


def test_a_macos_resource_fork_named_as_an_image_says_to_delete_it(tmp_path):
    """A Mac writes "._IMG_0001.JPG" beside each photo it copies to a USB drive; `find -name '*.JPG'` lists both in a
    caption file, and the fork was only "not a JPEG, PNG, GIF, BMP, WEBP, TIFF image"."""
    path = tmp_path / "._IMG_0001.JPG"
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
    assert_one_line_error(path, "it is a macos resource fork", "delete it")


    # 1 x 100,000 pixels in 471 bytes: under the pixel limit, but scaled to a shorter side of 224 it
    # is 22 billion pixels (measured: 4.4 GB peak for the tiny 64-pixel CLIP before this check).
    strip = saved(Image.new("RGB", (1, 100_000)), tmp_path / "strip.png")
    message = assert_one_line_error(strip, "refusing image", "1x100000 is over 100 times as long as it is wide")
    assert message.startswith(f"refusing image {strip}: "), message  # not "damaged or truncated?"
    # A wide panorama is a photo: it is read.
    assert open_image(saved(Image.new("RGB", (1200, 150)), tmp_path / "panorama.png")).size == (1200, 150)


def test_formats_outside_the_image_suffixes_are_refused(tmp_path):
    # Pillow would read a PPM (and hand an EPS to Ghostscript); a caption data set has no business with them.
    ppm = saved(Image.new("RGB", (8, 8), (10, 20, 30)), tmp_path / "photo.ppm", format="PPM")
    assert_one_line_error(ppm, "not a jpeg, png")


def test_a_jpeg_header_claiming_a_huge_image_is_decoded_scaled_down_not_whole(tmp_path):
    """A 16x16 JPEG whose header claims 4000x4000 pixels (16M, under the bomb limit) was decoded to the whole
    claimed canvas; at 9000x9000 that was 1,078 MB and 2.6 s for one upload. The DCT scales it by 1/8."""
    import struct

    data = bytearray(saved(noise_image((16, 16)), tmp_path / "small.jpg", quality=90).read_bytes())
    frame = data.index(b"\xff\xc0")  # SOF0: length (2 bytes), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", 4000, 4000)
    (tmp_path / "claims_4000.jpg").write_bytes(bytes(data))
    assert open_image(tmp_path / "claims_4000.jpg").size == (500, 500)


def test_a_large_jpeg_is_the_same_tensor_from_every_path(tmp_path):
    """Training's feature extraction (files and Hub rows), inference.py and the page decode alike (decode_scaled),
    so cached features and a caption at inference see the same pixels: the JPEG scaled by 1/2 in the DCT, its
    shorter side kept at least DECODE_MIN_SIDE for CLIP's own resize. A small JPEG is decoded whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import app
    import inference
    from dataset import DECODE_MIN_SIDE, ImageTensors
    from model import clip_image_processor

    path = saved(noise_image((1000, 900)), tmp_path / "large.jpg", quality=90)
    cells = {"bytes.jpg": {"bytes": path.read_bytes(), "path": None}, "path.jpg": {"bytes": None, "path": str(path)}}
    pq.write_table(pa.Table.from_pylist([{"image": cell, "caption": ["noise"], "split": "train", "filename": name}
                                         for name, cell in cells.items()]), tmp_path / "rows.parquet")
    hub_bytes, hub_path = load_records("flickr30k", "train", hub_data_files=str(tmp_path / "rows.parquet"))
    file_record = ImageRecord("large.jpg", ["noise"], "train", path=path)
    processor = clip_image_processor()  # CLIP ViT-B/32's: shorter side to 224, bicubic

    def tensor(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    image = open_image(path)
    assert image.size == (500, 450) and min(image.size) >= DECODE_MIN_SIDE
    expected = tensor(image)
    tensors = {"training, a file": ImageTensors([file_record], processor)[0][1],
               "training, a Hub row of bytes": ImageTensors([hub_bytes], processor)[0][1],
               "training, a Hub row of a path": ImageTensors([hub_path], processor)[0][1],
               "inference.py": tensor(inference.open_images([str(path)], {})[0]),
               "the page": tensor(app.open_upload(path, 40, 50))}
    assert [name for name, got in tensors.items() if not got.equal(expected)] == []
    small = saved(noise_image((890, 890)), tmp_path / "small.jpg", quality=90)  # 1/2 would leave 445 < 448
    assert open_image(small).size == (890, 890)


def test_a_large_image_of_any_format_is_reduced_to_what_clip_needs(tmp_path):
    """A PNG (no DCT to scale in) at least twice DECODE_MIN_SIDE on its shorter side is reduced by a whole factor
    to keep it at least DECODE_MIN_SIDE, each pixel its box's mean; a smaller one is left whole."""
    from dataset import DECODE_MIN_SIDE

    picture = noise_image((2000, 1350))
    reduced = open_image(saved(picture, tmp_path / "large.png"))
    assert reduced.size == (667, 450) and min(reduced.size) >= DECODE_MIN_SIDE  # by 3: 1350 // 448
    assert np.array_equal(np.asarray(reduced), np.asarray(picture.reduce(3)))
    assert open_image(saved(noise_image((900, 895)), tmp_path / "small.png")).size == (900, 895)


@pytest.mark.slow
def test_a_40_megapixel_png_is_decoded_and_preprocessed_holding_its_pixels_once(tmp_path):
    """An upright RGB picture was copied by EXIF transpose and by the RGB conversion (changing nothing), then
    CLIP's processor held it three times more: 536 MB for a 40-megapixel PNG of 130 kB. Now its pixels once."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "flat.png"
    Image.new("RGB", (7300, 5480), (120, 30, 200)).save(path)
    probe = ("import resource, sys\nfrom dataset import open_image\nfrom model import clip_image_processor\n"
             "processor = clip_image_processor()\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "processor(images=open_image(sys.argv[1]), return_tensors='pt')\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    once = 7300 * 5480 * 4 / 2**20  # Pillow holds RGB as 4 bytes a pixel: 153 MB
    assert int(done.stdout.split()[-1]) < 1.5 * once, done.stdout


# ----------------------------------------------------------------------------------------------
# Valid images of every kind: the right RGB picture
# ----------------------------------------------------------------------------------------------

def test_grayscale_and_one_bit(tmp_path):
    grey = open_image(saved(Image.new("L", (4, 4), 90), tmp_path / "grey.png"))
    assert pixel(grey) == (90, 90, 90)
    bits = open_image(saved(Image.new("1", (4, 4), 1), tmp_path / "bits.png"))
    assert pixel(bits) == WHITE


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (0, 0, 255, 255))  # one opaque blue pixel
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black: mid grey on white
    image = open_image(saved(rgba, tmp_path / "rgba.png"))
    assert pixel(image) == WHITE and pixel(image, (1, 1)) == (0, 0, 255)
    assert near(pixel(image, (2, 2)), (127, 127, 127), 2)

    la = open_image(saved(Image.new("LA", (4, 4), (0, 0)), tmp_path / "la.png"))
    assert pixel(la) == WHITE

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 1), 1)
    image = open_image(saved(palette, tmp_path / "palette.png", transparency=0))
    assert pixel(image) == WHITE and pixel(image, (1, 1)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    mid = np.full((4, 4), 32768, np.uint16)
    mid[0, 0], mid[0, 1] = 0, 65535
    image = open_image(saved(Image.fromarray(mid), tmp_path / "grey16.png"))
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert near(pixel(image, (2, 2)), (128, 128, 128), 1)
    assert pixel(image, (0, 0)) == (0, 0, 0) and pixel(image, (1, 0)) == WHITE
    tiff = open_image(saved(Image.fromarray(mid), tmp_path / "grey16.tif"))
    assert near(pixel(tiff, (2, 2)), (128, 128, 128), 1)
    # 32-bit integer and float grey (mode I, F) as decoders hand them over.
    assert near(pixel(to_rgb(Image.fromarray(mid.astype(np.int32))), (2, 2)), (128, 128, 128), 1)
    assert near(pixel(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32)))), (128, 128, 128), 1)


def test_float_grey_with_nan_or_infinite_pixels_keeps_its_picture(tmp_path):
    """One infinite pixel in a float TIFF (a saturated sensor) made the range infinite: every pixel came out
    black, with numpy's RuntimeWarnings on stderr. NaN (no data) is drawn black, infinities at the ends."""
    values = np.full((4, 4), 0.5, np.float32)
    values[0, 0], values[0, 1], values[0, 2] = np.inf, -np.inf, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = open_image(saved(Image.fromarray(values), tmp_path / "float.tif"))
        assert near(pixel(image, (2, 2)), (128, 128, 128), 1)
        assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == pixel(image, (2, 0)) == (0, 0, 0)
        no_data = open_image(saved(Image.fromarray(np.full((4, 4), np.nan, np.float32)), tmp_path / "nan.tif"))
        assert pixel(no_data) == (0, 0, 0)


@settings(max_examples=150, deadline=None)
@given(values=hnp.arrays(st.sampled_from([np.float32, np.int32]), hnp.array_shapes(min_dims=2, max_dims=2, max_side=5)))
def test_grey_of_any_depth_and_values_gives_an_image_in_the_same_order_without_warnings(values):
    """The random-bytes test below never makes a float or 32-bit grey image, whose values can be anything."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = to_rgb(Image.fromarray(values))
    assert image.mode == "RGB" and image.size == values.shape[::-1]
    grey = np.asarray(image)[..., 0].astype(int)
    finite = np.isfinite(values)
    order = np.argsort(values[finite], kind="stable")
    assert (np.diff(grey[finite][order]) >= 0).all()  # a brighter value is never drawn darker


def test_cmyk_jpeg(tmp_path):
    image = open_image(saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert near(pixel(image, (4, 4)), (255, 0, 0), 12)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (220, 0, 0))
    stored.paste((0, 0, 220), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90 degrees clockwise
    image = open_image(saved(stored, tmp_path / "rotated.jpg", exif=exif, quality=95))
    assert image.size == (20, 40)
    assert near(pixel(image, (10, 5)), (220, 0, 0), 30) and near(pixel(image, (10, 35)), (0, 0, 220), 30)


def test_a_mirrored_exif_orientation_is_applied_too(tmp_path):
    """Orientation 2 (mirrored, as some phones save selfies) is no rotation, and the smallest turn there is."""
    stored = Image.new("RGB", (40, 20), (220, 0, 0))
    stored.paste((0, 0, 220), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 2  # Orientation: the viewer mirrors it left to right
    image = open_image(saved(stored, tmp_path / "mirrored.jpg", exif=exif, quality=95))
    assert image.size == (40, 20)
    assert near(pixel(image, (5, 10)), (0, 0, 220), 30) and near(pixel(image, (35, 10)), (220, 0, 0), 30)


def test_big_endian_sixteen_bit_grey_is_scaled_as_little_endian_is(tmp_path):
    """A 16-bit grey TIFF saved big-endian opens as I;16B: scaled by 255/65535 as an I;16 one is, not
    stretched from its darkest to its brightest pixel (which would turn a dim scan bright)."""
    values = np.full((4, 4), 30000, np.uint16)
    values[0, 0] = 20000
    path = saved(Image.frombytes("I;16B", (4, 4), values.astype(">u2").tobytes()), tmp_path / "grey16be.tif")
    assert Image.open(path).mode == "I;16B"
    image = open_image(path)
    assert pixel(image, (2, 2)) == (117, 117, 117) and pixel(image, (0, 0)) == (78, 78, 78)  # 30000, 20000 of 65535


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp", "anim.png", "pages.tif"])
def test_animated_images_and_multi_page_tiffs_give_their_first_frame(tmp_path, name):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = saved(frames[0], tmp_path / name, save_all=True, append_images=frames[1:], duration=50, loop=0,
                 lossless=True)
    assert Image.open(path).n_frames == 2
    assert pixel(open_image(path)) == (255, 0, 0)


def test_hub_images_follow_the_same_rules():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    record = ImageRecord("1.jpg", ["a caption"], "train", row=0, table=[{"image": rgba}])
    assert pixel(record.open()) == WHITE


# ----------------------------------------------------------------------------------------------
# Properties over random bytes and strings
# ----------------------------------------------------------------------------------------------

def _valid_files() -> list[bytes]:
    files = []
    for fmt, kwargs in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("BMP", {}), ("WEBP", {}),
                        ("TIFF", {})):
        buffer = io.BytesIO()
        noise_image((12, 9)).save(buffer, format=fmt, **kwargs)
        files.append(buffer.getvalue())
    return files


VALID_FILES = _valid_files()


@st.composite
def image_like_bytes(draw) -> bytes:
    """A real file's first N bytes plus a random tail, a real file with a few bytes changed, or noise."""
    kind = draw(st.sampled_from(["prefix", "flipped", "noise"]))
    if kind == "noise":
        return draw(st.binary(max_size=600))
    original = draw(st.sampled_from(VALID_FILES))
    if kind == "prefix":
        return original[: draw(st.integers(0, len(original)))] + draw(st.binary(max_size=300))
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "input.jpg"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=image_like_bytes())
def test_open_image_on_random_bytes_gives_rgb_or_user_error(scratch, data):
    scratch.write_bytes(data)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = open_image(scratch)
    except UserError as error:
        assert "\n" not in str(error) and str(scratch) in str(error)
    else:
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.width > 0
    assert not caught, [str(w.message) for w in caught]  # nothing but the one line (or the image) comes out


def test_pillows_warnings_on_a_damaged_file_stay_inside_the_one_line(tmp_path):
    """A truncated TIFF makes Pillow warn ("Truncated File Read") before it fails: the user sees
    open_image's one line, not a warning with a Pillow source line under it."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "TIFF")
    data = buffer.getvalue()

    def pillow_warns(head: bytes) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                Image.open(io.BytesIO(head)).load()
            except Exception:
                pass
        return any(issubclass(w.category, UserWarning) for w in caught)

    cut = next(cut for cut in range(len(data) - 1, 8, -1) if pillow_warns(data[:cut]))
    (tmp_path / "cut.tif").write_bytes(data[:cut])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="cut.tif"):
            open_image(tmp_path / "cut.tif")
    assert not caught, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from demo import EOS_TOKEN, build_tokenizer

    tokenizer = build_tokenizer(["a red circle on a white background", "ein rotes Quadrat", "un carré bleu"])
    return tokenizer, tokenizer.convert_tokens_to_ids(EOS_TOKEN)


HOSTILE_CHARACTERS = " \t\n\r\x00\x07\x0b\x0c\x1b\x7f\x85\xa0\u2028\u3000\u200b\ufeff\u0301e\u00e9\u4e00\U0001f600ab"
captions = st.one_of(
    st.text(),
    st.text(alphabet=HOSTILE_CHARACTERS),
    st.lists(st.sampled_from(["<|endoftext|>", "a", " ", "e\u0301", "\x00", "\ud800", "\t\n"])).map("".join),
    st.none(), st.integers(), st.floats(), st.lists(st.text(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(text=captions, max_tokens=st.integers(1, 48))
def test_caption_rules_on_random_text(byte_level_tokenizer, text, max_tokens):
    import unicodedata

    tokenizer, eos = byte_level_tokenizer
    caption = normalize_caption(text)
    assert isinstance(caption, str)
    assert caption == " ".join(caption.split()), "no leading, trailing or repeated whitespace"
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in caption)
    assert unicodedata.is_normalized("NFC", caption) and normalize_caption(caption) == caption
    if not isinstance(text, str):
        assert caption == ""
    ids = tokenize_caption(tokenizer, caption, eos, max_tokens)
    assert ids[-1] == eos and len(ids) <= max_tokens
    assert eos not in ids[:-1], "caption text never produces EOS"


# ----------------------------------------------------------------------------------------------
# Captions by rule, through the loaders
# ----------------------------------------------------------------------------------------------

def test_caption_rules():
    assert normalize_caption("  a\tcat\n\non\x00a\x1bmat \u2028") == "a cat on a mat"
    assert normalize_caption("cafe\u0301") == "caf\u00e9"  # NFC: one text, one token sequence
    assert normalize_caption("日本の 猫  ") == "日本の 猫"
    for junk in (None, 5, 2.5, ["a"], {"raw": "a"}, "", "   \n\t"):
        assert normalize_caption(junk) == ""
    long = "word " * 10_000
    assert normalize_caption(long) == long.strip()  # cut only at tokenisation


def test_caption_rules_blank_exactly_the_control_characters_and_surrogates():
    """normalize_caption finds them by one regex (CONTROL_OR_SURROGATE) instead of asking unicodedata of each
    character: the regex must blank every character of categories Cc and Cs and no other."""
    import sys
    import unicodedata

    from dataset import CONTROL_OR_SURROGATE

    blanked = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cs")]
    assert len(blanked) == 65 + 2048
    assert normalize_caption("a".join(["b", *blanked, "b"])) == " ".join(["ba", *["a"] * (len(blanked) - 1), "ab"])
    matched = {c for c in range(sys.maxunicode + 1) if CONTROL_OR_SURROGATE.match(chr(c))}
    assert matched == {ord(c) for c in blanked}


def test_caption_text_cannot_end_a_caption_early(byte_level_tokenizer):
    tokenizer, eos = byte_level_tokenizer
    ids = tokenize_caption(tokenizer, "a red <|endoftext|> circle", eos, 40)
    assert ids.count(eos) == 1 and ids[-1] == eos
    assert tokenize_caption(tokenizer, "a red circle " * 50, eos, 6)[-1] == eos


def test_captions_tokenized_in_batches_as_one_by_one(byte_level_tokenizer, monkeypatch):
    """tokenize_captions asks the fast tokenizer's Rust tokenizer directly, in batches: the ids must be transformers'
    call's, one caption at a time, special-token text as text, also where tokenizer.json turns on truncation and
    padding (transformers' call turns them off; asked directly, every caption came back cut to 2 tokens)."""
    import copy

    from dataset import tokenize_captions

    tokenizer, eos = byte_level_tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=2)
    tokenizer.backend_tokenizer.enable_padding(length=50)
    captions = ["a red <|endoftext|> circle", "a red circle " * 50, "un carré bleu", "e\u0301", "a"]
    expected = [copy.deepcopy(byte_level_tokenizer[0])(caption, add_special_tokens=False, split_special_tokens=True)
                ["input_ids"][:39] + [eos] for caption in captions]
    monkeypatch.setattr("dataset.TOKENIZE_BATCH", 2)  # the first batch through transformers' call, the rest direct
    assert tokenize_captions(tokenizer, captions, eos, 40) == expected
    assert [ids.count(eos) for ids in expected] == [1] * len(captions) and len(expected[1]) == 40


def test_loaders_survive_odd_captions(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    rows = [
        {"image": "a.png", "captions": ["  a cat\t", None, 7, "", "   ", ["nested"], "caf\u00e9"], "split": "train"},
        {"image": "b.png", "captions": None, "split": "train"},
        {"image": "c.png", "caption": 3.5, "split": "train"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_records("folder", "train", str(tmp_path))
    assert [(r.image_id, r.captions) for r in records] == [("a.png", ["a cat", "caf\u00e9"])]

    karpathy = tmp_path / "k"
    (karpathy / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(karpathy / "images" / "a.jpg")
    sentences = [{"raw": None, "tokens": ["a", 5, "dog"]}, "bare string", 12, {"tokens": None}, {"raw": "\x00"}]
    (karpathy / "dataset_flickr8k.json").write_text(json.dumps(
        {"images": [{"filename": "a.jpg", "imgid": 1, "split": "train", "sentences": sentences}]}))
    assert load_records("karpathy", "train", str(karpathy))[0].captions == ["a dog", "bare string"]


def test_caption_files_with_bad_encoding_or_rows_are_clear_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes("\ufeffimage,caption\na.png,un caf\u00e9\n".encode("utf-8"))
    every = [r for s in ("train", "val", "test") for r in load_records("folder", s, str(tmp_path))]
    assert [r.captions for r in every] == [["un caf\u00e9"]]  # a BOM is not part of the "image" column

    (tmp_path / "captions.csv").write_bytes(b"image,caption\na.png,caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(UserError, match=r"not UTF-8 text: line 2 holds byte 0xe9 .*save it again as UTF-8"):
        load_records("folder", "train", str(tmp_path))
    # UTF-16, with or without its byte-order mark (without, it read as a header of 'i\x00m\x00...')
    for encoding in ("utf-16", "utf-16-le"):
        (tmp_path / "captions.csv").write_bytes("image,caption\na.png,un caf\u00e9\n".encode(encoding))
        with pytest.raises(UserError, match=r"captions.csv is UTF-16 text, not UTF-8; save it again as UTF-8"):
            load_records("folder", "train", str(tmp_path))
    # UTF-32 (Python's and iconv's), with or without its mark: it was named UTF-16, which the user would save again as.
    for encoding in ("utf-32", "utf-32-le", "utf-32-be"):
        (tmp_path / "captions.csv").write_bytes("image,caption\na.png,un caf\u00e9\n".encode(encoding))
        with pytest.raises(UserError, match=r"captions.csv is UTF-32 text, not UTF-8; save it again as UTF-8"):
            load_records("folder", "train", str(tmp_path))
    # Without a mark and with captions partly in a script whose letters hold no NUL byte: fewer NULs, still UTF-16.
    greek = "\u03ad\u03bd\u03b1\u03c2 \u03ba\u03b1\u03c6\u03ad \u03c3\u03ba\u03cd\u03bb\u03bf\u03c2"  # a brown dog
    (tmp_path / "captions.csv").write_bytes(f"image,caption\na.png,a brown dog runs on the grass: {greek}\n"
                                            .encode("utf-16-le"))
    with pytest.raises(UserError, match=r"captions.csv is UTF-16 text, not UTF-8; save it again as UTF-8"):
        load_records("folder", "train", str(tmp_path))
    # Captions all in such a script (few NULs in all): it was "line 2 holds byte 0xad (Latin-1 ...?)".
    for encoding in ("utf-16-le", "utf-16-be"):
        (tmp_path / "captions.csv").write_bytes(f"image,caption\na.png,{greek} {greek} {greek}\n".encode(encoding))
        with pytest.raises(UserError, match=r"captions.csv is UTF-16 text, not UTF-8; save it again as UTF-8"):
            load_records("folder", "train", str(tmp_path))
    (tmp_path / "captions.csv").write_bytes(b"image,caption\na.png,a\x00dog\n")  # a stray NUL is whitespace
    assert [r.captions for s in ("train", "val", "test") for r in load_records("folder", s, str(tmp_path))] == \
        [["a dog"]]
    (tmp_path / "captions.csv").unlink()  # both files at once is an error of its own
    jsonl = tmp_path / "captions.jsonl"
    for make, remove in ((jsonl.mkdir, jsonl.rmdir), (lambda: jsonl.symlink_to(jsonl), jsonl.unlink)):
        make()  # a folder, then a link to itself
        with pytest.raises(UserError, match=r"captions.jsonl is not a readable file"):
            load_records("folder", "train", str(tmp_path))
        remove()
    karpathy = tmp_path / "karpathy"
    karpathy.mkdir()
    (karpathy / "dataset_flickr8k.json").write_bytes('{"images": []}'.encode("utf-16"))
    with pytest.raises(UserError, match=r"dataset_flickr8k.json is UTF-16 text"):
        load_records("karpathy", "train", str(karpathy))
    (tmp_path / "captions.jsonl").write_text('["a.png", "a list, not an object"]\n')
    with pytest.raises(UserError, match="line 1"):
        load_records("folder", "train", str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"image": 5, "caption": "x"}\n')
    with pytest.raises(UserError, match="not a file name"):
        load_records("folder", "train", str(tmp_path))


def test_own_parquet_files_that_do_not_load_are_named_without_network_advice(tmp_path):
    # An empty or damaged file of one's own was answered "without network use --dataset karpathy ...".
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "text.parquet").write_text("not parquet")
    for name in ("empty.parquet", "text.parquet", "absent/*.parquet"):
        with pytest.raises(UserError, match=rf"^could not load --hub-data-files .*{re.escape(name)} \(.*\); give "
                                            r"parquet files with the nlphuji/flickr30k export's columns"):
            load_records("flickr30k", "train", hub_data_files=str(tmp_path / name))


def test_a_null_caption_field_beside_a_filled_one_is_not_what_is_read(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "captions": null, "caption": "a dog", '
                                              '"split": "train"}\n')
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a dog"]]


def test_csv_column_names_in_capitals_or_with_spaces_are_read(tmp_path):
    # A spreadsheet's export: "Image, Caption, Split" was refused as naming no image column.
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("Image, Caption, Split\na.png,a red square,train\n")
    assert [r.captions for r in load_records("folder", "train", str(tmp_path))] == [["a red square"]]


def test_csv_captions_with_unquoted_commas_are_kept_whole_or_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a dog, a ball, and grass\n")
    every = [r for s in ("train", "val", "test") for r in load_records("folder", s, str(tmp_path))]
    assert [r.captions for r in every] == [["a dog, a ball, and grass"]]  # caption is the last column
    (tmp_path / "captions.csv").write_text("image,caption,split\na.png,a dog, a ball,train\n")
    with pytest.raises(UserError, match="line 2 has 4 fields.*double quotes"):
        load_records("folder", "train", str(tmp_path))


def test_split_names_are_read_leniently_and_unknown_ones_refused(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [{"image": "a.png", "caption": "x", "split": " Train"}, {"image": "b.png", "caption": "y", "split": "validation"},
            {"image": "c.png", "caption": "z", "split": "TEST"}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [[r.image_id for r in load_records("folder", s, str(tmp_path))] for s in ("train", "val", "test")] == [
        ["a.png"], ["b.png"], ["c.png"]]
    rows[2]["split"] = "  "  # a spreadsheet cell holding spaces names no split: one is dealt (train, of so few)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.image_id for r in load_records("folder", "train", str(tmp_path))] == ["a.png", "c.png"]
    rows[2]["split"] = "holdout"
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="split 'holdout' is unknown"):
        load_records("folder", "train", str(tmp_path))


def test_hub_images_are_refused_as_files_are_a_thin_strip_or_no_image_at_all():
    strip = ImageRecord("s.jpg", ["a strip"], "train", row=3, table={3: {"image": Image.new("RGB", (20000, 5))}})
    with pytest.raises(UserError, match=r"refusing image s.jpg \(row 3\): 20000x5 is over 100 times as long"):
        strip.open()
    empty = ImageRecord("e.jpg", ["nothing"], "train", row=0, table=[{"image": None}])
    with pytest.raises(UserError, match=r"cannot read image e.jpg \(row 0\): the row holds no image"):
        empty.open()
    assert ImageRecord("p.jpg", ["a dot"], "train", row=0, table=[{"image": Image.new("RGB", (1, 1))}]).open().size \
        == (1, 1)


@pytest.mark.parametrize("name", ["a\u0000.png", "a\ud800.png"])
def test_an_image_name_no_file_can_have_is_one_line_naming_the_row(tmp_path, name):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n"
                                             + json.dumps({"image": name, "caption": "y"}) + "\n")
    with pytest.raises(UserError, match="caption row 2 has image .*name the file as it is called on disk"):
        load_records("folder", "train", str(tmp_path))
    karpathy = tmp_path / "k"
    karpathy.mkdir()
    (karpathy / "dataset_coco.json").write_text(json.dumps(
        {"images": [{"filename": name, "split": "train", "sentences": [{"raw": "y"}]}]}))
    with pytest.raises(UserError, match=r"images\[0\] has filepath '' and filename .*called on disk"):
        load_records("karpathy", "train", str(karpathy))
