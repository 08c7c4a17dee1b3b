"""app.py as a user meets it: the page served on a loopback port, driven in headless Chromium.

The browser tests need Debian's chromium (/usr/bin/chromium, or $CHROMIUM) and the playwright
package; where either is missing they are skipped with the reason (.ci/run installs chromium).
"""
from __future__ import annotations

import base64
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import app
import eval as eval_script
import inference
import train
from conftest import train_args
from dataset import extract_features, load_records, open_image
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Flags that work on these machines: no sandbox as root, and no background connections to a
# network that is not there (without them Chromium retries refused connections at every start).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120
CAPTION_TIMEOUT_MS = 30_000
MAX_UPLOAD_MB = 2  # the served page's limit: small, so the test can exceed it with a 3 MB image

gradio = pytest.importorskip("gradio", reason='the app extra is not installed (pip install -e ".[app]")')


def why_no_browser() -> str:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e \".[test]\")"
    return ""


NO_BROWSER = why_no_browser()
# Decided at collection, so a machine without a browser skips before training a run or starting the app.
needs_browser = pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny run, the app serving it, a browser
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("app-runs")
    assert train.main(train_args(tiny, output, "run", "--final-eval", "false", "--max-steps", "6")) == 0
    return output / "run"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    """`python app.py --checkpoint RUN RUN/last --port P` in its own process: two runs, so the page
    compares a second run by default. Yields (url, log path)."""
    home = tmp_path_factory.mktemp("app-home")
    log_path = home / "app.log"
    port = free_port()
    env = {**os.environ, "CAPTIONER_HOME": str(home / "captioner"), "GRADIO_TEMP_DIR": str(home / "gradio")}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(run), str(run / "last"),
             "--port", str(port), "--no-progress", "--max-upload-mb", str(MAX_UPLOAD_MB)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url} within {START_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector("#caption-button")
    yield page
    page.close()


def upload(page, path) -> None:
    """Choose a file in the image box and wait until the page has uploaded it to the server."""
    image = page.locator("#image img")
    before = image.first.get_attribute("src") if image.count() else None
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        "before => { const img = document.querySelector('#image img');"
        " return img && img.src.includes('/file=') && img.src !== before; }", arg=before, timeout=CAPTION_TIMEOUT_MS)
    # A new image clears the previous captions and message.
    page.wait_for_function("() => !document.querySelector('#message').innerText.includes('\u26a0')"
                           " && document.querySelector('#left-caption textarea').value === ''",
                           timeout=CAPTION_TIMEOUT_MS)


def press_caption_and_wait(page, expect: str) -> None:
    """Press Caption and wait for the left caption (expect="caption") or a message (expect="message")."""
    page.click("#caption-button")
    # The timing line, not the caption, marks an answer: a barely trained adapter may write "".
    condition = ("document.querySelector('#left-time').innerText.includes('ms')" if expect == "caption"
                 else "document.querySelector('#message').innerText.includes('\u26a0')")  # the warning sign
    page.wait_for_function(condition, timeout=CAPTION_TIMEOUT_MS)


def caption_of(page, side: str) -> str:
    return page.locator(f"#{side}-caption textarea").input_value()


def inference_caption(capsys, checkpoint, image) -> str:
    """What `python inference.py --checkpoint RUN IMAGE` prints for the image: path<TAB>caption."""
    capsys.readouterr()
    assert inference.main(["--checkpoint", str(checkpoint), str(image)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    path, caption = line.split("\t", 1)
    assert path == str(image)
    return caption


@needs_browser
def test_page_captions_an_upload_as_inference_does(page, run, tiny, capsys, tmp_path):
    image = Path(tiny["data_dir"]) / "images" / "test_0001.png"
    upload(page, image)
    press_caption_and_wait(page, "caption")
    left, right = caption_of(page, "left"), caption_of(page, "right")
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000

    assert left == inference_caption(capsys, run, image)
    # Two runs given: the page compares the second one by default.
    assert right == inference_caption(capsys, run / "last", image)
    for side, caption in (("left", left), ("right", right)):
        timing = page.locator(f"#{side}-time").inner_text()
        assert timing.split(" ms")[0].replace(",", "").isdigit()
        # An empty caption is said to be one, and only then.
        assert ("empty caption" in timing) == (caption == ""), (caption, timing)
    assert page.locator("#message").inner_text().strip() == ""


@needs_browser
def test_bad_uploads_leave_the_server_answering(page, run, tiny, capsys, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a text file renamed .png\n")
    bomb = tmp_path / "bomb.png"  # 81 megapixels of one bit each: a 10 kB file
    Image.new("1", (9000, 9000)).save(bomb)
    good = Path(tiny["data_dir"]) / "images" / "test_0002.png"

    upload(page, not_an_image)
    press_caption_and_wait(page, "message")
    assert "could not be read as an image" in page.locator("#message").inner_text()
    assert caption_of(page, "left") == ""

    upload(page, bomb)
    press_caption_and_wait(page, "message")
    assert "megapixels" in page.locator("#message").inner_text()

    too_big = tmp_path / "noise.png"  # random pixels do not compress: about 3 MB
    Image.frombytes("RGB", (1000, 1000), os.urandom(3_000_000)).save(too_big)
    page.locator("#image input[type=file]").set_input_files(str(too_big))
    page.get_by_text("exceed the maximum allowed size").wait_for(timeout=CAPTION_TIMEOUT_MS)  # Gradio refuses it

    upload(page, good)
    press_caption_and_wait(page, "caption")
    assert caption_of(page, "left") == inference_caption(capsys, run, good)
    assert page.locator("#message").inner_text().strip() == ""


@needs_browser
def test_example_click_and_the_baseline(page, run, tiny):
    page.get_by_text("test image test_0000", exact=True).click()
    page.wait_for_function("() => { const img = document.querySelector('#image img');"
                           " return img && img.src.includes('/file='); }", timeout=CAPTION_TIMEOUT_MS)
    page.locator("#right-choice input").click()
    page.get_by_role("option", name="nearest-neighbour baseline of run", exact=True).click()
    press_caption_and_wait(page, "caption")

    # The baseline, recomputed here: the first caption of the most CLIP-similar training image.
    from model import load_captioner

    captioner = load_captioner(run)
    train_records = load_records("folder", "train", tiny["data_dir"], seed=42)
    query = captioner.image_features(captioner.preprocess([open_image(Path(tiny["data_dir"]) / "images" /
                                                                      "test_0000.png")]))
    expected = eval_script.nearest_neighbour_captions(
        extract_features(captioner, train_records, progress=False, use_cache=False),
        [r.captions for r in train_records], query)[0]
    assert caption_of(page, "right") == expected
    assert "training images" in page.locator("#right-time").inner_text()


def test_concurrent_requests_are_queued_and_models_load_once(server, run, tiny):
    from gradio_client import Client, handle_file

    url, log_path = server
    client = Client(url, verbose=False)
    image = handle_file(str(Path(tiny["data_dir"]) / "images" / "test_0003.png"))
    inputs = (image, "run", "nothing", "beam", 3, 0.7, 0.9, 20, 0)
    with ThreadPoolExecutor(6) as pool:  # six at once: the queue runs them one after another
        results = list(pool.map(lambda _: client.predict(*inputs, api_name="/caption"), range(6)))
    captions = {result[0]["value"] for result in results}
    assert len(captions) == 1 and captions != {""}, results
    assert all(result[4] == "" for result in results)  # no message: none failed
    log = log_path.read_text()
    assert log.count("loaded ") == 2, log  # the two runs, at start-up; never per request
    assert "Traceback" not in log, log


def test_a_seed_out_of_range_is_a_message_on_the_page(server, tiny):
    from gradio_client import Client, handle_file

    url, log_path = server
    image = handle_file(str(Path(tiny["data_dir"]) / "images" / "test_0003.png"))
    result = Client(url, verbose=False).predict(image, "run", "nothing", "sample", 3, 0.7, 0.9, 20, 1e30,
                                                api_name="/caption")
    assert result[4].startswith("⚠️ The seed must be a whole number from"), result  # was "(ValueError)"
    assert "Traceback" not in log_path.read_text()


# ----------------------------------------------------------------------------------------------
# Without a server
# ----------------------------------------------------------------------------------------------

def test_uploads_are_checked_before_decoding(tiny, tmp_path):
    good = Path(tiny["data_dir"]) / "images" / "test_0000.png"
    assert list(app.open_upload(good, 40, 50).getdata()) == list(open_image(good).getdata())
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:150])
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (2 * 2**20))
    cases = {None: "Choose an image", truncated: "could not be read", big: "2 MB",
             tmp_path / "gone.png": "did not arrive"}
    for path, words in cases.items():
        with pytest.raises(UserError, match=words):
            app.open_upload(path, 40, 1)


def test_the_image_box_hands_over_paths_unopened(tmp_path, tiny):
    """Uploads arrive as a path (nothing decoded before open_upload); an image pasted inline as a
    data: URL is written to a file first."""
    from gradio.data_classes import ImageData

    box = app.image_box(render=False)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    assert box.preprocess(ImageData(path=str(not_an_image))) == str(not_an_image)
    assert box.preprocess(None) is None
    good = Path(tiny["data_dir"]) / "images" / "test_0000.png"
    inline = "data:image/png;base64," + base64.b64encode(good.read_bytes()).decode()
    pasted = box.preprocess(ImageData(url=inline))
    assert Path(pasted).read_bytes() == good.read_bytes()


def test_no_checkpoint_serves_the_newest_demo_run_or_trains_one(tmp_path, monkeypatch):
    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: {})
    trained = []

    def fake_train(argv):  # what `python train.py --demo` leaves behind
        trained.append(argv)
        folder = tmp_path / "demo"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter.safetensors").write_bytes(b"")
        return 0

    monkeypatch.setattr(train, "main", fake_train)
    assert app.ensure_demo_run(tmp_path, progress=False) == tmp_path / "demo"
    assert trained == [["--demo", "--output-dir", str(tmp_path), "--no-progress"]]

    newer = tmp_path / "demo-2"
    newer.mkdir()
    (newer / "adapter_config.json").write_text("{}")
    (newer / "adapter.safetensors").write_bytes(b"")
    (tmp_path / "demo-3").mkdir()  # interrupted before it saved an adapter: not a candidate
    assert app.ensure_demo_run(tmp_path, progress=False) == newer and len(trained) == 1


def test_an_output_dir_that_is_a_file_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: pytest.fail("built the demo first"))
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained a demo run first"))
    monkeypatch.setattr(app, "import_gradio", lambda: None)
    monkeypatch.setattr(app, "check_can_serve", lambda host, port: None)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for output_dir in (blocker, blocker / "runs"):
        assert run_cli(app.main, ["--output-dir", str(output_dir), "--device", "cpu"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()  # and nothing on stdout about training
        assert line == f"error: --output-dir {output_dir}: {blocker} is a file, not a folder; name a folder for " \
            "the demo run"


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    assert run_cli(app.main, ["--checkpoint", str(tmp_path / "nope")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "nope" in line


def test_every_flag_has_help(capsys):
    parser = app.build_parser()
    assert all(action.help for action in parser._actions)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--help"])
    assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out

