"""train.py, eval.py and inference.py end to end on the tiny backbones, resume, and the demo bar."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dataset
import eval as eval_script
import inference
import train
from conftest import other_values_in, train_args
from dataset import extract_features, load_records
from model import TrainingLoss, load_captioner
from utils import UserError, load_state, read_jsonl, run_cli, write_json


def adapter_weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def crash_at_step_8(args: list[str]) -> None:
    """Train with `args` until a crash (an exception, as a power cut would end it) at step 8."""

    def crash_at_8(step):
        if step == 8:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train.train(train.parse_config(args), on_step=crash_at_8)


def test_train_eval_inference_end_to_end(tiny, tmp_path, capsys):
    assert train.main(train_args(tiny, tmp_path, "e2e")) == 0
    run = tmp_path / "e2e"
    for name in ("adapter.safetensors", "adapter_config.json", "run_config.json", "train_log.jsonl",
                 "last/adapter.safetensors", "last/adapter_config.json", "resume/trainer_state.json",
                 "metrics.json", "predictions.jsonl"):
        assert (run / name).is_file(), name

    config = json.loads((run / "adapter_config.json").read_text())
    assert config["format_version"] == 1 and config["lm_model"] == tiny["lm_model"]
    assert config["eos_token_id"] is not None and config["image_feature_dim"] > 0
    training = config["training"]
    assert training["checkpoint"] == "best" and training["best"]["val_rougeL"] >= 0
    assert training["history"] and "torch" in training["library_versions"]
    assert training["hyperparameters"]["learning_rate"] == 3e-3
    # The final evaluation's metrics.json names the adapter it scored, as eval.py's does.
    assert json.loads((run / "metrics.json").read_text())["adapter"] == eval_script.adapter_identity(run)
    assert eval_script.adapter_identity(run)["step"] == training["step"]
    # The adapter standardises features by the training set's statistics, saved with its weights.
    assert config["standardize_image_features"] is True
    weights = load_file(str(run / "adapter.safetensors"))
    captioner = load_captioner(run)
    features = extract_features(captioner, load_records("folder", "train", tiny["data_dir"]), progress=False,
                                cache_dir=tmp_path / "features")
    assert torch.allclose(weights["feature_mean"], features.mean(dim=0), atol=1e-6)
    assert torch.equal(captioner.adapter.feature_mean, weights["feature_mean"])

    log = read_jsonl(run / "train_log.jsonl")
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert losses[-1] < losses[0], "the training loss should fall"
    assert any(r["type"] == "eval" and "val_rougeL" in r for r in log)

    # The output says where the run went: the banner, the closing line, and the report's path (the demo's
    # output ended at the test table, and a --no-final-eval run's at its last validation line).
    trained = capsys.readouterr().out
    assert f"  run folder = {run}\n" in trained
    assert "  epochs = 2   steps per epoch = " in trained  # train_args gives --epochs 2
    best = training["best"]
    assert (f"training finished: the best adapter (step {best['step']}, val_rougeL {best['val_rougeL']:.4f}) is in "
            f"{run}, the last in {run / 'last'}; scoring it on the test split\n") in trained
    assert trained.rstrip().splitlines()[-1].startswith(f"wrote {run / 'metrics.json'}, ")
    assert f"{run / 'report.html'}" in trained.rstrip().splitlines()[-1]
    assert eval_script.main([str(run), "--split", "test", "--no-progress", "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "ROUGE-L" in printed and "BLEU-4" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["rougeL"] <= 1 and 0 <= metrics["bleu4"] <= 1
    assert "rouge-score" in metrics["rougeL_variant"]
    predictions = read_jsonl(run / "predictions.jsonl")
    assert len(predictions) == metrics["num_images"] == 6
    assert all(len(p["references"]) == 5 and isinstance(p["prediction"], str) for p in predictions)

    images = [str(Path(tiny["data_dir"]) / "images" / f"test_000{i}.png") for i in range(3)]
    assert inference.main(["--checkpoint", str(run), "--json", *images]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images
    # The same greedy captions eval.py wrote for those images.
    by_id = {p["image_id"]: p["prediction"] for p in predictions}
    assert [line["caption"] for line in lines] == [by_id[f"images/test_000{i}.png"] for i in range(3)]


def test_the_banner_gives_the_length_max_steps_sets():
    """With --max-steps the banner said "epochs = 16" of a run that ended within the first."""
    config = train.parse_config(["--epochs", "16", "--max-steps", "6"])
    assert train.length_line(config, 141, 6) == "epochs = 0.0426 (--max-steps 6)   steps per epoch = 141   total " \
                                                "optimizer steps = 6"
    assert train.length_line(train.parse_config(["--epochs", "16"]), 141, 2256).startswith("epochs = 16   ")


def test_a_transformer_adapter_trains_and_reloads(tiny, tmp_path):
    args = train_args(tiny, tmp_path, "mapper", "--final-eval", "false", "--adapter-kind", "transformer",
                      "--adapter-layers", "2", "--prefix-length", "4")
    assert train.main(args) == 0
    losses = [r["loss"] for r in read_jsonl(tmp_path / "mapper" / "train_log.jsonl") if r["type"] == "train"]
    assert losses[-1] < losses[0], losses
    captioner = load_captioner(tmp_path / "mapper")
    assert (captioner.config.adapter_kind, captioner.config.adapter_layers, captioner.config.prefix_length) == (
        "transformer", 2, 4)
    assert len(captioner.adapter.net.layers.layers) == 2


def test_a_run_and_its_evaluation_each_read_the_caption_file_once(tiny, tmp_path, monkeypatch):
    # train.py read it for its train, val and test splits and again for the deal's record, eval.py for the split it
    # scores, the baseline's training images and the deal's checks: 3.5 s each time for COCO's (one_reading_per_folder).
    read, reads = dataset._read_caption_rows, []
    monkeypatch.setattr(dataset, "_read_caption_rows", lambda data_dir: reads.append(data_dir) or read(data_dir))
    assert train.main(train_args(tiny, tmp_path, "once", "--max-steps", "2", "--test-limit", "2")) == 0
    assert len(reads) == 1
    assert eval_script.main([str(tmp_path / "once"), "--limit", "2", "--out", str(tmp_path / "eval"), "--no-progress",
                             "--num-workers", "0"]) == 0
    assert len(reads) == 2


def test_no_frozen_weight_is_ever_saved(tiny, tmp_path):
    # 6 steps write every kind of checkpoint file a longer run does: best (step 5), resume, last.
    train.main(train_args(tiny, tmp_path, "lean", "--final-eval", "false", "--max-steps", "6"))
    run = tmp_path / "lean"
    adapter_keys = set(adapter_weights(run / "adapter.safetensors"))
    statistics = {"feature_mean", "feature_std"}  # the training features' (F,) mean and std: not trained
    assert statistics < adapter_keys and all(key.startswith("net.") for key in adapter_keys - statistics)
    adapter_numel = sum(t.numel() for name, t in adapter_weights(run / "adapter.safetensors").items()
                        if name not in statistics)
    for path in run.rglob("adapter.safetensors"):
        with safe_open(str(path), "pt") as handle:
            assert set(handle.keys()) == adapter_keys, path
    # Resume state: safetensors + JSON only, nothing that loading would unpickle.
    assert {p.suffix for p in run.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".jsonl"}
    optimizer = load_state(run / "resume", "optimizer")
    moments = sum(t.numel() for state in optimizer["state"].values() for t in state.values() if t.dim() > 0)
    assert moments == 2 * adapter_numel  # Adam's two moments, for the adapter alone
    frozen_bytes = sum(p.stat().st_size for p in Path(tiny["lm_model"]).glob("*.safetensors"))
    assert sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) < 8 * adapter_numel * 4 + frozen_bytes
    # Every file with the mode open() gives (safetensors alone would write 0600: unreadable to a team).
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(run): oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def logged_losses(run: Path) -> list[tuple[int, float, int]]:
    """(step, mean training loss, samples) of each training log line."""
    return [(r["step"], r["loss"], r["samples"]) for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "train"]


@pytest.fixture(scope="module")
def straight_run(tiny, tmp_path_factory) -> Path:
    """One uninterrupted run that both signals' interrupted-and-resumed runs must match (only read)."""
    output = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:  # built before the per-test cache isolation: its own cache
        patch.setenv("CAPTIONER_HOME", str(output / "captioner-home"))
        assert train.main(train_args(tiny, output, "straight")) == 0
    return output / "straight"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_signal_matches_uninterrupted_run(tiny, tmp_path, signum, capsys, monkeypatch, straight_run):
    expected = adapter_weights(straight_run / "last" / "adapter.safetensors")
    saved_rng, restored_rng, real_resume = [], [], train.resume

    def interrupt_at_7(step):
        if step == 7:
            saved_rng.append((torch.get_rng_state(), random.getstate()))  # as the checkpoint saves them, next
            signal.raise_signal(signum)  # Ctrl-C, or a scheduler's SIGTERM: the loop saves and leaves

    summary = train.train(train.parse_config(train_args(tiny, tmp_path, "stopped")), on_step=interrupt_at_7)
    assert summary["interrupted"] and summary["step"] == 7
    state = json.loads((tmp_path / "stopped" / "resume" / "trainer_state.json").read_text())
    assert state["step"] == 7 and not state["finished"]
    # The printed command is the one that resumes (its paths quoted for the shell).
    hint = capsys.readouterr().out.split("continue with ")[-1].strip()
    program, script, *args = shlex.split(hint)
    assert (program, script, args[-1]) == ("python", "train.py", "--resume"), hint

    def resume_and_look(run, *rest):
        real_resume(run, *rest)
        restored_rng.append((torch.get_rng_state(), random.getstate()))

    monkeypatch.setattr(train, "resume", resume_and_look)
    assert train.main([*args, "--no-progress"]) == 0
    # The random generators go on from where they were stopped (nothing trained draws from them yet; dropout would).
    assert torch.equal(restored_rng[0][0], saved_rng[0][0]) and restored_rng[0][1] == saved_rng[0][1]
    resumed = adapter_weights(tmp_path / "stopped" / "last" / "adapter.safetensors")
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    # The same log lines: step 8's mean loss includes step 7's, taken before the signal.
    assert logged_losses(tmp_path / "stopped") == logged_losses(straight_run)


def test_signal_during_the_final_validation_or_test_evaluation_keeps_the_finished_run(tiny, tmp_path, monkeypatch,
                                                                                     capsys):
    # The end of a run (final validation, save, test evaluation) can take minutes; a Ctrl-C there
    # must neither lose the training nor leave a run folder that can be neither resumed nor redone.
    real_validate = train.validate

    steps_done = []

    def interrupted_validate(captioner, pairs, records, config, accelerator):
        if steps_done[-1:] == [config.max_steps]:  # the validation after the last step
            signal.raise_signal(signal.SIGINT)
        return real_validate(captioner, pairs, records, config, accelerator)

    monkeypatch.setattr(train, "validate", interrupted_validate)
    args = train_args(tiny, tmp_path, "late", "--max-steps", "7", "--eval-every", "0", "--save-every", "100")
    assert train.main(args, on_step=steps_done.append) == 1
    out = capsys.readouterr().out
    assert "training finished and is saved" in out and "python eval.py" in out
    state = json.loads((tmp_path / "late" / "resume" / "trainer_state.json").read_text())
    assert state["finished"] and state["step"] == 7
    assert (tmp_path / "late" / "adapter.safetensors").is_file() and not (tmp_path / "late" / "metrics.json").exists()

    def interrupted_evaluation(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "final_evaluation", interrupted_evaluation)
    args = train_args(tiny, tmp_path, "later", "--max-steps", "3", "--save-every", "100")
    assert train.main(args) == 1
    assert "the test evaluation was not completed: python eval.py" in capsys.readouterr().err
    assert json.loads((tmp_path / "later" / "resume" / "trainer_state.json").read_text())["finished"]


def test_resume_after_crash_restarts_from_last_checkpoint(tiny, tmp_path):
    train.main(train_args(tiny, tmp_path, "straight"))
    expected = adapter_weights(tmp_path / "straight" / "last" / "adapter.safetensors")

    crash_at_step_8(train_args(tiny, tmp_path, "crashed"))
    state = json.loads((tmp_path / "crashed" / "resume" / "trainer_state.json").read_text())
    assert state["step"] == 5  # the last periodic checkpoint (--save-every 5)
    assert train.main(["--run-name", "crashed", "--output-dir", str(tmp_path), "--resume", "--no-progress"]) == 0
    resumed = adapter_weights(tmp_path / "crashed" / "last" / "adapter.safetensors")
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert logged_losses(tmp_path / "crashed") == logged_losses(tmp_path / "straight")  # step 6's includes step 5's


def test_resume_on_other_lm_weights_noted(tiny, tmp_path, capsys):
    lm = Path(shutil.copytree(tiny["lm_model"], tmp_path / "lm"))
    assert train.main(train_args({**tiny, "lm_model": str(lm)}, tmp_path, "run", "--max-steps", "5",
                                 "--final-eval", "false")) == 0
    other_values_in(lm / "model.safetensors", "model.layers.1.mlp.gate_proj.weight")
    capsys.readouterr()
    assert train.main(["--run-name", "run", "--output-dir", str(tmp_path), "--resume", "--max-steps", "6",
                       "--no-progress"]) == 0
    said = capsys.readouterr().err
    assert said.count("not those") == 1 and f"LM {lm}" in said and "train again" in said, said


def test_a_restored_log_window_counts_its_samples_but_times_only_its_own(monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    clock = iter([100.0, 102.0, 102.0])  # the window starts, then flushes 2 s later (and starts anew)
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    window = train.LossWindow(accelerator)
    window.restore({"loss": 3.0, "steps": 1, "samples": 1000})  # taken before the checkpoint, in unknown time
    window.add_step(torch.tensor(1.0))
    window.samples += 16
    assert window.flush() == {"loss": 2.0, "samples": 1016, "samples_per_s": 8.0}  # not 1016 / 2


def test_samples_per_s_leaves_out_the_first_step_which_compiles(tiny, tmp_path, monkeypatch):
    """With --compile the first step of a start compiles (tens of seconds on a GPU); counted in, the first
    log line's samples/s understated the pace many times over. Here that first step takes 2 s longer."""
    first_call = []

    class SlowFirstStep(train.TrainingLoss):
        def __call__(self, **batch):
            if not first_call:
                first_call.append(True)
                time.sleep(2.0)
            return super().__call__(**batch)

    monkeypatch.setattr(train, "TrainingLoss", SlowFirstStep)
    args = train_args(tiny, tmp_path, "warm", "--final-eval", "false", "--max-steps", "4", "--log-every", "4")
    assert train.main(args) == 0
    (line,) = [entry for entry in read_jsonl(tmp_path / "warm" / "train_log.jsonl") if entry["type"] == "train"]
    assert line["samples"] == 4 * 16  # every step's samples count...
    assert 3 * 16 / line["samples_per_s"] < 1.0  # ...but the 3 timed steps took well under the first one's 2 s


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run, as (step, value) by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tracking" / "captioner"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_shows_the_log_and_a_resumed_run_once(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    args = train_args(tiny, tmp_path, "tracked", "--report-to", "tensorboard")

    crash_at_step_8(args)  # after the checkpoint at step 5, steps 6 and 8 were logged
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tracked")["train/loss"]] == [2, 4, 6, 8]
    assert train.main(["--run-name", "tracked", "--output-dir", str(tmp_path), "--resume", "--no-progress"]) == 0

    scalars = tensorboard_scalars(tmp_path / "tracked")
    log = read_jsonl(tmp_path / "tracked" / "train_log.jsonl")
    # The same numbers as train_log.jsonl, each step once: what came after the checkpoint is shown
    # from the resumed run only, as the log keeps it.
    for tag, kind, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                           ("val/loss", "eval", "val_loss"), ("val/rougeL", "eval", "val_rougeL"),
                           ("val/cider_d", "eval", "val_cider_d")):
        expected = [(r["step"], r[key]) for r in log if r["type"] == kind]
        assert [s for s, _ in scalars[tag]] == [s for s, _ in expected], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-7), tag
    metrics = json.loads((tmp_path / "tracked" / "metrics.json").read_text())
    assert scalars["test/coco_cider_d"] == [(26, pytest.approx(metrics["coco_cider_d"], rel=1e-6))]
    # Two starts, one row in TensorBoard's HParams tab: the settings are written once per run folder
    # (add_hparams makes a time-named sub-run each call, with Accelerate's hparams.yml beside it).
    sub_runs = [p for p in (tmp_path / "tracked" / "tracking" / "captioner").iterdir() if p.is_dir()]
    assert len([p for p in sub_runs if (p / "hparams.yml").is_file()]) == 1, sub_runs
    assert len([p for p in sub_runs if any(p.glob("events.out.tfevents.*"))]) == 1, sub_runs


def test_report_to_wandb_goes_on_in_the_same_wandb_run_after_a_resume(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # where a wandb/ folder would appear if W&B were not told the run's folder
    args = train_args(tiny, tmp_path, "tracked", "--report-to", "wandb", "--final-eval", "false", "--max-steps", "10")

    crash_at_step_8(args)
    # W&B names an offline folder by its start's second and the run id: a resume within the same second would
    # share the first start's folder (only a test is that quick), so this waits for the next second.
    time.sleep(1 - time.time() % 1)
    assert train.main(["--run-name", "tracked", "--output-dir", str(tmp_path), "--resume", "--no-progress"]) == 0
    assert train.main([*train_args(tiny, tmp_path, "other", "--report-to", "wandb", "--final-eval", "false",
                                   "--max-steps", "2")]) == 0

    def wandb_runs(run: str) -> list[str]:  # W&B's offline folders: offline-run-<time>-<run id>
        return sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / run / "tracking" / "wandb").glob("offline-run-*"))

    run_id = (tmp_path / "tracked" / "tracking" / "wandb_run_id.txt").read_text().strip()
    assert wandb_runs("tracked") == [run_id, run_id]  # two starts, one W&B run (`wandb sync` joins them)
    assert wandb_runs("other") != [run_id] and len(wandb_runs("other")) == 1  # another run, another W&B run
    assert not (tmp_path / "wandb").exists()


def test_mlflow_keeps_its_store_and_its_run_id_in_the_run_folder(tmp_path, monkeypatch):
    """Without mlflow installed: the store MLflow is pointed at, and the run it is told to go on in.
    (End to end, with mlflow: test_report_to_mlflow_goes_on_in_the_same_mlflow_run_after_a_resume.)"""
    tracking = tmp_path / "run" / "tracking"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = train.mlflow_store_uri(tracking)
    assert store in (f"sqlite:///{tracking / 'mlflow.db'}", (tracking / "mlruns").as_uri())  # not ./mlflow.db
    assert train.mlflow_run(tracking, store) == {"logging_dir": (tracking / "mlartifacts").as_uri()}  # a new run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert train.mlflow_store_uri(tracking) is None  # the user's store, and its artifact location
    tracking.mkdir(parents=True)
    train.keep_run_id(tracking / "mlflow_run_id.txt", "0123abcd")  # the first start's run
    train.keep_run_id(tracking / "mlflow_run_id.txt", "ffff0000")  # MLFLOW_RUN_ID of a later start: not kept
    assert train.mlflow_run(tracking, None) == {"run_id": "0123abcd"}


def test_the_trackers_hear_whether_a_run_failed_was_stopped_or_finished(tiny, tmp_path, monkeypatch):
    """Without mlflow installed: a run a signal stopped (saved, to resume) is closed as interrupted, and
    MLflow is told KILLED (FAILED after an error), not FINISHED. (End to end, with mlflow:
    test_report_to_mlflow_goes_on_in_the_same_mlflow_run_after_a_resume.)"""
    import sys
    from types import SimpleNamespace

    closed, real_close = [], train.close_trackers

    def spy(accelerator, failed=False, interrupted=False):
        closed.append((failed, interrupted))
        real_close(accelerator, failed, interrupted)

    monkeypatch.setattr(train, "close_trackers", spy)
    args = train_args(tiny, tmp_path, "stopped", "--final-eval", "false", "--max-steps", "6")
    sigterm_at_3 = lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    assert train.train(train.parse_config(args), on_step=sigterm_at_3)["interrupted"]
    assert closed == [(False, True)]
    assert not train.train(train.parse_config([*args, "--resume"]))["interrupted"]
    assert closed[-1] == (False, False)

    ended = []
    monkeypatch.setitem(sys.modules, "mlflow", SimpleNamespace(end_run=lambda status: ended.append(status)))
    for failed, interrupted in ((True, False), (False, True), (False, False)):
        tracker = SimpleNamespace(name="mlflow", finish=lambda: ended.append("FINISHED"))
        real_close(SimpleNamespace(trackers=[tracker]), failed, interrupted)
    assert ended == ["FAILED", "KILLED", "FINISHED"]


def test_mlflow_refusing_its_folder_store_says_what_to_do_in_the_line():
    """mlflow-skinny without SQLAlchemy: MLflow 3.7+'s refusal names its opt-out too late for one line."""
    refusal = ("The filesystem tracking backend (e.g., './mlruns') is in maintenance mode and will not receive "
               "further updates. " + "Please migrate. " * 30 + "set `MLFLOW_ALLOW_FILE_STORE=true` to opt out.")
    line = train.tracker_error(RuntimeError(refusal))
    assert "pip install sqlalchemy alembic" in line and "MLFLOW_ALLOW_FILE_STORE=true" in line
    assert train.tracker_error(OSError("No space left on device\nmore")) == "OSError: No space left on device"


def test_report_to_mlflow_goes_on_in_the_same_mlflow_run_after_a_resume(tiny, tmp_path, monkeypatch):
    """Its store in the run's tracking/ folder, not where the command ran; one MLflow run for every
    start, marked failed after the crash, killed after a signal's stop and finished at the end; the settings logged once (MLflow
    refuses a setting logged again with another value); MLflow's default store back afterwards."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # where SQLAlchemy (mlflow-skinny) is missing
    monkeypatch.chdir(tmp_path)  # where MLflow's own default store would appear
    args = train_args(tiny, tmp_path, "tracked", "--report-to", "mlflow", "--final-eval", "false", "--max-steps", "10")

    crash_at_step_8(args)
    tracking = tmp_path / "tracked" / "tracking"
    run_id = (tracking / "mlflow_run_id.txt").read_text().strip()
    client = mlflow.MlflowClient(train.mlflow_store_uri(tracking))
    assert client.get_run(run_id).info.status == "FAILED"
    resume = ["--run-name", "tracked", "--output-dir", str(tmp_path), "--resume", "--no-progress"]
    sigterm_at_9 = lambda step: step == 9 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    assert train.train(train.parse_config(resume), on_step=sigterm_at_9)["interrupted"]
    assert client.get_run(run_id).info.status == "KILLED"  # stopped from outside, saved: not finished
    assert train.main(resume) == 0
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["resume"] == "False"  # the first start's settings
    # Steps 6 and 8 were sent before the crash and again after the resume: MLflow keeps both, in order.
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8, 6, 8, 10]
    assert {p.name for p in tmp_path.iterdir()} - {"captioner-home"} == {"tracked"}  # no mlflow.db, mlruns/
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
def test_a_run_that_fails_shows_as_failed_in_wandb_not_finished(tiny, tmp_path, monkeypatch):
    """The trackers are closed however training ends; W&B must hear that an error ended it (exit code 1,
    shown as failed), not see a crashed run closed as finished. (A finished run is closed as before:
    test_report_to_wandb_goes_on_in_the_same_wandb_run_after_a_resume.)"""
    wandb = pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    exit_codes, real_finish = [], wandb.Run.finish

    def finish(self, exit_code=None, quiet=None):
        exit_codes.append(exit_code)
        return real_finish(self, exit_code=exit_code, quiet=quiet)

    monkeypatch.setattr(wandb.Run, "finish", finish)
    args = train_args(tiny, tmp_path, "tracked", "--report-to", "wandb", "--final-eval", "false", "--max-steps", "4",
                      "--eval-every", "0")

    def crash_at_3(step):
        if step == 3:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        train.train(train.parse_config(args), on_step=crash_at_3)
    assert exit_codes == [1]


@pytest.mark.parametrize("report_to, message", [
    ("tensorbord", "--report-to 'tensorbord': unknown tensorbord; give none or some of tensorboard, wandb"),
    ("comet_ml", "--report-to comet_ml: not installed here; pip install comet-ml, or leave it out"),
    (",", "--report-to ',': empty"),
    ("none,tensorboard", "none cannot be combined with trackers"),
])
def test_report_to_a_tracker_that_cannot_run_is_one_line_before_any_work(tiny, tmp_path, capsys, report_to, message):
    if report_to == "comet_ml" and importlib.util.find_spec("comet_ml"):
        pytest.skip("comet_ml is installed here")
    assert run_cli(train.main, train_args(tiny, tmp_path, "untracked", "--report-to", report_to)) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error, error
    assert not (tmp_path / "untracked").exists()


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_resumes_without_it(tiny, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    args = train_args(tiny, tmp_path, "tracked", "--report-to", "tensorboard", "--final-eval", "false")
    assert train.main([*args, "--max-steps", "4"]) == 0
    shutil.rmtree(tmp_path / "tracked" / "tracking")
    (tmp_path / "tracked" / "tracking").write_text("not a folder")  # TensorBoard cannot write its events
    resume = ["--run-name", "tracked", "--output-dir", str(tmp_path), "--resume", "--no-progress", "--max-steps", "6"]
    assert run_cli(train.main, resume) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: --report-to tensorboard: a tracker could not start "
                                                   "(NotADirectoryError"), error
    assert "--report-to none" in error  # what to do: leaving the flag out would resume with the saved one
    assert train.main([*resume, "--report-to", "none"]) == 0  # the work was kept, and the flag may change
    assert json.loads((tmp_path / "tracked" / "resume" / "trainer_state.json").read_text())["step"] == 6


def test_a_wandb_run_that_cannot_keep_its_id_is_one_line(tiny, tmp_path, capsys):
    pytest.importorskip("wandb")
    args = train_args(tiny, tmp_path, "tracked", "--final-eval", "false", "--max-steps", "4")
    assert train.main(args) == 0
    (tmp_path / "tracked" / "tracking").write_text("not a folder")  # where W&B's id and files would go
    resume = ["--run-name", "tracked", "--output-dir", str(tmp_path), "--resume", "--no-progress", "--max-steps", "6"]
    assert run_cli(train.main, [*resume, "--report-to", "wandb"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: --report-to wandb: a tracker could not start "
                                                   "(FileExistsError"), error


def test_a_tracker_that_cannot_start_changes_nothing_the_next_command_reads(tiny, tmp_path, capsys, monkeypatch):
    """The run's saved config keeps its --report-to, and a new run leaves no folder behind, so the
    same command without the tracker runs."""
    pytest.importorskip("tensorboard")
    from accelerate.tracking import TensorBoardTracker

    def cannot_start(self, *args, **kwargs):
        raise OSError("No space left on device")

    args = train_args(tiny, tmp_path, "plain", "--final-eval", "false", "--max-steps", "4")
    assert train.main(args) == 0
    monkeypatch.setattr(TensorBoardTracker, "__init__", cannot_start)
    resume = ["--run-name", "plain", "--output-dir", str(tmp_path), "--resume", "--no-progress", "--max-steps", "6"]
    assert run_cli(train.main, [*resume, "--report-to", "tensorboard"]) == 2
    assert "a tracker could not start (OSError: No space left on device)" in capsys.readouterr().err
    assert json.loads((tmp_path / "plain" / "run_config.json").read_text())["report_to"] == "none"
    assert train.main(resume) == 0  # as saved: no tracker
    new = train_args(tiny, tmp_path, "new", "--final-eval", "false", "--max-steps", "2")
    assert run_cli(train.main, [*new, "--report-to", "tensorboard"]) == 2
    assert not (tmp_path / "new").exists()
    assert train.main(new) == 0


def test_select_by_cider_d_with_one_validation_image_is_refused_before_anything_is_written(tiny, tmp_path, capsys):
    args = train_args(tiny, tmp_path, "one-val", "--select-by", "cider_d", "--val-limit", "1")
    assert run_cli(train.main, args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "with 1 validation image every weight is 0" in error, error
    assert not (tmp_path / "one-val").exists()


def test_resume_continues_the_folder_it_is_given_and_applies_only_flags_that_may_change(tiny, tmp_path, capsys):
    import shutil

    train.main(train_args(tiny, tmp_path, "first", "--final-eval", "false", "--max-steps", "4"))
    original = {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()}
    # A copied (or moved) run continues in its own folder, never in the one its config names.
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    resume = ["--output-dir", str(tmp_path), "--run-name", "copy", "--resume", "--no-progress"]
    assert train.main([*resume, "--max-steps", "6", "--learning-rate", "1e-3", "--log-every", "1"]) == 0
    assert {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()} == original
    log = read_jsonl(tmp_path / "copy" / "train_log.jsonl")
    assert max(r["step"] for r in log if r["type"] == "train") == 6  # --max-steps was extended
    assert "--learning-rate 0.001 (was 0.003)" in capsys.readouterr().out
    # The schedule keeps its shape (cosine over the 6 steps now asked for) at the new peak: step 5 used
    # (and logs) the rate after 4 steps.
    lr_of_step_5 = next(r["lr"] for r in log if r["type"] == "train" and r["step"] == 5)
    assert lr_of_step_5 == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))
    # A flag that would contradict the saved state is refused, in one line, naming it.
    assert run_cli(train.main, [*resume, "--batch-size", "8"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--batch-size (saved 16) cannot change" in error
    # A data flag this run's source never reads is refused too, not silently dropped.
    assert run_cli(train.main, [*resume, "--hub-data-files", "mine/*.parquet"]) == 2
    assert "--hub-data-files is read by --dataset flickr30k only" in capsys.readouterr().err


def test_a_run_saved_before_later_fields_existed_resumes_as_it_was_trained(tiny, tmp_path):
    import hashlib

    args = train_args(tiny, tmp_path, "old", "--final-eval", "false", "--no-standardize-image-features")
    assert train.main([*args, "--max-steps", "4"]) == 0
    for name in ("run_config.json", "adapter_config.json", "last/adapter_config.json"):  # as written back then
        saved = json.loads((tmp_path / "old" / name).read_text())
        for field in train.FIELDS_ADDED_LATER:  # standardize_image_features, adapter_layers, select_by
            assert field in saved or name != "run_config.json"
            saved.pop(field, None)
        (tmp_path / "old" / name).write_text(json.dumps(saved))
    # The resume state's settings digest, as the code before the field computed it (over every field then).
    fixed = {name: value for name, value in json.loads((tmp_path / "old" / "run_config.json").read_text()).items()
             if name not in train.RESUME_OVERRIDES | {*train.RESUME_FROM_COMMAND_LINE, "resume"}}
    old_digest = hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]
    state_file = tmp_path / "old" / "resume" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    best = state.pop("best_score")  # kept as best_rougeL before --select-by, -1 until a validation
    state_file.write_text(json.dumps({**state, "settings": old_digest, "best_rougeL": -1 if best is None else best}))
    resume = ["--output-dir", str(tmp_path), "--run-name", "old", "--resume", "--no-progress", "--max-steps", "6"]
    assert train.main(resume) == 0  # not "does not belong to this run", nor a missing feature_mean
    assert json.loads((tmp_path / "old" / "run_config.json").read_text())["standardize_image_features"] is False
    assert "feature_mean" not in adapter_weights(tmp_path / "old" / "last" / "adapter.safetensors")
    assert json.loads((tmp_path / "old" / "last" / "adapter_config.json").read_text())["training"]["best"]["by"] == \
        "val_rougeL"
    assert max(r["step"] for r in read_jsonl(tmp_path / "old" / "train_log.jsonl") if r["type"] == "train") == 6


def test_a_finished_run_given_more_steps_trains_from_its_first_new_step(tiny, tmp_path, capsys):
    """The optimizer comes back with the finished schedule's last rate, 0: without taking the new
    schedule's rate, the first step after extending a run silently changed nothing."""
    args = train_args(tiny, tmp_path, "done", "--final-eval", "false", "--max-steps", "4")
    assert train.main(args) == 0
    finished = adapter_weights(tmp_path / "done" / "last" / "adapter.safetensors")
    resume = ["--output-dir", str(tmp_path), "--run-name", "done", "--resume", "--no-progress"]
    capsys.readouterr()
    assert train.main([*resume, "--max-steps", "5"]) == 0
    # Its best adapter is from step 4, the checkpoint's own: no newer best to adopt or to give up.
    assert "after this checkpoint" not in capsys.readouterr().out
    extended = adapter_weights(tmp_path / "done" / "last" / "adapter.safetensors")
    assert any(not torch.equal(finished[key], extended[key]) for key in finished), "step 5 changed nothing"
    # Fewer steps than the run has taken: nothing to continue, said in one line, the config untouched.
    config = (tmp_path / "done" / "run_config.json").read_text()
    capsys.readouterr()
    assert run_cli(train.main, [*resume, "--max-steps", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert "is at step 5" in error and "nothing to continue" in error and "\n" not in error, error
    assert (tmp_path / "done" / "run_config.json").read_text() == config


@pytest.mark.parametrize("flags, message", [
    (["--bogus-flag"], "unknown arguments --bogus-flag"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--max-steps", "-5"], "--max-steps must be >= 0"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be >= 1"),
    (["--max-nonfinite-steps", "-1"], "--max-nonfinite-steps must be >= 0"),
    (["--train-limit", "-1"], "--train-limit must be >= 0"),
    (["--learning-rate", "nan"], "--learning-rate must be > 0"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),  # a run that trains nothing
    (["--adapter-hidden-dim", "-5"], "--adapter-hidden-dim must be >= 0"),
    (["--adapter-layers", "0", "--adapter-kind", "transformer"], "--adapter-layers must be >= 1"),
    (["--adapter-layers", "4"], "--adapter-layers sizes the transformer adapter, but --adapter-kind is mlp"),
    (["--adapter-kind", "transformer", "--adapter-hidden-dim", "64"], "--adapter-hidden-dim sizes the mlp adapter"),
    # The linear adapter makes one prefix token: --prefix-length was taken and dropped without a word.
    (["--adapter-kind", "linear", "--prefix-length", "5"], "--prefix-length 5: the linear adapter always makes one "
                                                           "prefix token; drop it, or pass --adapter-kind mlp"),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295"),
    (["--seed", "4294967296"], "--seed must be from 0 to 4294967295"),
    (["--run-name", ".."], "must be a plain folder name"),
    (["--run-name", "a/b"], "must be a plain folder name"),
    (["--run-name", "/abs/x"], "must be a plain folder name"),
    (["--demo", "--dataset", "flickr30k"], "--demo trains on its own synthetic caption folder"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number >= 0"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be"),
    (["--warmup-ratio", "1"], "--warmup-ratio must be >= 0 and < 1"),  # all warm-up: the rate never came down
    (["--max-caption-tokens", "1"], "--max-caption-tokens must be >= 2 (one word and EOS)"),  # EOS alone
    (["--output-dir", "A_FILE"], "is a file, not a folder"),
    # A path through a file: the run folder's mkdir was a NotADirectoryError traceback after the data had loaded,
    (["--output-dir", "A_FILE/runs"], "--output-dir A_FILE/runs cannot be a folder: A_FILE is a file"),
    # and a feature cache there cached nothing, said in a note among the run's output.
    (["--feature-cache-dir", "A_FILE/cache"], "--feature-cache-dir A_FILE/cache cannot be a folder: A_FILE is a file"),
    (["--hub-data-files", "mine/*.parquet"], "--hub-data-files is read by --dataset flickr30k only, and this run "
                                             "reads --dataset folder"),
    (["--dataset", "flickr30k"], "is read by --dataset karpathy or folder, but --dataset flickr30k"),
    (["--data-dir", ""], "--data-dir is empty"),
    (["--dataset", "karpathy", "--folder-split", "shuffle"], "--folder-split deals the images of a --dataset folder "
                                                             "that name no split, and --dataset karpathy gives"),
])
def test_bad_flag_values_are_one_line_errors_before_any_work(tiny, tmp_path, capsys, flags, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    args = train_args(tiny, tmp_path, "bad") + [flag.replace("A_FILE", str(a_file)) for flag in flags]
    assert run_cli(train.main, args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and message.replace("A_FILE", str(a_file)) in error, error


@pytest.mark.parametrize("flags, said", [
    (["--test-limit", "5", "--final-eval", "false"], "note: --test-limit 5 changes nothing: the final test evaluation "
                                                     "is off"),
    (["--no-feature-cache", "--feature-cache-dir", "CACHE"], "note: --feature-cache-dir CACHE changes nothing: the "
                                                             "feature cache is off"),
    (["--clip-revision", "v1"], "note: --clip-revision v1 changes nothing: CLIP is a local folder, read as it is"),
    ([], ""),
    (["--max-steps", "4"], ""),  # over train_args' own --epochs 2, as --max-steps's help says: not noted
])
def test_a_flag_the_run_would_not_use_is_noted(tiny, tmp_path, capsys, flags, said):
    """Each was taken without a word; nothing is lost by it, so a note, not an error."""
    flags = [flag.replace("CACHE", str(tmp_path / "cache")) for flag in flags]
    train.resolve_config(train.parse_config(train_args(tiny, tmp_path, "noted", *flags)))
    err = capsys.readouterr().err
    said = said.replace("CACHE", str(tmp_path / "cache")).replace("CLIP", tiny["clip_model"])
    assert err.strip().startswith(said) and "\n" not in err.strip(), err
    assert bool(err) == bool(said), err


def test_data_dir_without_dataset_reads_the_layout_its_files_show(tiny, tmp_path, capsys):
    """--dataset defaults to flickr30k, which reads no folder: "--data-dir D" alone was refused although D's
    caption file says which loader reads it. A folder whose files say nothing, or both, still needs --dataset."""
    args = train_args(tiny, tmp_path, "laid-out")[2:]  # without "--dataset folder"
    assert train.resolve_config(train.parse_config(args)).dataset == "folder"
    assert capsys.readouterr().err.strip() == f"note: --data-dir {tiny['data_dir']} holds captions.jsonl: read as " \
                                              "--dataset folder"
    karpathy = tmp_path / "karpathy"
    karpathy.mkdir()
    (karpathy / "dataset_flickr8k.json").write_text('{"images": []}')
    assert train.dataset_from_data_dir(str(karpathy)) == "karpathy"
    (karpathy / "captions.jsonl").write_text("")
    for folder, said in ((karpathy, "which --dataset reads it is not plain from its files"),
                         (tmp_path / "missing", "is not a folder")):
        args[args.index("--data-dir") + 1] = str(folder)
        assert run_cli(train.main, args) == 2
        assert said in capsys.readouterr().err
    assert run_cli(train.main, args + ["--dataset", "folder"]) == 2  # given, --dataset is taken at its word
    assert "is not a folder" not in capsys.readouterr().err


def test_resume_refuses_epochs_that_max_steps_overrules(tiny, tmp_path, capsys):
    """`--resume --epochs 5` on a run saved with --max-steps said "--epochs 5 (was 2)" and trained the same steps."""
    saved = train.resolve_config(train.parse_config(train_args(tiny, tmp_path, "capped", "--max-steps", "4")))
    (tmp_path / "capped").mkdir()
    write_json(tmp_path / "capped" / train.RUN_CONFIG, dataclasses.asdict(saved))
    resume = ["--output-dir", str(tmp_path), "--run-name", "capped", "--resume", "--no-progress"]
    for steps, where in (([], "4 (saved with the run)"), (["--max-steps", "6"], "6 (given here)")):
        with pytest.raises(UserError) as refused:
            train.resolve_config(train.parse_config([*resume, "--epochs", "5", *steps]))
        assert str(refused.value) == (f"--epochs 5 changes nothing: --max-steps {where} sets the run's length; change "
                                      "--max-steps instead, or give --max-steps 0 to run the epochs")
    # The saved value again (the first command line, --resume added) asks for no change; --max-steps 0 lets the
    # epochs set the length.
    assert train.resolve_config(train.parse_config([*resume, "--epochs", "2"])).max_steps == 4
    assert train.resolve_config(train.parse_config([*resume, "--epochs", "5", "--max-steps", "0"])).epochs == 5
    assert capsys.readouterr().err == ""


def test_resume_refuses_demo_on_a_run_that_is_not_one(tiny, tmp_path):
    """`--resume --demo` on a run of the user's own data dropped --demo without a word."""
    saved = train.resolve_config(train.parse_config(train_args(tiny, tmp_path, "own")))
    (tmp_path / "own").mkdir()
    write_json(tmp_path / "own" / train.RUN_CONFIG, dataclasses.asdict(saved))
    resume = ["--output-dir", str(tmp_path), "--run-name", "own", "--resume", "--no-progress"]
    with pytest.raises(UserError) as refused:
        train.resolve_config(train.parse_config([*resume, "--demo"]))
    assert str(refused.value) == (f"--demo: {tmp_path / 'own'} is not a demo run (it trains on folder data); drop "
                                  "--demo to continue it, or give a demo run's --run-name")
    assert not train.resolve_config(train.parse_config(resume)).demo


def test_validation_says_when_the_lm_writes_one_caption_for_every_image(tiny, tmp_path, monkeypatch, capsys):
    """Collapse (the LM ignores its prefix) shows in validation's log and output, not only at the end."""
    import utils
    from model import Captioner

    monkeypatch.setattr(utils, "COLLAPSE_MIN_IMAGES", 2)  # the fixture's validation split is 4 images
    monkeypatch.setattr(Captioner, "generate", lambda self, features, decoding=None: ["a dog"] * len(features))
    assert train.main(train_args(tiny, tmp_path, "collapsed", "--final-eval", "false", "--max-steps", "5")) == 0
    [evaluation] = [r for r in read_jsonl(tmp_path / "collapsed" / "train_log.jsonl") if r["type"] == "eval"]
    assert evaluation["val_distinct_captions"] == 1 and evaluation["val_top_caption_share"] == 1.0
    assert "step 5: WARNING: one caption for 100% of the 4 validation images ('a dog')" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setattr(utils, "COLLAPSE_MIN_IMAGES", 2)
    monkeypatch.setattr(Captioner, "generate", lambda self, features, decoding=None: [f"a dog {i}" for i in
                                                                                         range(len(features))])
    assert train.main(train_args(tiny, tmp_path, "varied", "--final-eval", "false", "--max-steps", "5")) == 0
    assert "one caption for" not in capsys.readouterr().out


def kept_validation(run: Path) -> tuple[int, dict]:
    """The step of the adapter at the run's top, and the run's validation records by step."""
    training = json.loads((run / "adapter_config.json").read_text())["training"]
    assert training["step"] == training["best"]["step"]  # the top adapter was written at its best step
    return training["best"]["step"], {r["step"]: r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "eval"}


def test_select_by_loss_keeps_the_adapter_of_the_lowest_validation_loss(tiny, tmp_path, capsys):
    args = train_args(tiny, tmp_path, "by-loss", "--final-eval", "false", "--max-steps", "8", "--eval-every", "2",
                      "--select-by", "loss")
    assert train.main(args) == 0
    step, evals = kept_validation(tmp_path / "by-loss")
    lowest = min(evals.values(), key=lambda r: (r["val_loss"], r["step"]))
    assert step == lowest["step"] and lowest["best"]
    assert len({r["val_loss"] for r in evals.values()}) == 4  # four validations, four different losses
    training = json.loads((tmp_path / "by-loss" / "adapter_config.json").read_text())["training"]
    assert training["best"] == {"by": "val_loss", "val_loss": lowest["val_loss"], "step": step}
    # --select-by decides what "best" means for the whole run: a resume may not change it.
    resume = ["--output-dir", str(tmp_path), "--run-name", "by-loss", "--resume", "--no-progress"]
    assert run_cli(train.main, [*resume, "--select-by", "rougeL"]) == 2
    assert "--select-by (saved 'loss') cannot change" in capsys.readouterr().err
    # A hand-edited choice that train.py does not know is named with the ones it does.
    config_file = tmp_path / "by-loss" / "run_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "select_by": "bleu"}))
    assert run_cli(train.main, resume) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "select_by is 'bleu', expected one of rougeL, cider_d, loss" in error, error


def test_select_by_cider_d_keeps_the_adapter_of_the_highest_validation_cider_d(tiny, tmp_path, monkeypatch, capsys):
    # The tiny LM's captions score alike at every step, so the validation CIDEr-D is scripted: highest
    # at the second of four validations, after a lower one and before lower ones.
    scores = iter([0.2, 0.9, 0.5, 0.1])
    monkeypatch.setattr(train, "validation_cider_d", lambda predictions, references: next(scores))
    args = train_args(tiny, tmp_path, "by-cider", "--final-eval", "false", "--max-steps", "8", "--eval-every", "2",
                      "--select-by", "cider_d", "--val-limit", "0")
    assert train.main(args) == 0
    step, evals = kept_validation(tmp_path / "by-cider")
    assert step == 4 and evals[4]["val_cider_d"] == 0.9
    assert [evals[s]["best"] for s in (2, 4, 6, 8)] == [True, True, False, False]
    printed = capsys.readouterr().out
    assert "step 4: val loss" in printed and "CIDEr-D 0.9000  (best so far, saved)" in printed
    assert "CIDEr-D weighs words" in printed  # 6 validation images: too few for its IDF, and it says so


def test_best_so_far_saved_is_said_only_once_the_adapter_is_saved(tiny, tmp_path, monkeypatch, capsys):
    """A run killed while it saved the best adapter (found by a SIGKILL sweep) had already printed "(best so far,
    saved)" of an adapter that was not there."""
    class Killed(BaseException):  # as a SIGKILL: nothing of the run's own handling runs after it
        pass

    def killed_while_saving_best(self, kind):
        if kind == "best":
            raise Killed
        return real_save_export(self, kind)

    real_save_export = train.Run.save_export
    monkeypatch.setattr(train.Run, "save_export", killed_while_saving_best)
    with pytest.raises(Killed):
        train.main(train_args(tiny, tmp_path, "killed", "--final-eval", "false", "--max-steps", "4",
                              "--eval-every", "2", "--val-limit", "0"))
    printed = capsys.readouterr().out
    assert "step 2: val loss" not in printed and "best so far" not in printed, printed


def test_a_nan_validation_score_is_replaced_by_the_next_one(tiny, tmp_path, monkeypatch):
    """No score compares better than NaN (a validation loss overflowing half precision): the adapter that scored
    it must not stay the best for the rest of the run."""
    scores = iter([float("nan"), 0.5])
    monkeypatch.setattr(train, "validation_cider_d", lambda predictions, references: next(scores))
    args = train_args(tiny, tmp_path, "nan-score", "--final-eval", "false", "--max-steps", "4", "--eval-every", "2",
                      "--select-by", "cider_d", "--val-limit", "0")
    assert train.main(args) == 0
    step, evals = kept_validation(tmp_path / "nan-score")
    assert step == 4 and [evals[s]["best"] for s in (2, 4)] == [True, True]


def crash_after_a_best_at_step_6(tiny, tmp_path, monkeypatch, resumed_scores: list[float],
                                 scores_before_the_crash=(0.2, 0.3, 0.9, 0.1)) -> Path:
    """A run (--select-by cider_d, validations every 2 steps, checkpoints every 5) whose scripted
    validation scores make step 6 the best (0.9, after 0.2 and 0.3), then crash at step 8 (or earlier,
    where a test makes it: then give the scores of the validations before it): its resume state
    (step 5) knows only step 4's best. The resumed run's validations score `resumed_scores`."""
    scores = iter([*scores_before_the_crash, *resumed_scores])
    monkeypatch.setattr(train, "validation_cider_d", lambda predictions, references: next(scores))
    args = train_args(tiny, tmp_path, "killed", "--final-eval", "false", "--max-steps", "12", "--eval-every", "2",
                      "--save-every", "5", "--select-by", "cider_d", "--val-limit", "0")

    crash_at_step_8(args)
    run = tmp_path / "killed"
    assert json.loads((run / "resume" / "trainer_state.json").read_text())["best_step"] == 4
    return run


def resume_killed(tmp_path, *flags: str) -> None:
    assert train.main(["--run-name", "killed", "--output-dir", str(tmp_path), "--resume", "--no-progress", *flags]) == 0


@pytest.mark.parametrize("eval_every, resumed_scores, expected_evals", [
    # Another cadence: step 6 is not validated again; 8 and 12 beat step 4's 0.3, not step 6's 0.9.
    (4, [0.5, 0.4], [(2, True), (4, True), (8, False), (12, False)]),
    # The same cadence: step 6 validates again, alike up to float noise (as with another --eval-batch-size):
    # a tie at the kept step keeps it, marked.
    (2, [0.9 - 1e-9, 0.5, 0.4, 0.35], [(2, True), (4, True), (6, True), (8, False), (10, False), (12, False)]),
])
def test_a_best_adapter_saved_after_the_last_checkpoint_survives_a_crash_and_resume(
        tiny, tmp_path, monkeypatch, capsys, eval_every, resumed_scores, expected_evals):
    """The step-6 adapter must stay the best unless a later validation beats it, not be overwritten
    by the first that beats step 4's score."""
    import report

    run = crash_after_a_best_at_step_6(tiny, tmp_path, monkeypatch, resumed_scores)
    kept = adapter_weights(run / "adapter.safetensors")  # step 6's
    capsys.readouterr()
    resume_killed(tmp_path, "--eval-every", str(eval_every))
    top = adapter_weights(run / "adapter.safetensors")
    assert all(torch.equal(top[key], kept[key]) for key in kept)
    assert "the best adapter in" in capsys.readouterr().out
    training = json.loads((run / "adapter_config.json").read_text())["training"]
    assert training["best"] == {"by": "val_cider_d", "val_cider_d": pytest.approx(0.9), "step": 6}
    assert json.loads((run / "resume" / "trainer_state.json").read_text())["best_step"] == 6
    evals = [r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "eval"]
    assert [(r["step"], r["best"]) for r in evals] == expected_evals
    # Where the log lost step 6's validation with the crash, the curves mark the kept step all the same.
    assert report.kept_step(run) == 6
    assert report.best_validation(evals) == (6 if (6, True) in expected_evals else 4)


def test_a_best_from_steps_a_rescheduled_resume_no_takes_is_replaced_by_its_first_validation(tiny, tmp_path,
                                                                                              monkeypatch, capsys):
    # --max-steps 14: from step 5 on, another schedule; step 6's adapter belongs to the one abandoned.
    # Step 8 scores below step 4's 0.3, the checkpoint's best, and still replaces it: no adapter of this
    # schedule was kept before.
    run = crash_after_a_best_at_step_6(tiny, tmp_path, monkeypatch, [0.25, 0.2, 0.1])  # steps 8, 12, 14
    capsys.readouterr()
    resume_killed(tmp_path, "--eval-every", "4", "--max-steps", "14")
    training = json.loads((run / "adapter_config.json").read_text())["training"]
    assert training["best"] == {"by": "val_cider_d", "val_cider_d": 0.25, "step": 8}
    assert training["step"] == 8  # the adapter at the top is the one its config describes
    assert "of another schedule (12 steps, peak learning rate 0.003; now 14 steps, peak learning rate 0.003); the " \
           "first validation from here on replaces it" in capsys.readouterr().out


def test_a_best_from_an_earlier_schedule_is_not_adopted_after_a_second_crash(tiny, tmp_path, monkeypatch, capsys):
    """The rescheduled resume is itself killed before its first validation; the next plain --resume
    changes no flag, yet step 6's adapter is still from the 12-step schedule, not this 14-step one."""
    run = crash_after_a_best_at_step_6(tiny, tmp_path, monkeypatch, [0.25, 0.2, 0.1])  # steps 8, 12, 14

    def crash_at_7(step):
        if step == 7:
            raise RuntimeError("preempted again")

    resumed = ["--run-name", "killed", "--output-dir", str(tmp_path), "--resume", "--no-progress"]
    with pytest.raises(RuntimeError):
        train.train(train.parse_config([*resumed, "--eval-every", "4", "--max-steps", "14"]), on_step=crash_at_7)
    capsys.readouterr()
    resume_killed(tmp_path)
    assert "of another schedule" in capsys.readouterr().out
    training = json.loads((run / "adapter_config.json").read_text())["training"]
    assert training["best"] == {"by": "val_cider_d", "val_cider_d": 0.25, "step": 8}


def test_a_crash_between_writing_the_best_weights_and_their_config_is_repaired_on_resume(tiny, tmp_path,
                                                                                        monkeypatch, capsys):
    import model

    real_to_json = model.AdapterConfig.to_json

    def killed_before_the_best_config_at_6(self, path):
        if self.training.get("checkpoint") == "best" and self.training.get("step") == 6:
            raise RuntimeError("power cut")  # the step-6 weights are in place, the config is step 4's
        real_to_json(self, path)

    monkeypatch.setattr(model.AdapterConfig, "to_json", killed_before_the_best_config_at_6)
    run = crash_after_a_best_at_step_6(tiny, tmp_path, monkeypatch, [0.5, 0.4],  # steps 8 and 12 after resuming
                                       scores_before_the_crash=[0.2, 0.3, 0.9])  # the crash: inside the save at 6
    assert json.loads((run / "adapter_config.json").read_text())["training"]["step"] == 4
    kept = adapter_weights(run / "adapter.safetensors")  # step 6's
    monkeypatch.setattr(model.AdapterConfig, "to_json", real_to_json)
    capsys.readouterr()
    resume_killed(tmp_path, "--eval-every", "4")
    top = adapter_weights(run / "adapter.safetensors")
    assert all(torch.equal(top[key], kept[key]) for key in kept)
    training = json.loads((run / "adapter_config.json").read_text())["training"]
    assert training["step"] == 6 and training["best"] == {"by": "val_cider_d", "val_cider_d": 0.9, "step": 6}
    evals = [(r["step"], r["best"]) for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "eval"]
    assert evals == [(2, True), (4, True), (8, False), (12, False)]
    assert "was rewritten from the copy inside adapter.safetensors" in capsys.readouterr().out
    # A config edited by hand (the LM moved) describes the same step as the weights: left as it is.
    edited = {**json.loads((run / "adapter_config.json").read_text()), "lm_model": str(tmp_path / "moved-lm")}
    (run / "adapter_config.json").write_text(json.dumps(edited))
    assert not model.repair_torn_export(run)
    assert json.loads((run / "adapter_config.json").read_text()) == edited


def test_without_validation_images_the_best_adapter_is_the_last(tiny, tmp_path, capsys):
    import shutil

    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    rows = (data / "captions.jsonl").read_text().splitlines()
    (data / "captions.jsonl").write_text("\n".join(r for r in rows if json.loads(r)["split"] != "val") + "\n")
    args = train_args(tiny, tmp_path, "noval", "--final-eval", "false", "--max-steps", "6", "--eval-every", "2")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "no validation images" in printed
    # No score to name, and no test evaluation: the line names the folder and the command that scores it.
    assert printed.rstrip().splitlines()[-1] == (
        f"training finished: the best adapter (step 6) is in {tmp_path / 'noval'}, the last in "
        f"{tmp_path / 'noval' / 'last'}; score it on the test split: python eval.py {tmp_path / 'noval'}")
    best = adapter_weights(tmp_path / "noval" / "adapter.safetensors")
    last = adapter_weights(tmp_path / "noval" / "last" / "adapter.safetensors")
    assert all(torch.equal(best[key], last[key]) for key in last)
    training = json.loads((tmp_path / "noval" / "adapter_config.json").read_text())["training"]
    assert training["best"] == {"by": "val_rougeL", "val_rougeL": None, "step": 6}  # no score, not a made-up -1


def test_existing_run_is_never_overwritten(tiny, tmp_path, capsys):
    train.main(train_args(tiny, tmp_path, "once", "--final-eval", "false", "--max-steps", "2"))
    assert run_cli(train.main, train_args(tiny, tmp_path, "once")) == 2
    assert "--resume" in capsys.readouterr().err
    # Nor a folder where a run stopped before its first save (its log would be cut), nor anyone's files.
    stopped, other = tmp_path / "stopped", tmp_path / "other"
    stopped.mkdir()
    (stopped / "run_config.json").write_text("{}")
    (stopped / "train_log.jsonl").write_text('{"type": "nonfinite", "step": 3}\n')
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for folder, held in ((stopped, "a run that stopped before its first save"), (other, "files that are not a run")):
        assert run_cli(train.main, train_args(tiny, tmp_path, folder.name)) == 2
        error = capsys.readouterr().err.strip()
        assert f"{folder} holds {held}" in error and "\n" not in error, error
    assert (stopped / "train_log.jsonl").read_text() == '{"type": "nonfinite", "step": 3}\n'
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_run_being_trained_cannot_be_resumed_or_started_again_meanwhile(tiny, tmp_path, capsys):
    # Say `train.py --resume` in a second terminal while the run still trains in the first: both
    # would write one folder (the log cut, checkpoints interleaved). The first holds the folder's lock.
    train.main(train_args(tiny, tmp_path, "busy", "--final-eval", "false", "--max-steps", "5"))
    run = tmp_path / "busy"
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != train.RUN_LOCK}
    # And a new run named like one that has just started (and has written nothing yet).
    held = [train.lock_run_folder(run), train.lock_run_folder(tmp_path / "starting")]  # as those processes hold them
    try:
        for name, extra, advice in (("busy", ["--resume", "--max-steps", "10"], "then --resume"),
                                    ("starting", [], "choose another --run-name")):
            assert run_cli(train.main, train_args(tiny, tmp_path, name, *extra)) == 2
            error = capsys.readouterr().err.strip()
            assert f"{tmp_path / name} is being trained by another process (pid {os.getpid()} on " in error, error
            assert "\n" not in error and advice in error
    finally:
        for handle in held:
            handle.close()
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != train.RUN_LOCK} == before


def test_a_new_run_named_like_one_training_now_names_its_process(tiny, tmp_path, capsys):
    # A run trains for a while before its first save, its config and log already written: a new run given
    # its name must not call it stopped and advise deleting its folder. Nor, after a save, advise --resume.
    train.main(train_args(tiny, tmp_path, "saved", "--final-eval", "false", "--max-steps", "2"))
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "run_config.json").write_text("{}")
    (unsaved / "train_log.jsonl").write_text("")
    held = [train.lock_run_folder(tmp_path / name) for name in ("saved", "unsaved")]  # as their processes hold them
    try:
        for name in ("saved", "unsaved"):
            assert run_cli(train.main, train_args(tiny, tmp_path, name)) == 2
            error = capsys.readouterr().err.strip()
            assert f"{tmp_path / name} is being trained by another process (pid {os.getpid()} on " in error, error
            assert "\n" not in error and "choose another --run-name" in error
    finally:
        for handle in held:
            handle.close()
    # Once that process has ended, the refusal says what the folder holds, as before.
    assert run_cli(train.main, train_args(tiny, tmp_path, "unsaved")) == 2
    assert "holds a run that stopped before its first save" in capsys.readouterr().err


def test_a_picked_run_name_another_start_took_meanwhile_moves_on(tiny, tmp_path, monkeypatch):
    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: tiny)
    config = train.resolve_config(train.parse_config(["--demo", "--output-dir", str(tmp_path)]))
    assert config.run_name == "demo"
    other = train.lock_run_folder(tmp_path / "demo")  # `make demo` in another terminal, a moment earlier
    mine = train.claim_run_folder(config)
    assert config.run_name == "demo-2" and (tmp_path / "demo-2" / train.RUN_LOCK).is_file()
    # The folder's lock file is the holder's: one deleted as another start opened it is not taken for it.
    stale = open(tmp_path / "demo-2" / train.RUN_LOCK)
    assert train.lock_file_is_current(stale, tmp_path / "demo-2" / train.RUN_LOCK)
    # A start that ends before writing anything leaves no folder behind (the next demo may take the name).
    train.release_run_folder(mine, tmp_path / "demo-2")
    train.release_run_folder(other, tmp_path / "demo")
    assert list(tmp_path.iterdir()) == [] and not train.lock_file_is_current(stale, tmp_path / "demo-2" / train.RUN_LOCK)
    stale.close()


def test_an_adapter_too_large_to_allocate_is_one_line_naming_the_flags(tiny, tmp_path, capsys):
    assert run_cli(train.main, train_args(tiny, tmp_path, "huge", "--prefix-length", "100000")) == 2
    error = capsys.readouterr().err.strip()
    assert "the adapter would have" in error and "lower --prefix-length or --adapter-hidden-dim" in error, error
    assert "\n" not in error


def test_clear_errors(tiny, tmp_path, capsys):
    assert run_cli(inference.main, ["--checkpoint", str(tmp_path / "nope"), "x.png"]) == 2
    assert run_cli(eval_script.main, [str(tmp_path)]) == 2
    assert run_cli(train.main, train_args(tiny, tmp_path, "bad", "--lm-model", str(tmp_path / "missing"))) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "nope" in errors[0] and "missing" in errors[2]
    assert not (tmp_path / "bad").exists()  # a start that failed leaves no folder (nor its lock file)


def test_resume_without_a_run_name_lists_the_runs_it_could_continue(tmp_path, capsys):
    for age, name in enumerate(["demo-2", "demo", "quick"]):  # newest first
        state = tmp_path / name / "resume" / "trainer_state.json"
        state.parent.mkdir(parents=True)
        state.write_text("{}")
        os.utime(state, (1_000_000 - age, 1_000_000 - age))
    (tmp_path / "notes").mkdir()  # not a run
    assert run_cli(train.main, ["--demo", "--resume", "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: --resume needs --run-name of the run to continue; in {tmp_path}, newest first: " \
                    "demo-2, demo, quick", error


@pytest.mark.parametrize("script", [train, eval_script, inference])
def test_help_reads_well(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out
    assert f"    python {Path(script.__file__).name} " in out  # its docstring's examples (train.py showed none)


@pytest.mark.parametrize("name", ["train", "eval", "inference", "app", "bench", "demo data", "demo backbones"])
def test_every_scripts_help_shows_each_default_once(name):
    """A flag's default in --help (inference.py's --batch-size 32 was only in the README), once, and
    none for a switch or a flag with no default ("(default: None)")."""
    import importlib

    module, _, command = name.partition(" ")
    parser = importlib.import_module(module).build_parser()
    if command:
        parser = next(action for action in parser._actions if action.choices and command in action.choices)
        parser = parser.choices[command]
    text = " ".join(parser.format_help().split())
    shown = 0
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
        help_text = parser._get_formatter()._expand_help(action)
        # A flag with no default value may say in words what happens without it (its own "(default: ...)").
        expected = {0} if switch else {0, 1} if action.default in (None, "") else {1}
        assert help_text.count("(default") in expected, (action.option_strings, help_text)
        shown += "(default" in help_text
    assert shown and text.count("(default") >= shown  # (a long default may be broken across lines)


@pytest.mark.parametrize("command", ["data", "backbones"])
def test_demo_sub_commands_help_says_what_they_write_with_an_example(command, capsys):
    import demo
    from dataset import DEFAULT_SEED

    with pytest.raises(SystemExit):
        demo.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"python demo.py {command} --out" in out or f"python demo.py {command} --captions" in out
    if command == "backbones":
        # Its --seed (default 0) is not the seed the pre-training captions are dealt by (the README's 42).
        assert f"train.py deals the folder with its default --seed {DEFAULT_SEED} (default: 0)" in out
        assert "--clip-model tiny/clip --lm-model tiny/lm" in out


def test_train_help_names_flags_as_the_readme_does_and_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare single-spaced
    assert "[--run-name RUN_NAME]" in out and "[--run_name" not in out  # the usage line
    assert "--eval-every EVAL_EVERY, --eval_every EVAL_EVERY" in out
    assert "demo-2, ...)" in out and "demo-2, ...) (default:" not in out  # the help text gives it already
    assert "--no-final-eval, --no_final_eval turn off --final-eval --" in out  # not --final-eval's help again
    for action in train.build_parser()._actions:
        assert action.help and (action.help.count("(default") <= 1), action.dest


SCRIPTS = ("train", "eval", "inference", "app", "bench", "demo")
# Flags the README gives to other programs: launchers, trackers' viewers, pytest.
OTHER_PROGRAMS_FLAGS = {"--cpu", "--multi_gpu", "--num_processes", "--num_machines", "--machine_rank",
                        "--main_process_ip", "--main_process_port", "--nproc_per_node", "--nnodes", "--node_rank",
                        "--master_addr", "--master_port", "--logdir", "--backend-store-uri", "--durations", "--quiet"}


def script_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option string of a parser and its sub-commands' parsers (demo.py data|backbones)."""
    actions = {}
    for action in parser._actions:
        actions.update(dict.fromkeys(action.option_strings, action))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions.update(script_actions(sub))
    return actions


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, the words after `script.py`) for each command the README shows, in its bash blocks and inline."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]*\b(?:%s)\.py\b[^`\n]*)`" % "|".join(SCRIPTS), text)
    commands = []
    for line in lines:
        line = line.split(" #")[0]  # a comment after the command
        for match in re.finditer(r"\b(%s)\.py\b([^|;&>]*)" % "|".join(SCRIPTS), line):
            commands.append((match.group(1), match.group(2).split()))
    return commands


def test_every_flag_the_readme_gives_a_script_is_one_it_takes():
    """The README's commands, and every --flag its prose names, against the scripts' own parsers: a renamed
    or dropped flag, or a choice a flag no longer has, fails here rather than on a user's first command."""
    import importlib
    import re

    actions = {name: script_actions(importlib.import_module(name).build_parser()) for name in SCRIPTS}
    commands = readme_commands()
    assert len(commands) > 40 and {script for script, _ in commands} == set(SCRIPTS)
    for script, words in commands:
        for word, following in zip(words, [*words[1:], ""]):
            flag = word.split("=")[0]
            if not flag.startswith("--"):
                continue
            assert flag in actions[script], f"README: {script}.py {' '.join(words)}: {script}.py has no {flag}"
            choices = actions[script][flag].choices
            if choices and following and not following.startswith("-") and not following.isupper():  # not RUN, N
                assert following in choices, f"README: {script}.py {flag} {following}: not one of {list(choices)}"
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    every_flag = set().union(*actions.values()) | OTHER_PROGRAMS_FLAGS
    assert sorted(set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text)) - every_flag) == []


def test_every_readme_table_row_is_one_line():
    """A Markdown table row ends at its line's end: a long row wrapped onto a second line renders that line as a
    row of its own, its text in the first column (the Other data table's folder row did)."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    for number, (line, after) in enumerate(zip(lines, [*lines[1:], ""]), start=1):
        if line.startswith("|"):
            assert line.rstrip().endswith("|"), f"README.md:{number}: a table row that does not end with |"
            assert after.startswith("|") or not after.strip(), f"README.md:{number + 1}: a table row's text wraps"


@pytest.mark.slow
def test_demo_reaches_the_learning_bar(tmp_path):
    """python train.py --demo: builds the demo assets, trains, and scores the held-out test images."""
    assert train.main(["--demo", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 150
    assert metrics["rougeL"] >= 0.85, metrics
    # Not a tie with retrieval: the adapter's captions beat the nearest-neighbour baseline's.
    assert metrics["beats_baseline"] and metrics["coco_cider_d"] > 1.03 * metrics["baseline"]["coco_cider_d"], metrics


def test_demo_reruns_pick_a_fresh_run_folder(tiny, tmp_path, monkeypatch):
    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: tiny)
    first = train.resolve_config(train.parse_config(["--demo", "--output-dir", str(tmp_path)]))
    assert first.run_name == "demo" and first.lm_model == tiny["lm_model"]
    (tmp_path / "demo").mkdir()
    second = train.resolve_config(train.parse_config(["--demo", "--output-dir", str(tmp_path)]))
    assert second.run_name == "demo-2"
    # The demo's learning rate suits its adapter, unless the command line names one.
    assert second.learning_rate == 1e-2
    demo_with = ["--demo", "--output-dir", str(tmp_path), "--adapter-kind", "transformer"]
    assert train.resolve_config(train.parse_config(demo_with)).learning_rate == 1e-3
    assert train.resolve_config(train.parse_config([*demo_with, "--learning-rate", "5e-3"])).learning_rate == 5e-3


def test_flags_come_from_the_command_line_not_a_train_args_file_beside_the_script(tmp_path, monkeypatch):
    """HfArgumentParser reads, unasked, SCRIPT.args beside the script it runs as: its --resume made every
    `python train.py --demo` a resume, its --batch-size changed runs that no command line or printed line named."""
    monkeypatch.setattr("sys.argv", [str(tmp_path / "train.py"), "--demo"])
    (tmp_path / "train.args").write_text("--resume --batch-size 7\n")
    for argv in (None, ["--demo"]):
        config = train.parse_config(argv)
        assert not config.resume and config.batch_size == train.DEMO_DEFAULTS["batch_size"]
        assert config.given_flags == {"demo"}


def test_a_relative_feature_cache_dir_is_saved_absolute(tmp_path, monkeypatch):
    """eval.py reads the run's cache from run_config.json, maybe from another folder: a relative path
    would there name a new, empty cache, and every image would be encoded again."""
    monkeypatch.chdir(tmp_path)
    config = train.check_config(train.parse_config(["--feature-cache-dir", "cache", "--run-name", "x"]))
    assert config.feature_cache_dir == str(tmp_path / "cache")


def test_no_feature_cache_reaches_extraction_and_every_image_is_encoded(tiny, tmp_path, monkeypatch):
    """--no-feature-cache: CLIP encodes every image, even ones the cache holds, and the cache gets no file."""
    from model import AdapterConfig, build_captioner

    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    records = load_records("folder", "train", tiny["data_dir"])[:3]
    extract_features(captioner, records, progress=False, cache_dir=tmp_path / "cache")
    before = sorted((tmp_path / "cache").rglob("*"))
    config = train.parse_config(["--run-name", "x", "--no-feature-cache", "--feature-cache-dir",
                                 str(tmp_path / "cache"), "--num-workers", "0", "--no-progress"])
    encoded, real = [], captioner.clip_embeddings
    monkeypatch.setattr(captioner, "clip_embeddings", lambda pixels: encoded.append(len(pixels)) or real(pixels))
    kept, pairs = train.make_pairs(captioner, records, config, "CLIP features (train)", [])
    assert sum(encoded) == 3 and kept == records and sorted((tmp_path / "cache").rglob("*")) == before


def spy_optimizer_steps(monkeypatch) -> list[dict]:
    """The adapter's gradient and learning rate as each optimizer step receives them."""
    steps, real = [], train.optimizer_step

    def spy(accelerator, adapter, optimizer, *rest):
        steps.append({"grad": torch.cat([p.grad.flatten() for p in adapter.parameters()]).clone(),
                      "lr": optimizer.param_groups[0]["lr"]})
        return real(accelerator, adapter, optimizer, *rest)

    monkeypatch.setattr(train, "optimizer_step", spy)
    return steps


def test_gradient_accumulation_steps_with_the_loss_and_gradient_of_the_whole_batch(tiny, tmp_path, monkeypatch):
    # Captions differ in length, so the mean of two micro-batch means is not the mean over their tokens.
    steps = spy_optimizer_steps(monkeypatch)
    logged = {}
    for name, batch, accumulation in (("whole", "16", "1"), ("accumulated", "8", "2")):
        train.main(train_args(tiny, tmp_path, name, "--batch-size", batch, "--grad-accum-steps", accumulation,
                              "--max-steps", "1", "--log-every", "1", "--max-grad-norm", "0", "--eval-every", "0",
                              "--final-eval", "false"))
        [logged[name]] = [r for r in read_jsonl(tmp_path / name / "train_log.jsonl") if r["type"] == "train"]
    whole, accumulated = (step["grad"] for step in steps)
    assert (accumulated - whole).norm() / whole.norm() < 1e-5
    assert logged["accumulated"]["loss"] == pytest.approx(logged["whole"]["loss"], rel=1e-6)


def test_each_epoch_trains_on_a_new_order_and_its_steps_log_it(tiny, tmp_path, monkeypatch):
    """40 images of 5 captions in batches of 16: 13 steps an epoch. Epoch 1 is another shuffle than epoch 0 (the
    same order each epoch would repeat the same batches), and its steps log epoch 1."""
    batches, real = [], TrainingLoss.__call__

    def kept(self, **batch):
        batches.append(batch["input_ids"])
        return real(self, **batch)

    monkeypatch.setattr(TrainingLoss, "__call__", kept)
    assert train.main(train_args(tiny, tmp_path, "epochs", "--max-steps", "14", "--eval-every", "0",
                                 "--final-eval", "false")) == 0
    assert len(batches) == 14 and not torch.equal(batches[0], batches[13])
    log = read_jsonl(tmp_path / "epochs" / "train_log.jsonl")
    epochs = {r["step"]: r["epoch"] for r in log if r["type"] == "train"}
    assert (epochs[12], epochs[14]) == (0, 1)


def test_the_logged_learning_rate_is_the_one_its_step_used(tiny, tmp_path, monkeypatch):
    steps = spy_optimizer_steps(monkeypatch)
    train.main(train_args(tiny, tmp_path, "lr", "--max-steps", "6", "--warmup-ratio", "0.5", "--log-every", "1",
                          "--eval-every", "0", "--final-eval", "false"))
    logged = [r["lr"] for r in read_jsonl(tmp_path / "lr" / "train_log.jsonl") if r["type"] == "train"]
    assert logged == [step["lr"] for step in steps]
    assert logged[0] == 0.0 and logged[3] == pytest.approx(3e-3)  # warm-up from 0 over 3 steps, then the peak


def test_the_last_step_is_logged_where_log_every_does_not_divide_the_run(tiny, tmp_path):
    """The loss of the steps after the last multiple of --log-every is the run's final training loss: a run of
    3 steps logged every 2 logs steps 2 and 3, not 2 alone."""
    assert train.main(train_args(tiny, tmp_path, "odd", "--max-steps", "3", "--eval-every", "0",
                                 "--final-eval", "false")) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "odd" / "train_log.jsonl") if r["type"] == "train"] == [2, 3]


def test_captions_are_decoded_as_long_as_training_cut_them_by_validation_test_eval_and_inference(tiny, tmp_path,
                                                                                                monkeypatch):
    """A run trained on captions of up to N tokens (--max-caption-tokens, EOS included) is validated on greedy
    captions of up to N new tokens. Its final test evaluation, eval.py, inference.py and caption_images decoded at
    most 30 whatever N: captions of 31 to 40 tokens, whole in validation, were cut in the test scores."""
    import model

    budgets = []
    real_greedy = model.Captioner.greedy_tokens
    monkeypatch.setattr(model.Captioner, "greedy_tokens", lambda self, prefix, max_new_tokens, *rest: (
        budgets.append(max_new_tokens), real_greedy(self, prefix, max_new_tokens, *rest))[1])
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # no Java: no METEOR to wait for
    assert train.main(train_args(tiny, tmp_path, "long", "--max-caption-tokens", "12", "--max-steps", "2",
                                 "--eval-every", "2", "--val-limit", "2", "--test-limit", "2")) == 0
    run = tmp_path / "long"
    assert budgets == [12, 12]  # the validation at step 2, then the final test evaluation
    assert eval_script.main([str(run), "--limit", "2", "--no-progress", "--num-workers", "0"]) == 0
    assert json.loads((run / "metrics.json").read_text())["decoding"]["max_new_tokens"] == 12
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    assert inference.main(["--checkpoint", str(run), image]) == 0
    load_captioner(run).caption_images([load_records("folder", "test", tiny["data_dir"])[0].open()])
    assert budgets[2:] == [12, 12, 12]
    assert eval_script.main([str(run), "--limit", "2", "--max-new-tokens", "5", "--decoding-sweep", "--no-progress",
                             "--num-workers", "0"]) == 0  # the flag still decides, for the sweep too
    assert budgets[5:] == [5] and json.loads((run / "metrics.json").read_text())["decoding"]["max_new_tokens"] == 5
    sweep = json.loads((run / "decoding_sweep.json").read_text())
    assert {row["settings"]["max_new_tokens"] for row in sweep["rows"] if "max_new_tokens" in row["settings"]} == {5}


def test_samples_per_second_leaves_out_the_time_spent_validating_and_saving(tiny, tmp_path, monkeypatch):
    clock = {"offset": 0.0}
    real_clock, real_validate = train.time.perf_counter, train.Run.validate

    def slow_validate(run):  # as if each validation took 1,000 s
        real_validate(run)
        clock["offset"] += 1000.0

    monkeypatch.setattr(train.time, "perf_counter", lambda: real_clock() + clock["offset"])
    monkeypatch.setattr(train.Run, "validate", slow_validate)
    train.main(train_args(tiny, tmp_path, "speed", "--max-steps", "6", "--log-every", "2", "--eval-every", "3",
                          "--final-eval", "false"))
    logged = [r for r in read_jsonl(tmp_path / "speed" / "train_log.jsonl") if r["type"] == "train"]
    assert clock["offset"] == 2000.0 and [r["step"] for r in logged] == [2, 4, 6]
    # 32 pairs in a few seconds, not in 1,000: windows 3-4 and 5-6 hold a validation each.
    assert all(r["samples_per_s"] > 1 for r in logged), [r["samples_per_s"] for r in logged]


def test_a_step_of_one_micro_batch_is_back_propagated_unscaled(tiny, tmp_path, monkeypatch):
    """One process, no accumulation: the batch's mean already is the step's mean over tokens, so it is
    back-propagated as the loss function returned it (rescaling would only add rounding, and move every
    figure measured before); a shared step rescales."""
    from accelerate import Accelerator

    backward_losses, rescaled = [], []
    real_backward, real_average = Accelerator.backward, train.average_over_tokens
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (
        backward_losses.append(loss.detach().clone()), real_backward(self, loss, **kw))[1])
    monkeypatch.setattr(train, "average_over_tokens", lambda *args: (rescaled.append(1), real_average(*args))[1])
    computed = []
    real_forward = train.TrainingLoss.__call__
    monkeypatch.setattr(train.TrainingLoss, "__call__", lambda self, **batch: (
        computed.append(real_forward(self, **batch)), computed[-1])[1])
    assert train.main(train_args(tiny, tmp_path, "one", "--max-steps", "2", "--eval-every", "0",
                                 "--final-eval", "false")) == 0
    assert len(backward_losses) == len(computed) == 2 and not rescaled
    assert all(torch.equal(sent, made.detach()) for sent, made in zip(backward_losses, computed))
    assert train.main(train_args(tiny, tmp_path, "shared", "--max-steps", "1", "--grad-accum-steps", "2",
                                 "--batch-size", "8", "--eval-every", "0", "--final-eval", "false")) == 0
    assert rescaled == [1]


class DistributedStandIn(torch.nn.Module):
    """DDP's place around the adapter: running it would be a collective (a buffer broadcast), which a process
    with no validation batch would skip, leaving the others waiting in it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        raise AssertionError("validation ran the adapter through DDP's wrapper")


def fake_accelerator(rank: int, count: int):
    """Process `rank` of `count` as validate sees an Accelerator, without a launch or a process group."""
    from types import SimpleNamespace

    return SimpleNamespace(process_index=rank, num_processes=count, device=torch.device("cpu"),
                           autocast=contextlib.nullcontext, unwrap_model=lambda wrapped: wrapped.module)


def test_validation_shared_by_processes_gives_the_record_of_one(tiny):
    """Under N processes each validates its shard of whole --eval-batch-size batches (train.validation_share)
    and the gather joins the shares in rank order (train.validation_record): exactly the record one process
    computes, the loss summed in the same order, with shares of different sizes and empty ones, each image
    captioned once. 6 images in batches of 4 (2 batches), 30 pairs (8 batches)."""
    from model import build_captioner
    from utils import Processes

    config = train.parse_config(train_args(tiny, "unused", "shares", "--val-limit", "0", "--eval-batch-size", "4"))
    torch.manual_seed(0)
    captioner = build_captioner(train.adapter_config_for(config))
    records, pairs = train.make_pairs(captioner, train.load_split(config, "val", 0, []), config, "val", [],
                                      progress=False)
    assert (len(records), len(pairs)) == (6, 30)
    captioner.adapter = DistributedStandIn(captioner.adapter)
    one = train.validate(captioner, pairs, records, config, fake_accelerator(0, 1))
    assert one["val_loss"] > 0 and one["example"]
    for count, images, loss_batches in ((2, [4, 2], [4, 4]), (3, [0, 4, 2], [2, 3, 3]), (4, [0, 4, 0, 2], [2] * 4)):
        accelerators = [fake_accelerator(rank, count) for rank in range(count)]
        shares = [train.validation_share(captioner, pairs, config, accelerator, Processes.of(accelerator))
                  for accelerator in accelerators]
        assert [len(share["captions"]) for share in shares] == images  # each process captions only its share
        assert [len(share["batch_losses"]) for share in shares] == loss_batches
        assert train.validation_record(shares, records) == one, count
        with pytest.raises(RuntimeError, match="captioned 8 validation images of 6"):  # a share counted twice
            train.validation_record(shares + shares[-1:], records)
    assert isinstance(captioner.adapter, DistributedStandIn)  # put back for training


def test_auto_precision_is_fp32_when_a_gpu_machine_trains_on_its_cpu(monkeypatch):
    # `accelerate launch --cpu` on a GPU machine sets ACCELERATE_USE_CPU: the run trains on the CPU.
    monkeypatch.setattr(train, "gpu_computes_in_bf16", lambda: True)
    assert train.auto_mixed_precision() == "bf16"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert train.auto_mixed_precision() == "no"


def test_batches_are_pinned_only_for_a_run_on_a_gpu(tiny, tmp_path, monkeypatch):
    # Pinned by whether the machine had a GPU: a GPU machine's run on its CPU (accelerate launch --cpu)
    # pinned every batch for a host-to-GPU copy that never came.
    import torch.utils.data

    pinned, real_init = [], torch.utils.data.DataLoader.__init__

    def recording_init(self, *args, **kwargs):
        pinned.append(kwargs.get("pin_memory", False))
        real_init(self, *args, **{**kwargs, "pin_memory": False})  # this machine has no GPU to pin for

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", recording_init)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine...
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # ...training on its CPU
    assert train.main(train_args(tiny, tmp_path, "run", "--max-steps", "2", "--final-eval", "false")) == 0
    assert pinned and not any(pinned), pinned


def test_resuming_a_finished_run_says_what_is_left_to_do(tiny, tmp_path, capsys):
    # It said "resuming at step 4", printed the banner and ended, with no word that the run had finished.
    args = train_args(tiny, tmp_path, "run", "--max-steps", "4", "--final-eval", "false")
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 0
    assert "it had finished training at step 4: nothing is left to do" in capsys.readouterr().out
    validated = [r["step"] for r in read_jsonl(tmp_path / "run" / "train_log.jsonl") if r["type"] == "eval"]
    assert validated == [4]  # its last step's validation is not run (and logged) again
    assert train.main([*args, "--resume", "--max-steps", "6"]) == 0
    assert "it had finished" not in capsys.readouterr().out


def test_the_final_evaluation_says_when_test_images_are_copies_of_training_ones(tiny, tmp_path, capsys):
    """eval.py notes a held-out image with a training image's very CLIP feature; the run's own final test
    evaluation (what `make demo` prints) scored the same copies without a word."""
    data = shutil.copytree(tiny["data_dir"], tmp_path / "copied")
    shutil.copyfile(data / "images" / "train_0007.png", data / "images" / "test_0002.png")
    args = train_args(tiny, tmp_path, "copies", "--max-steps", "2")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    note = ("1 of the 6 images has the very CLIP feature of a training image: copies of it, or pictures CLIP "
            "cannot tell from it (images/test_0002.png = images/train_0007.png)")
    assert [n for n in json.loads((tmp_path / "copies" / "metrics.json").read_text())["notes"] if n.startswith(note)]
    assert f"note: {note}" in capsys.readouterr().out


def test_the_final_evaluation_says_when_test_images_are_training_files_under_other_names(tiny, tmp_path, capsys):
    """eval.py notes a test image that is a training file under another name (here a hard link), whose baseline is
    an upper bound; the run's own final test evaluation, in its table and metrics.json, did not."""
    data = shutil.copytree(tiny["data_dir"], tmp_path / "linked_data")
    (data / "images" / "test_0002.png").unlink()
    os.link(data / "images" / "train_0007.png", data / "images" / "test_0002.png")
    args = train_args(tiny, tmp_path, "linked", "--max-steps", "2")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    note = "1 of the 6 images is among the run's training images: there the baseline retrieves each image's own"
    assert [n for n in json.loads((tmp_path / "linked" / "metrics.json").read_text())["notes"] if n.startswith(note)]
    assert f"note: {note}" in capsys.readouterr().out


def test_the_final_evaluation_records_the_test_images_it_skipped(tiny, tmp_path, capsys):
    """Under --on-bad-sample skip (the default) the final evaluation leaves out test images it cannot read and said
    so only as it went: metrics.json, the report and the table gave figures of 4 images as the test split's."""
    data = shutil.copytree(tiny["data_dir"], tmp_path / "damaged")
    (data / "images" / "test_0003.png").write_bytes(b"not an image")
    args = train_args(tiny, tmp_path, "skipped", "--max-steps", "2", "--num-workers", "0")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    note = ("1 of the 6 test images could not be read (missing or unreadable) and was left out (--on-bad-sample "
            "skip): images/test_0003.png; the scores cover the other 5")
    metrics = json.loads((tmp_path / "skipped" / "metrics.json").read_text())
    assert metrics["num_images"] == 5 and [n for n in metrics["notes"] if n.startswith(note)], metrics["notes"]
    assert note in (tmp_path / "skipped" / "report.html").read_text()
    assert f"note: {note}" in capsys.readouterr().out


def test_a_revision_given_with_the_demo_names_its_backbone_folder(tiny, tmp_path, capsys, monkeypatch):
    """The demo's backbones are local folders, filled in after the flags are read: the note named "" (the current
    folder) as the one read as it is."""
    import demo

    monkeypatch.setattr(demo, "ensure_demo_assets", lambda progress=True: tiny)
    train.resolve_config(train.parse_config(["--demo", "--output-dir", str(tmp_path), "--lm-revision", "v1"]))
    err = capsys.readouterr().err.strip()
    assert err == (f"note: --lm-revision v1 changes nothing: {tiny['lm_model']} is a local folder, read as it is; a "
                   "revision picks a commit of a Hub model"), err
