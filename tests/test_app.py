"""app.py as a user meets it: the page served on a loopback port, driven in headless Chromium.

The browser tests need Debian's chromium (/usr/bin/chromium, or $CHROMIUM) and the playwright
package; where either is missing they are skipped with the reason (.ci/run installs chromium).
"""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import app
import eval as eval_script
import inference
import train
from conftest import train_args
from dataset import extract_features, load_records, open_image
from utils import UserError, run_cli, write_json

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Flags that work on these machines: no sandbox as root, and no background connections to a
# network that is not there (without them Chromium retries refused connections at every start).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120
CAPTION_TIMEOUT_MS = 30_000
MAX_UPLOAD_MB = 2  # the served page's limit: small, so the test can exceed it with a 3 MB image

# Found, not imported: importing Gradio costs ~3 s of CPU, which every test worker paid at collection
# whether or not it ran a test of this file (the tests that need it import it).
if importlib.util.find_spec("gradio") is None:
    pytest.skip('the app extra is not installed (pip install -e ".[app]")', allow_module_level=True)


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


def test_the_page_names_the_backbones_each_run_folder_makes_it_load(server, run, tiny):
    """The page has no flags to name backbones: each run folder's are said, once, before they load (a run folder
    from someone else can name a Hub id, gigabytes downloaded without a word)."""
    _, log_path = server
    said = [line for line in log_path.read_text().splitlines() if line.startswith("note: loading ")]
    assert said == [f"note: loading CLIP {tiny['clip_model']} and LM {tiny['lm_model']}, as "
                    f"{folder / 'adapter_config.json'} names them" for folder in (run, run / "last")], said


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
    data: URL arrives as it came, and is in a file only while its request runs."""
    from gradio.data_classes import ImageData

    box = app.image_box(render=False)
    box.GRADIO_CACHE = str(tmp_path / "uploads")  # where Gradio keeps uploads: the only paths handed over
    not_an_image = tmp_path / "uploads" / "notes.png"
    not_an_image.parent.mkdir()
    not_an_image.write_text("not an image")
    assert box.preprocess(ImageData(path=str(not_an_image))) == str(not_an_image)
    assert box.preprocess(None) is None
    good = Path(tiny["data_dir"]) / "images" / "test_0000.png"
    inline = "data:image/png;base64," + base64.b64encode(good.read_bytes()).decode()
    assert box.preprocess(ImageData(url=inline)) == inline
    with app.image_file(inline, 50) as pasted:
        assert Path(pasted).read_bytes() == good.read_bytes()
    assert not Path(pasted).exists()


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



# ----------------------------------------------------------------------------------------------
# What a stranger's requests leave behind: a page served in this process, with a stand-in model
# ----------------------------------------------------------------------------------------------

class StubCaptioner:
    """Captions every image alike, in no time: these tests are about files and requests, not models."""

    config = type("Config", (), {"adapter_kind": "mlp", "prefix_length": 1, "clip_model": "clip", "lm_model": "lm",
                                 "max_caption_tokens": 40})

    def caption_images(self, images, decoding):
        return ["a stub caption" for _ in images]


def stub_page(tmp_path, max_upload_mb: float = 1) -> app.Page:
    return app.Page([app.LoadedRun("stub", tmp_path, StubCaptioner())], max_upload_mb=max_upload_mb)


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


@pytest.mark.filterwarnings("ignore:That file:UserWarning")  # gr.Warning outside a request
def test_a_pasted_image_leaves_no_file_and_its_size_is_checked_before_it_is_decoded(tmp_path, monkeypatch):
    """An image pasted inline as a data: URL is in a file only while its request runs, wherever that
    file is made, and one over the upload limit is refused from the URL's length: never decoded or
    written (it was written to Gradio's cache, then refused, and left there for good)."""
    import tempfile

    from gradio.data_classes import ImageData

    page = stub_page(tmp_path, max_upload_mb=1)
    box = app.image_box(render=False)
    box.GRADIO_CACHE = str(tmp_path / "gradio-cache")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    good = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(good)

    def caption(data: bytes) -> tuple:
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        return page.caption(box.preprocess(ImageData(url=url)), "stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0)

    for _ in range(3):
        result = caption(good.read_bytes())
        assert result[0].value == "a stub caption" and result[4] == "", result
    assert caption(b"not an image")[4].startswith("⚠️ That file could not be read as an image")
    assert files_under(tmp_path / "tmp") == [] and files_under(tmp_path / "gradio-cache") == []
    decoded = []
    monkeypatch.setattr(base64, "b64decode", lambda *args, **kwargs: decoded.append(args) or b"")
    assert caption(os.urandom(2 * 2**20))[4] == "⚠️ That file is 2 MB; this page takes images up to 1 MB."
    assert decoded == []
    assert files_under(tmp_path / "tmp") == [] and files_under(tmp_path / "gradio-cache") == []


@contextlib.contextmanager
def served(page: app.Page, keep_uploads_s: float = app.UPLOADS_KEPT_S, sessions_kept: int = app.SESSIONS_KEPT):
    """The page served in this process, with the launch options app.py's main uses. Yields (URL, app)."""
    page_app = app.build_app(page, [], keep_uploads_s=keep_uploads_s)
    port = free_port()
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **app.launch_options(page.max_upload_mb, sessions_kept))
    try:
        yield f"http://127.0.0.1:{port}/", page_app
    finally:
        page_app.close()


def png_bytes(colour=(200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
    return buffer.getvalue()


def pasted(data: bytes) -> dict:
    """The image box's payload for an image pasted inline, as a data: URL."""
    return {"url": "data:image/png;base64," + base64.b64encode(data).decode(), "meta": {"_type": "gradio.FileData"}}


def call_caption(url: str, image) -> list:
    """One caption request through Gradio's HTTP API, as any client can send it: its outputs."""
    import httpx

    response = httpx.post(url + "gradio_api/call/caption", timeout=30,
                          json={"data": [image, "stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0]})
    response.raise_for_status()
    answer = httpx.get(url + f"gradio_api/call/caption/{response.json()['event_id']}", timeout=30).text
    return json.loads(answer.split("data: ", 1)[1])


def test_uploads_are_swept_from_the_server_after_a_while(tmp_path):
    """Every upload (and Gradio takes any file, up to --max-upload-mb, without a caption request)
    stayed in Gradio's cache until the disk was full: now each is deleted after keep_uploads_s."""
    import httpx

    with served(stub_page(tmp_path), keep_uploads_s=2) as (url, _):
        (path,) = httpx.post(url + "gradio_api/upload", files={"files": ("red.png", png_bytes())}).json()
        assert Path(path).is_file()
        deadline = time.monotonic() + 15
        while Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not Path(path).exists(), "the upload is still on the server"


def test_a_request_body_over_the_limit_is_refused_before_it_is_read(tmp_path):
    """Gradio limits only its upload route: the JSON of any other request (an image pasted inline
    as a data: URL, say) was read into memory whole, at any size (a 200 MB one cost the server
    640 MB). Now a body over what the largest allowed pasted image needs is refused with 413."""
    import httpx

    with served(stub_page(tmp_path, max_upload_mb=1)) as (url, _):
        # Within the limit: a pasted 0.99 MB file reaches the page's own checks (and is no image).
        assert call_caption(url, pasted(os.urandom(int(0.99 * 2**20))))[4].startswith(
            "⚠️ That file could not be read as an image")
        body, headers = json.dumps({"data": ["A" * (3 * 2**20), "stub"]}).encode(), {"Content-Type": "application/json"}
        declared = httpx.post(url + "gradio_api/call/caption", content=body, headers=headers)
        chunked = httpx.post(url + "gradio_api/call/caption", content=iter([body[:2**20], body[2**20:]]),
                             headers=headers)  # no Content-Length: counted as it comes
        for response in (declared, chunked):
            assert response.status_code == 413, response.text
            assert response.text == "That request is too large: this page takes images up to 1 MB."
        assert call_caption(url, pasted(png_bytes()))[0]["value"] == "a stub caption"


def test_the_server_keeps_state_for_a_bounded_number_of_sessions(tmp_path):
    """Gradio keeps a copy of the page's configuration per session (about 70 kB here) for its last
    10,000 sessions, and every API call without a session is a new one: 1,500 calls grew the server
    by 110 MB, so a stranger's loop could add 700 MB. app.py keeps SESSIONS_KEPT."""
    with served(stub_page(tmp_path), sessions_kept=3) as (url, page_app):
        for _ in range(6):
            assert call_caption(url, pasted(png_bytes()))[0]["value"] == "a stub caption"
        assert len(page_app.state_holder.session_data) == 3


def test_a_session_keeps_no_pasted_image(tmp_path):
    """Gradio keeps each request's values in its session, an image pasted inline as its whole data: URL, and
    each API call without a session is a new one: 200 pasted images of up to 9 MB grew the server by 600 MB.
    An upload's value (its path, a few hundred bytes) is kept as before."""
    import httpx

    with served(stub_page(tmp_path)) as (url, page_app):
        (uploaded,) = httpx.post(url + "gradio_api/upload", files={"files": ("red.png", png_bytes())}).json()
        for image in (pasted(png_bytes((0, 200, 0))), {"path": uploaded, "meta": {"_type": "gradio.FileData"}}):
            assert call_caption(url, image)[0]["value"] == "a stub caption"
        assert call_caption(url, pasted(b"not an image"))[4].startswith("⚠️ That file could not be read")
        kept = [config["props"].get("value") for session in page_app.state_holder.session_data.values()
                for config in session.config_values.values() if isinstance((config or {}).get("props"), dict)]
        assert any(isinstance(value, dict) and value.get("path") == uploaded for value in kept)
        assert not any(app.is_pasted_image(value) for value in kept)


def test_the_upload_sweep_survives_an_upload_during_it_and_takes_the_folders(tmp_path):
    """Gradio's sweep iterates the set of uploads in a thread while uploads add to it: "Set changed size during
    iteration" ended it for good, and a 60 s flood of 9,012 uploads all stayed on the disk past their time. It
    deleted each upload but not the folder Gradio made for it: one empty folder per upload piled up for good."""
    page_app = app.build_app(stub_page(tmp_path), [])
    # The set the sweep goes through, the one each upload is added to.
    (uploads,) = [files for files in page_app.temp_file_sets if files is page_app.upload_file_set]
    uploads.add("uploaded-before.png")
    sweeping = iter(uploads)
    uploads.add("uploaded-meanwhile.png")
    assert list(sweeping) == ["uploaded-before.png"]
    alone, shared = (tmp_path / "cache" / "1a" / "red.png", tmp_path / "cache" / "2b" / "red.png")
    for path in (alone, shared, shared.with_name("same-bytes.png")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes())
        uploads.add(str(path))
    for path in (alone, shared):  # as Gradio's sweep deletes them
        path.unlink()
    uploads -= {str(alone), str(shared)}
    assert not alone.parent.exists() and shared.with_name("same-bytes.png").exists()
    assert uploads == {"uploaded-before.png", "uploaded-meanwhile.png", str(shared.with_name("same-bytes.png"))}


def test_a_port_just_freed_can_be_served_again():
    """After the page stops, its port keeps connections in TIME_WAIT for a minute; the start-up check
    bound without SO_REUSEADDR (which Gradio's server sets) and so refused a restart as 'port in use'.
    A port that something listens on is still refused."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gradio's server (uvicorn) listens
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served_side, _ = listener.accept()
            served_side.close()  # the server closes first, as a stopped page does: its side waits in TIME_WAIT
            client.recv(1)
        with pytest.raises(UserError, match="is in use"):
            app.check_can_serve("127.0.0.1", port)
    app.check_can_serve("127.0.0.1", port)


def test_a_thin_strip_is_refused_for_its_shape_not_called_damaged(tmp_path):
    """open_image refuses images over MAX_ASPECT_RATIO times as long as wide (CLIP would scale them up
    to gigabytes); the page said such a valid file "may be damaged ... or not be an image at all"."""
    strip = tmp_path / "strip.png"
    Image.new("L", (5000, 1)).save(strip)
    with pytest.raises(UserError, match=r"^That image is 5,000 x 1 pixels, over 100 times as long as it is wide;"):
        app.open_upload(strip, 40, 50)
    Image.new("L", (101, 1)).save(strip)  # just over the ratio
    with pytest.raises(UserError, match=r"^That image is 101 x 1 pixels, over 100 times as long as it is wide;"):
        app.open_upload(strip, 40, 50)


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request
def test_a_setting_that_is_not_a_number_is_named_not_blamed_on_the_image(tmp_path):
    """Gradio checks a slider's range but lets NaN through (a hand-written API call): int() then
    failed, and the page answered "Something went wrong ... please try another" image."""
    page = stub_page(tmp_path)
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    settings = {"num_beams": 3, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 20, "seed": 0}
    labels = {"num_beams": "The beam width", "temperature": "The temperature", "top_p": "Top-p",
              "max_new_tokens": "Max new tokens", "seed": "The seed"}
    for name, label in labels.items():
        values = {**settings, name: float("nan")}
        result = page.caption(str(image), "stub", app.NOTHING, "greedy", *values.values())
        assert result[4] == f"⚠️ {label} must be a number, not nan.", result
    assert page.caption(str(image), "stub", app.NOTHING, "greedy", *settings.values())[0].value == "a stub caption"


def test_the_timing_line_says_an_empty_caption_is_one_and_only_then(tmp_path, monkeypatch):
    page = stub_page(tmp_path)
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    for caption in ("a stub caption", ""):
        monkeypatch.setattr(StubCaptioner, "caption_images", lambda self, images, decoding: [caption for _ in images])
        result = page.caption(str(image), "stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0)
        assert result[0].value == caption and result[1].endswith("new tokens" if caption else app.EMPTY_CAPTION_NOTE)


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request
def test_caption_with_a_choice_that_is_not_a_run_is_a_message(tmp_path):
    """"Caption with" takes a run only (an API call may send anything): "nothing" or a baseline there answered
    with no caption and no message, or with the baseline's caption as if a run had written it."""
    page = stub_page(tmp_path)
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    for left in (app.NOTHING, app.BASELINE_PREFIX + "stub", "gone"):
        result = page.caption(str(image), left, app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0)
        assert result[4] == "⚠️ Pick a run to caption with (stub).", (left, result)


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request
def test_a_seed_out_of_range_either_way_is_a_message(tmp_path):
    """torch.manual_seed takes -2**63 to 2**64 - 1 (and inference.py's --seed less): a seed past either end was
    "Something went wrong" (a RuntimeError) or a caption inference.py cannot give."""
    page = stub_page(tmp_path)
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    for seed in (-(2**63) - 2**12, 2**63 + 2**12):  # past the ends by more than a float's rounding there
        result = page.caption(str(image), "stub", app.NOTHING, "sample", 3, 0.7, 0.9, 20, float(seed))
        assert result[4].startswith("⚠️ The seed must be a whole number from"), (seed, result)


def test_a_setting_of_the_wrong_type_in_an_api_call_gets_a_message(tmp_path):
    """A hand-written API call can send a setting as a string, null, a list or NaN: Gradio's own range
    check failed on it in a TypeError (ValueError for NaN in the seed), and the caller got a bare
    "Error" with no message. Each is named now, its value cut short, and the server carries on."""
    import httpx

    labels = {4: "The beam width", 5: "The temperature", 6: "Top-p", 7: "Max new tokens", 8: "The seed"}
    with served(stub_page(tmp_path)) as (url, _):
        for index, label in labels.items():
            for value, shown in (("3", "'3'"), ([1], "[1]"), (float("nan"), "nan"), ("<b>" * 100, "'" + "<b>" * 13)):
                data = [pasted(png_bytes()), "stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0]
                data[index] = value
                body = json.dumps({"data": data})  # NaN as Python's json writes it (httpx's json= refuses it)
                event = httpx.post(url + "gradio_api/call/caption", content=body, timeout=30,
                                   headers={"Content-Type": "application/json"}).json()["event_id"]
                answer = httpx.get(url + f"gradio_api/call/caption/{event}", timeout=30).text
                assert answer.startswith("event: error"), answer
                assert json.loads(answer.split("data: ", 1)[1])["error"] == f"{label} must be a number, not {shown}.", \
                    (label, value, answer)
        assert call_caption(url, pasted(png_bytes()))[0]["value"] == "a stub caption"


def api_answer(url: str, data) -> str:
    """The raw answer (event and data lines) to one caption request whose values are `data`."""
    import httpx

    event = httpx.post(url + "gradio_api/call/caption", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(url + f"gradio_api/call/caption/{event}", timeout=30).text


def refused_with(answer: str) -> str:
    assert answer.startswith("event: error"), answer
    return json.loads(answer.split("data: ", 1)[1])["error"]


def test_a_request_of_the_wrong_shape_is_answered_and_logged_in_one_line(tmp_path, capsys):
    """A hand-written API call with too few values, the image as a string, a number or a list, was
    answered {"error": null}, with a Gradio traceback in the server log; too many values were read as if
    the extra ones were not there; a setting out of range got a traceback too, and named no setting; a
    beam width or seed of 2.5 was taken as 2, a null strategy answered in the command line's words.
    Each now gets one line saying what is wrong, the log one line, and the server carries on."""
    good = [pasted(png_bytes()), "stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0]
    takes = ("This takes 9 values, in this order: Image, Caption with, Compare with, Strategy, Beam width, "
             "Temperature, Top-p, Max new tokens, Seed (sampling); the request sent ")
    image_forms = f"The image must be {app.IMAGE_FORMS}, not "
    cases = [([], takes + "0."), (good[:3], takes + "3."), ([*good, 1, 2], takes + "11."),
             (["/etc/passwd", *good[1:]], image_forms + "'/etc/passwd'."), ([5, *good[1:]], image_forms + "5."),
             ([[1, 2], *good[1:]], image_forms + "[1, 2]."),
             ([{"path": "x", "meta": None}, *good[1:]], image_forms + "{'path': 'x', 'meta': None}."),
             ([*good[:4], 1000, *good[5:]], "The beam width must be from 2 to 10, not 1000."),
             ([*good[:5], 0, *good[6:]], "The temperature must be from 0.05 to 2, not 0."),
             ([*good[:4], 2.5, *good[5:]], "The beam width must be a whole number, not 2.5."),
             ([*good[:8], 2.5], "The seed must be a whole number, not 2.5.")]
    # capsys, not capfd: the server's threads print through sys.stdout/sys.stderr, which capsys sees; capfd around
    # a served page closed an xdist worker's capture file (1 failed, 53 errors after it in a clean-clone CI run).
    with served(stub_page(tmp_path)) as (url, _):
        capsys.readouterr()
        for data, message in cases:
            assert refused_with(api_answer(url, data)) == message, data
        long_name = refused_with(api_answer(url, [good[0], "x" * 2**20, *good[2:]]))  # Gradio quotes it whole
        assert long_name.startswith("Value: xxx") and len(long_name) == app.REFUSAL_SHOWN, long_name[:80]
        answer = api_answer(url, [*good[:3], None, *good[4:]])
        assert json.loads(answer.split("data: ", 1)[1])[4] == "⚠️ Pick a decoding strategy (greedy, beam, sample)."
        assert call_caption(url, pasted(png_bytes()))[0]["value"] == "a stub caption"
        log = capsys.readouterr()
    lines = (log.out + log.err).strip().splitlines()
    assert len(lines) == len(cases) + 1 and "Traceback" not in log.err, log
    assert all(line.startswith("refused a request to caption: ") and len(line) < 400 for line in lines), lines


def test_a_path_on_the_server_is_never_opened(tmp_path, monkeypatch):
    """A request could name any file on the server as its image: without a "meta" key Gradio did not
    check it was an upload, and app.py opened it: an image anywhere was captioned, /etc/shadow was "not
    an image", a missing file "did not arrive" and a large one "is 143 MB" (with a "meta", Gradio refused
    it in an empty error and a traceback). Only files in Gradio's upload folder are read now."""
    import httpx

    opened = []
    real_open_upload = app.open_upload
    monkeypatch.setattr(app, "open_upload", lambda path, *args: opened.append(path) or real_open_upload(path, *args))
    elsewhere = tmp_path / "private" / "photo.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(png_bytes())
    rest = ["stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0]
    with served(stub_page(tmp_path)) as (url, _):
        around = f"{tmp_path}/../{tmp_path.name}/private/photo.png"
        for path in (elsewhere, tmp_path / "gone.png", "/etc/passwd", around):
            for payload in ({"path": str(path)}, {"path": str(path), "meta": {"_type": "gradio.FileData"}},
                            {"path": str(path), "meta": {"_type": "other"}}):
                assert refused_with(api_answer(url, [payload, *rest])) == app.NOT_UPLOADED, payload
        assert opened == []
        (uploaded,) = httpx.post(url + "gradio_api/upload", files={"files": ("red.png", png_bytes())}).json()
        for payload in ({"path": uploaded}, {"path": uploaded, "meta": {"_type": "gradio.FileData"}}):
            assert json.loads(api_answer(url, [payload, *rest]).split("data: ", 1)[1])[0]["value"] == "a stub caption"
    assert len(opened) == 2


def test_an_image_url_is_refused_not_fetched(tmp_path, monkeypatch):
    """Given an http(s) URL as the image's path, Gradio downloaded it (any size, for anyone who asked);
    given one as its url, the page said to choose an image first. Both are refused, saying why."""
    import gradio.processing_utils

    fetched = []

    async def fetch(url, cache_dir):
        fetched.append(url)
        raise OSError("offline")

    monkeypatch.setattr(gradio.processing_utils, "async_ssrf_protected_download", fetch)
    rest = ["stub", app.NOTHING, "greedy", 3, 0.7, 0.9, 20, 0]
    with served(stub_page(tmp_path)) as (url, _):
        for payload in ({"path": "https://example.com/cat.png", "meta": {"_type": "gradio.FileData"}},
                        {"path": "HTTP://example.com/cat.png"}, {"url": "http://example.com/cat.png"},
                        {"url": "file:///etc/passwd", "meta": {"_type": "gradio.FileData"}}):
            assert refused_with(api_answer(url, [payload, *rest])) == app.NO_URLS, payload
    assert fetched == []


def served_by_main(argv: list[str], monkeypatch) -> tuple[app.Page, list[Path]]:
    """app.main up to the launch, with stand-in models: (the page it would serve, the folders it loaded)."""
    loaded, built = [], []
    monkeypatch.setattr(app, "import_gradio", lambda: None)
    monkeypatch.setattr(app, "check_can_serve", lambda host, port: None)
    monkeypatch.setattr(app, "example_images", lambda checkpoint, count: [])
    monkeypatch.setattr(app, "load_run", lambda checkpoint, *args, **kwargs: loaded.append(checkpoint) or
                        app.LoadedRun(checkpoint.name, checkpoint, StubCaptioner()))
    monkeypatch.setattr(app, "build_app", lambda page, examples: built.append(page) or
                        type("Served", (), {"launch": lambda self, **kwargs: None})())
    assert app.main([*argv, "--device", "cpu"]) == 0
    return built[0], loaded


def copy_run_files(run: Path, folder: Path) -> Path:
    """A run folder with run's adapter config and weights, all that app.py reads before loading."""
    folder.mkdir()
    for name in ("adapter_config.json", "adapter.safetensors"):
        (folder / name).write_bytes((run / name).read_bytes())
    return folder


def test_a_run_folder_named_twice_is_loaded_and_offered_once(run, tmp_path, monkeypatch, capsys):
    """The same folder given twice (as typed and as an absolute path, or through a symlink) was
    loaded twice, a copy of both backbones each, listed twice under one name, and compared with
    itself by default."""
    for name in ("a", "b"):
        copy_run_files(run, tmp_path / name)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    page, loaded = served_by_main(["--checkpoint", "a", str(tmp_path / "a"), "b", "link", "a/"], monkeypatch)
    assert loaded == [Path("a"), Path("b")]
    assert list(page.by_name) == ["a", "b"] and page.default_compare == "b"
    assert capsys.readouterr().out.count("serving it once") == 3


def test_a_checkpoint_inside_a_run_is_named_with_its_run(run, tmp_path):
    """last/ and last.old/ were named with their run's name; last-step-N/ (kept by a later save) was "last-step-2"
    alone, one of several runs' on a page serving them."""
    copy_run_files(run, tmp_path / "mine")
    (tmp_path / "mine" / "run_config.json").write_bytes((run / "run_config.json").read_bytes())
    for inside in ("last", "last.old", "last-step-2"):
        (tmp_path / "mine" / inside).mkdir()
        assert app.run_label(tmp_path / "mine" / inside) == f"mine/{inside}"
    assert app.run_label(tmp_path / "mine") == "mine"
    (tmp_path / "old" / "last.old").mkdir(parents=True)  # a run without run_config.json (an older version's)
    assert app.run_label(tmp_path / "old" / "last.old") == "old/last.old"


def test_runs_named_alike_are_told_apart_by_their_paths(run, tmp_path, monkeypatch):
    """Two run folders of one name (a/run, b/run); the page picks a run by its name, so one of them could not be
    picked."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        copy_run_files(run, tmp_path / name / "run")
    monkeypatch.chdir(tmp_path)
    page, _ = served_by_main(["--checkpoint", "a/run", "b/run"], monkeypatch)
    assert list(page.by_name) == ["a/run", "b/run"]


def test_a_run_named_like_another_choice_on_the_page_can_still_be_picked(run, tmp_path, monkeypatch):
    """Choices are made by name: a run folder named "nothing" made "Compare with: nothing" caption
    with that run, and one named like a baseline took the baseline's place."""
    reserved = ["nothing", app.BASELINE_PREFIX + "a"]
    for name in ["a", *reserved]:
        copy_run_files(run, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    page, _ = served_by_main(["--checkpoint", "a", *reserved], monkeypatch)
    assert [choice for choice in page.compare_choices if choice in reserved] == ["nothing"]  # the page's own
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    settings = ("greedy", 3, 0.7, 0.9, 20, 0)
    assert page.caption(str(image), "a", app.NOTHING, *settings)[2].value == ""  # nothing to compare with
    for name in reserved:
        assert page.caption(str(image), str(tmp_path / name), app.NOTHING, *settings)[0].value == "a stub caption"


def test_a_damaged_run_is_reported_before_any_run_loads(run, tmp_path, monkeypatch):
    """Only adapter_config.json was looked for before loading: a third run with torn weights was
    reported after the first two had loaded their backbones (minutes with real ones)."""
    first, torn = copy_run_files(run, tmp_path / "a"), copy_run_files(run, tmp_path / "torn")
    (torn / "adapter.safetensors").write_bytes((torn / "adapter.safetensors").read_bytes()[:100])
    loaded = []
    monkeypatch.setattr(app, "import_gradio", lambda: None)
    monkeypatch.setattr(app, "check_can_serve", lambda host, port: None)
    monkeypatch.setattr(app, "load_run", lambda checkpoint, *args, **kwargs: loaded.append(checkpoint))
    with pytest.raises(UserError, match=r"torn/adapter.safetensors is not a readable safetensors file"):
        app.main(["--checkpoint", str(first), str(torn), "--device", "cpu"])
    assert loaded == []


def test_a_demo_run_still_training_is_not_served_nor_trained_beside(tmp_path, monkeypatch):
    """train.py rewrites a run's best adapter as it trains, so a demo run in training had the newest
    adapter: `python app.py` served its first few steps as "the newest demo run". With no finished
    demo run, the page now says to wait rather than train a second one on the same cores."""
    import fcntl

    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: {})
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained a second demo run"))
    for name in ("demo", "demo-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        (tmp_path / name / "adapter.safetensors").write_bytes(b"")
    with open(tmp_path / "demo-2" / train.RUN_LOCK, "a+") as lock:  # as train.py holds it while it trains
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert app.ensure_demo_run(tmp_path, progress=False) == tmp_path / "demo"
        (tmp_path / "demo" / "adapter.safetensors").unlink()
        with pytest.raises(UserError, match=r"demo-2 is still being trained by another process; run `python app"):
            app.ensure_demo_run(tmp_path, progress=False)
    assert app.ensure_demo_run(tmp_path, progress=False) == tmp_path / "demo-2"  # finished: its lock let go


def test_a_demo_run_stopped_part_way_is_not_served_but_finished(tmp_path, monkeypatch, capsys):
    """A demo run stopped by Ctrl-C keeps its best adapter so far, the newest of all: `python app.py`
    served a few hundred steps' worth as "the newest demo run". It now serves a finished run, or
    resumes the stopped one rather than train another from step 0."""
    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: {})

    def demo_run(name: str, finished: bool) -> Path:
        folder = tmp_path / name
        (folder / "resume").mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter.safetensors").write_bytes(b"")
        write_json(folder / "resume" / train.TRAINER_STATE, {"step": 40, "finished": finished})
        return folder

    done, stopped = demo_run("demo", True), demo_run("demo-2", False)
    os.utime(done / "adapter.safetensors", (1, 1))  # the stopped run's adapter is the newer
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained while a finished demo run was there"))
    assert app.ensure_demo_run(tmp_path, progress=False) == done

    (done / "adapter.safetensors").unlink()
    resumed = []

    def fake_resume(argv):
        resumed.append(argv)
        write_json(stopped / "resume" / train.TRAINER_STATE, {"step": 2256, "finished": True})
        return 0

    monkeypatch.setattr(train, "main", fake_resume)
    assert app.ensure_demo_run(tmp_path, progress=False) == stopped
    assert resumed == [["--run-name", "demo-2", "--output-dir", str(tmp_path), "--resume", "--no-progress"]]
    assert "demo-2 stopped at step 40: finishing it" in capsys.readouterr().out

    # One that cannot be resumed (its backbones rebuilt since, say) gives way to a new run, not an error
    # at every start of the page.
    write_json(stopped / "resume" / train.TRAINER_STATE, {"step": 40, "finished": False})
    calls = []

    def refuse_resume_train_afresh(argv):
        calls.append(argv[:2])
        if "--resume" in argv:
            raise UserError("--resume: the backbones changed")
        demo_run("demo-3", True)  # what `python train.py --demo` leaves beside the stopped one
        return 0

    monkeypatch.setattr(train, "main", refuse_resume_train_afresh)
    assert app.ensure_demo_run(tmp_path, progress=False) == tmp_path / "demo-3"
    assert calls == [["--run-name", "demo-2"], ["--demo", "--output-dir"]]
    assert "it cannot be finished (--resume: the backbones changed); training a new one" in capsys.readouterr().out


def test_run_names_and_paths_are_shown_as_they_are_in_the_intro(tmp_path):
    """A run's name is its folder's name: one with <, *, _ or ` in it was read as HTML (sanitised
    away by the page) or as emphasis, or broke out of its code span, instead of being shown."""
    markdown_it = pytest.importorskip("markdown_it")
    import html

    name = "b<img src=x onerror=alert(1)>*_$x$"
    folder = tmp_path / "a`b" / name
    run = app.LoadedRun(name, folder, StubCaptioner(), baseline_note="no baseline (<x> *y*)")
    rendered = markdown_it.MarkdownIt().render(app.intro(app.Page([run]), []))
    assert f"<strong>{html.escape(name, quote=False)}</strong>" in rendered, rendered
    assert f"<code>{html.escape(str(folder), quote=False)}</code>" in rendered, rendered
    assert "Baseline: no baseline (&lt;x&gt; *y*)." in rendered and "<img" not in rendered, rendered


def test_the_baseline_note_is_shown_as_it_is_in_the_timing_line(tmp_path):
    """The baseline's note names the run's data (a folder, an error reading it): escaped in the intro,
    it went into the timing line's Markdown as it was, where `<...>` vanished and `*...*` became emphasis."""
    markdown_it = pytest.importorskip("markdown_it")

    class Captioner(StubCaptioner):
        def preprocess(self, images):
            return torch.zeros(len(images), 3)

        def image_features(self, pixels):
            return pixels

    note = "no baseline: its training images could not be read (data/<raw> *best* shots: unreadable)"
    baseline = app.Baseline(torch.zeros(1, 3), [["a caption"]])
    page = app.Page([app.LoadedRun("stub", tmp_path, Captioner(), baseline, note)])
    caption, timing = page.caption_one(app.BASELINE_PREFIX + "stub", None, app.decoding_config(), 0)
    rendered = markdown_it.MarkdownIt().render(timing)
    assert caption == "a caption" and "(data/&lt;raw&gt; *best* shots: unreadable)</p>" in rendered, rendered


def test_serving_beyond_this_machine_is_warned_about():
    """`--host 0.0.0.0` served a password-less page, which takes uploads, to the whole network without
    a word; localhost stays quiet."""
    warning = app.exposure_warning("0.0.0.0", 7861, 50)
    assert warning and warning.startswith("warning: --host 0.0.0.0 serves the page to every machine"), warning
    assert "no password" in warning and "http://127.0.0.1:7861" in warning and "50 MB" in warning
    for host in ("127.0.0.1", "localhost", "::1"):
        assert app.exposure_warning(host, 7861, 50) is None, host


def test_a_host_name_with_any_address_beyond_this_machine_is_warned_about(monkeypatch):
    """A name that resolves to a loopback address and a network one (/etc/hosts, a machine's own name) serves the
    page on the network one too."""
    import socket

    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in ("127.0.1.1", "192.168.1.5")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *args, **kwargs: addresses)
    assert app.exposure_warning("myhost", 7861, 50).startswith("warning: --host myhost serves the page")


def test_one_new_token_is_singular():
    """The timing line said "at most 1 new tokens" with the slider at 1."""
    assert app.describe(app.decoding_config(max_new_tokens=1)).endswith("at most 1 new token")
    assert app.describe(app.decoding_config(max_new_tokens=30)).endswith("at most 30 new tokens")


def test_an_image_over_the_megapixel_limit_is_not_said_to_be_at_it(tmp_path):
    """Whole megapixels: an image of 40.4 megapixels was "(40 megapixels); ... up to 40 megapixels"."""
    image = tmp_path / "wide.png"
    Image.new("1", (2020, 200)).save(image)  # 0.404 megapixels
    with pytest.raises(UserError, match=r"^That image is 2,020 x 200 pixels \(0\.5 megapixels\); this page takes "
                                        r"images up to 0\.4 megapixels\."):
        app.open_upload(image, 0.4, 50)
    assert app.open_upload(image, 0.41, 50).size == (2020, 200)
    Image.new("1", (1000, 1001)).save(image)  # one megapixel and a bit, under a limit of one
    with pytest.raises(UserError, match=r"\(1\.1 megapixels\); this page takes images up to 1 megapixel\. Please"):
        app.open_upload(image, 1, 50)


def test_a_setting_sent_as_true_or_false_is_not_taken_for_a_number():
    """JSON's true and false are Python bools, which are ints to isinstance: true was a temperature of 1."""
    for value in (True, False):
        with pytest.raises(UserError, match=rf"^The temperature must be a number, not {value}\.$"):
            app.setting(value, "The temperature")


def test_a_file_over_the_size_limit_is_not_said_to_be_at_it():
    """A 1.14 MB image pasted under --max-upload-mb 1 was refused as "1 MB; ... up to 1 MB"."""
    with pytest.raises(UserError, match=r"That file is 1\.1 MB; this page takes images up to 1 MB\."):
        app.check_upload_size(1.14 * 2**20, 1)
    with pytest.raises(UserError, match=r"That file is 50\.1 MB; .* up to 50 MB\."):
        app.check_upload_size(50.01 * 2**20, 50)
    app.check_upload_size(50 * 2**20, 50)  # a file of exactly the limit is taken


def test_the_request_limit_lets_through_an_image_of_the_upload_limit_pasted_inline():
    """A pasted image travels inside the request's JSON as base64, 4 characters for each 3 bytes: a body limit of
    the upload limit and 1 MB answered a pasted 3 MB image 413, "this page takes images up to 3 MB"."""
    [body_limit] = app.launch_options(3)["app_kwargs"]["middleware"]
    base64_chars = 4 * math.ceil(3 * 2**20 / 3)
    request = json.dumps({"data": [{"url": "data:image/png;base64," + "A" * base64_chars}, "stub", app.NOTHING,
                                   "greedy", 3, 0.7, 0.9, 20, 0]})
    assert body_limit.cls is app.BodyLimit and body_limit.kwargs["limit"] >= len(request)


def test_a_megapixel_limit_over_what_the_image_reader_opens_is_refused_at_start(capsys):
    """With --max-megapixels 100, a good 90-megapixel photo passed the page's check and was then refused by
    the image reader as a possible decompression bomb: the visitor read that it may be damaged, or not an
    image at all (and one of 200 megapixels that it was over the page's limit of 100)."""
    assert app.build_parser().parse_args(["--max-megapixels", "89.4"]).max_megapixels == 89.4
    with pytest.raises(SystemExit) as exit_info:
        app.build_parser().parse_args(["--max-megapixels", "100"])
    assert exit_info.value.code == 2
    assert "--max-megapixels: expected at most 89.4 (megapixels: larger images are refused as possible " \
           "decompression bombs), got '100'" in capsys.readouterr().err


def test_two_runs_captioning_at_once_keep_their_own_seeds():
    """Each run had a lock of its own, but torch's random generator is one per process: a run sampling
    with seed 1 while another run captioned with seed 2 drew from seed 2's stream."""
    import threading

    first_seeded, second_done = threading.Event(), threading.Event()

    class Sampler:
        def __init__(self, first: bool):
            self.first = first

        def caption_images(self, images, decoding):
            if self.first:  # seeded: let the other run caption now, if it can
                first_seeded.set()
                second_done.wait(timeout=0.5)
            else:
                first_seeded.wait(timeout=5)
            draw = f"{torch.rand(1).item():.6f}"
            if not self.first:
                second_done.set()
            return [draw]

    first, second = (app.LoadedRun(name, Path(name), Sampler(name == "a")) for name in ("a", "b"))
    decoding = app.decoding_config("sample")
    with ThreadPoolExecutor(2) as pool:
        captioned = pool.submit(app.caption_with_run, first, None, decoding, 1)
        pool.submit(app.caption_with_run, second, None, decoding, 2).result()
    torch.manual_seed(1)
    assert captioned.result()[0] == f"{torch.rand(1).item():.6f}"


def test_a_damaged_hub_test_image_leaves_it_out_of_the_examples_not_the_page_down(tmp_path, monkeypatch):
    """The examples are the run's first test images; a Hub row among them that does not decode ended
    app.py, after its models had loaded, in the row's error: no page at all."""
    import dataset

    class Row:
        path = None

        def __init__(self, image_id: str, readable: bool):
            self.image_id, self.readable = image_id, readable

        def open(self):
            if not self.readable:
                raise UserError(f"cannot read image {self.image_id} (row 0): broken data stream")
            return Image.new("RGB", (8, 8), (200, 30, 30))

    (tmp_path / "run_config.json").write_text(json.dumps({"dataset": "flickr30k"}))
    monkeypatch.setattr(dataset, "load_records", lambda *args, **kwargs: [Row("1.jpg", False), Row("2.jpg", True)])
    monkeypatch.setattr(app, "real_photos", lambda: [])
    examples = app.example_images(tmp_path, 2)
    assert [label for _, label in examples] == ["test image 2"]
    with Image.open(examples[0][0]) as image:
        assert image.size == (8, 8)


def test_a_missing_test_image_leaves_the_other_examples_on_the_page(tiny, tmp_path, monkeypatch):
    """The examples were loaded as eval.py loads a split, stopping at a missing file: one deleted test image took
    every test image off the page, leaving only the bundled photos."""
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    tests = sorted((data / "images").glob("test_*.png"))
    tests[0].unlink()
    (tmp_path / "run_config.json").write_text(json.dumps({"dataset": "folder", "data_dir": str(data),
                                                          "folder_split": "hash"}))
    monkeypatch.setattr(app, "real_photos", lambda: [])
    labels = [label for _, label in app.example_images(tmp_path, 2)]
    assert labels == [f"test image {path.stem}" for path in tests[1:3]]


def test_the_hub_examples_folder_is_removed_when_the_server_exits(tmp_path):
    """A Hub run's example images are written to a temp folder for the page; every start of app.py
    left one behind in /tmp."""
    script = f"""
import json, sys, tempfile
from pathlib import Path
from PIL import Image
import app, dataset
tempfile.tempdir = {str(tmp_path)!r}

class Row:
    path = None
    image_id = "1.jpg"
    def open(self):
        return Image.new("RGB", (8, 8))

run = Path({str(tmp_path / "run")!r}); run.mkdir()
(run / "run_config.json").write_text(json.dumps({{"dataset": "flickr30k"}}))
dataset.load_records = lambda *args, **kwargs: [Row()]
app.real_photos = lambda: []
[(path, label)] = app.example_images(run, 1)
assert Path(path).is_file()
print(Path(path).parent)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and folder.name.startswith("captioner-app-examples-")
    assert not folder.exists()


def test_max_new_tokens_starts_as_long_as_the_runs_trained_captions(tmp_path):
    """eval.py and inference.py decode a run's captions as long as it trained on (--max-caption-tokens); the page
    started at 30 whatever the runs, so a run trained on 40-token captions had its longer ones cut there alone."""
    long_run = StubCaptioner()
    long_run.config = type("Config", (StubCaptioner.config,), {"max_caption_tokens": 64})
    page = app.Page([app.LoadedRun("stub", tmp_path, StubCaptioner()), app.LoadedRun("long", tmp_path, long_run)])
    assert page.caption_tokens == 64 and stub_page(tmp_path).caption_tokens == 40
    page_app = app.build_app(page, [], keep_uploads_s=60)
    (slider,) = [block for block in page_app.blocks.values() if getattr(block, "label", None) == "Max new tokens"]
    assert slider.value == 64
    long_run.config.max_caption_tokens = 500  # more than a visitor may ask for: the slider's end
    assert page.caption_tokens == app.MAX_NEW_TOKENS_SLIDER


def test_a_refused_request_reaches_the_servers_log_with_its_control_characters_escaped(capsys):
    """Gradio's refusals quote the value a stranger sent: an ESC[2J in a run name cleared the operator's terminal
    (or retitled it, or faked log lines) through the one log line a bad request gets."""
    import asyncio
    import concurrent.futures
    import types

    import gradio as gr

    async def gradio_refuses(block_fn, inputs, *args, **kwargs):  # as Gradio quotes a choice not on the list
        raise gr.Error(f"Value: {inputs[0]} is not in the list of choices: ['stub']")

    page_app = types.SimpleNamespace(preprocess_data=gradio_refuses)
    app.answer_bad_requests_in_one_line(page_app)
    block_fn = types.SimpleNamespace(inputs=[gr.Dropdown(["stub"], render=False)], api_name="caption", name="caption")
    request = page_app.preprocess_data(block_fn, ["\x1b[2J\x1b]0;owned\x07stub"])
    with pytest.raises(gr.Error), concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, request).result()  # its own thread: a browser test's loop may run in this one
    log = capsys.readouterr()
    assert "\x1b" not in log.out + log.err and "\\x1b[2J" in log.out, log


def test_any_image_pasted_inline_is_told_from_an_uploaded_one():
    """forget_pasted_images drops a data: URL of any image type (a JPEG or WebP paste too), and never an upload's
    served path."""
    assert all(app.is_pasted_image({"url": f"data:image/{kind};base64,AAAA"}) for kind in ("jpeg", "webp", "png"))
    assert not app.is_pasted_image({"url": "http://127.0.0.1:7860/gradio_api/file=/tmp/gradio/x/a.png"})
    assert not app.is_pasted_image({"path": "/tmp/gradio/x/a.png", "url": None})
