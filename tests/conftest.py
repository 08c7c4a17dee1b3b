"""Shared fixtures: a small synthetic data set and tiny backbones, built once per test session
through the same builders (and later the same from_pretrained loaders) as the offline demo."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one torch thread each (set before torch is imported, and
    # inherited by the scripts tests start), or the workers' thread pools fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import build_demo_data, build_tiny_backbones  # noqa: E402

SMALL_SPLITS = {"train": 40, "val": 6, "test": 6}


def pytest_collection_modifyitems(items):
    """Slow tests first, so that under `make test`'s workers the longest one is not the last to start."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    data_dir = build_demo_data(root / "data", seed=1, split_sizes=SMALL_SPLITS)
    built = build_tiny_backbones(data_dir, root / "backbones", lm_steps=40, progress=False)
    return {"data_dir": str(data_dir), "clip_model": built["clip"], "lm_model": built["lm"]}


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
