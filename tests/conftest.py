"""Shared fixtures: a small synthetic data set and tiny backbones, built once per test run (not once per
xdist worker) through the same builders (and later the same from_pretrained loaders) as the offline demo."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one torch thread each (set before torch is imported, and
    # inherited by the scripts tests start), or the workers' thread pools fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import build_demo_data, build_tiny_backbones  # noqa: E402
from utils import waiting_lock  # noqa: E402

SMALL_SPLITS = {"train": 40, "val": 6, "test": 6}


def pytest_collection_modifyitems(items):
    """Slow tests first, so that under `make test`'s workers the longest one is not the last to start."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def run_temp(tmp_path_factory) -> Path:
    """The test run's temp folder, which every worker shares: a worker's base temp is <the run's>/popen-gwN;
    without workers the session's own is private to it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


BUILT = ".built"  # written last: a folder without it was left half-built by a worker that died


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `build(folder)` fills, built once per test run. Under `make test`'s workers the first
    worker to ask builds it in the run's temp folder, which all workers share, and the others wait for it
    (a lock): work stealing hands a module's tests to both workers, and each used to build the module's
    fixtures again. A fixture that shares its folder so must only read it: see `unchanged`."""
    shared = run_temp(tmp_path_factory)
    folder = shared / name
    with waiting_lock(shared / f"{name}.lock", f"waiting for another worker to build {name} ..."):
        if not (folder / BUILT).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / BUILT).touch()
    return folder


def file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@contextlib.contextmanager
def unchanged(folder: Path):
    """Fail the fixture's teardown if its tests added, removed or rewrote a file of `folder`: the other
    workers read it too. (Tests run as root here, so making it read-only would not stop a write.)"""
    before = file_stamps(folder)
    yield
    after = file_stamps(folder)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"tests wrote into {folder}, which every worker shares: {changed}"


def build_tiny(root: Path) -> None:
    data_dir = build_demo_data(root / "data", seed=1, split_sizes=SMALL_SPLITS)
    build_tiny_backbones(data_dir, root / "backbones", lm_steps=40, progress=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    root = built_once(tmp_path_factory, "tiny", build_tiny)
    with unchanged(root):
        yield {"data_dir": str(root / "data"), "clip_model": str(root / "backbones" / "clip"),
               "lm_model": str(root / "backbones" / "lm")}


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    """A saved (untrained) adapter for the tiny backbones; tests copy it before breaking it. Seeded: its
    random weights were whatever the worker's random state was after the tests before it, and with some an
    image's caption came out empty (a note on stderr that a test of inference.py's output did not expect)."""
    import torch

    from model import AdapterConfig, build_captioner, save_adapter

    torch.manual_seed(0)
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    save_adapter(folder, captioner.adapter, captioner.config)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _no_cache_in_home(tmp_path_factory):
    """Fixtures of a module or the session (test_eval's trained run) start before a test's _isolated_cache:
    without this their CLIP features went to the user's ~/.cache/captioner. Under the run's temp folder, the
    workers share the features they extract."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONER_HOME", str(run_temp(tmp_path_factory) / "captioner-home"))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Keep the demo cache out of the user's home during tests.
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path / "captioner-home"))


def train_args(tiny: dict, output_dir, run_name: str, *extra: str) -> list[str]:
    """Flags for a few-second training run on the tiny fixture."""
    return [
        "--dataset", "folder", "--data-dir", tiny["data_dir"], "--clip-model", tiny["clip_model"],
        "--lm-model", tiny["lm_model"], "--output-dir", str(output_dir), "--run-name", run_name,
        "--epochs", "2", "--batch-size", "16", "--mixed-precision", "no", "--eval-every", "5",
        "--save-every", "5", "--log-every", "2", "--val-limit", "4", "--num-workers", "0",
        "--learning-rate", "3e-3", "--no-progress", *extra,
    ]


def other_values_in(weights_file: Path, name: str) -> None:
    """Rewrite one tensor of a safetensors file with other values: the same header, other weights (another build
    of the demo's LM, another fine-tune of one model)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights_file), "pt") as opened:
        metadata = opened.metadata()
    header = weights_file.read_bytes()[: 8 + int.from_bytes(weights_file.read_bytes()[:8], "little")]
    tensors = load_file(weights_file)
    tensors[name] += 0.01
    save_file(tensors, weights_file, metadata=metadata)
    assert weights_file.read_bytes().startswith(header)  # only the values tell them apart


LAUNCHER_SUMMARY = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"


def said_by_the_processes(stderr: str) -> str:
    """A torchrun launch's stderr less the launcher's summary of the processes that failed, printed after them
    all, which repeats the line each one stopped with (utils.tell_the_launcher): what the processes said."""
    return stderr.split(LAUNCHER_SUMMARY)[0]


def without_loading_note(stderr: str) -> str:
    """stderr less the note naming the backbones (and data) a run folder makes eval.py, inference.py and app.py
    load (eval.loaded_as_the_run_names_note): the fixtures' tiny backbones are not the demo's, so every load names
    them. For tests of the other lines; the note itself is tested in test_checkpoints.py."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("note: loading CLIP "))
