"""Training under faults: NaN steps, crashes mid-save, unreadable images, several processes."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import said_by_the_processes, train_args
from dataset import CaptionPairs
from model import TrainingLoss
from utils import UserError, read_json, read_jsonl, run_cli, write_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def poison_calls(monkeypatch, bad_calls: set[int]) -> None:
    """Make the training loss NaN on the given (1-based) calls."""
    real, count = TrainingLoss.__call__, {"n": 0}

    def poisoned(self, **batch):
        count["n"] += 1
        loss = real(self, **batch)
        return loss * float("nan") if count["n"] in bad_calls else loss

    monkeypatch.setattr(TrainingLoss, "__call__", poisoned)


def refuse_bare_constant(name: str):
    raise AssertionError(f"{name} is not JSON: strict readers refuse the file")


def test_resume_on_a_machine_with_fewer_gpus_sets_the_generators_it_has(monkeypatch):
    # A state saved by a process that saw 4 GPUs, resumed where 1 is: set_rng_state_all set all 4, and CUDA's
    # first use failed on the missing ones in a traceback. The process's own device is among those present.
    import torch.cuda.random as cuda_random

    from utils import rng_states, set_rng_states

    states, restored = rng_states(), []
    states["cuda"] = [torch.full((8,), index, dtype=torch.uint8) for index in range(4)]
    record = lambda state, device="cuda": restored.append((device, int(state[0])))  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", record)
    monkeypatch.setattr(cuda_random, "set_rng_state", record)  # what set_rng_state_all calls
    set_rng_states(states)
    assert restored == [(0, 0)]


def test_json_writers_spell_out_nonfinite_numbers(tmp_path):
    from utils import append_jsonl, write_json, write_jsonl

    record = {"loss": float("nan"), "norms": [float("inf"), -float("inf"), 1.5], "nested": {"x": (float("nan"),)}}
    append_jsonl(tmp_path / "a.jsonl", record)
    write_jsonl(tmp_path / "b.jsonl", [record])
    write_json(tmp_path / "c.json", record)
    for name in ("a.jsonl", "b.jsonl", "c.json"):
        read = json.loads((tmp_path / name).read_text(), parse_constant=refuse_bare_constant)
        assert read == {"loss": "NaN", "norms": ["Infinity", "-Infinity", 1.5], "nested": {"x": ["NaN"]}}


def test_a_json_file_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """write_text's promise (replace_durably): after a power cut the name holds the whole new file or the old one,
    and once it returns, the new one (the folder's entry synced too)."""
    from utils import write_json

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda source, target: events.append(("rename", str(source), str(target)))
                        or real_replace(source, target))
    write_json(tmp_path / "metrics.json", {"x": 1})
    tmp, path = str(tmp_path / "metrics.json.tmp"), str(tmp_path / "metrics.json")
    assert events == [("sync", tmp), ("rename", tmp, path), ("sync", str(tmp_path))], events


def test_a_whole_line_that_is_not_json_is_an_error_even_last(tmp_path):
    """Only a last line without its newline is a torn append (left out); a bad line that ends in one is not."""
    from utils import read_jsonl

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_jsonl(log) == [{"step": 1}]
    log.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match="train_log.jsonl line 2 is not JSON"):
        read_jsonl(log)


def test_metadata_that_is_only_consulted_is_none_where_it_cannot_be_read(tmp_path):
    """json_value never stops a script: a missing, damaged or absurdly large file (a run folder from elsewhere)
    reads as no value, and whatever loads the file says what is wrong with it."""
    from utils import MAX_JSON_BYTES, json_value

    path = tmp_path / "adapter_config.json"
    assert json_value(path, "lm_model") is None
    path.write_text('{"lm_model": "x"')
    assert json_value(path, "lm_model") is None
    path.write_text('{"lm_model": "x"}')
    assert json_value(path, "lm_model") == "x" and json_value(path, "lm_model", "y") is None
    with open(path, "r+b") as handle:  # sparse: no disk space spent
        handle.truncate(MAX_JSON_BYTES + 1)
    assert json_value(path, "lm_model") is None


def test_run_cli_gives_back_the_sigterm_handler_it_found(capsys):
    """A script's main called through run_cli from Python (a test, a notebook, app.py's caller): after it, SIGTERM
    does what it did before, not raise Terminated in whatever code runs next."""
    from utils import run_cli

    def refuse(argv):
        raise UserError("no")

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert run_cli(lambda argv: 0, []) == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert run_cli(refuse, []) == 2 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == "error: no\n"


def test_a_user_error_in_a_dataloader_worker_is_its_own_one_line():
    """torch re-raises a worker's exception wrapped in the worker's traceback: the script's line is the
    UserError's own message, not the traceback's first line nor "utils.UserError: ..." ."""
    from torch.utils.data import DataLoader

    from utils import user_message

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise UserError("cannot read image a.png (truncated); delete it or pass --on-bad-sample skip")

    with pytest.raises(UserError) as raised:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "DataLoader worker" in str(raised.value)  # the wrapping this unwraps
    assert user_message(raised.value) == "cannot read image a.png (truncated); delete it or pass --on-bad-sample skip"


def test_files_written_as_the_umask_says_not_as_safetensors_writes_them(tmp_path):
    """A group-shared run folder (umask 002) keeps its weights writable by the group."""
    from utils import with_usual_mode

    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(b"")
    weights.chmod(0o600)
    umask = os.umask(0o002)
    try:
        with_usual_mode(weights)
    finally:
        os.umask(umask)
    assert weights.stat().st_mode & 0o777 == 0o664


def test_nonfinite_step_is_skipped_and_logged_with_its_batch(tiny, tmp_path, monkeypatch):
    poison_calls(monkeypatch, {4})
    made, fetched, real_make_pairs, real_getitem = [], [], train.make_pairs, CaptionPairs.__getitem__
    monkeypatch.setattr(train, "make_pairs", lambda *args, **kwargs: made.append(real_make_pairs(*args, **kwargs))
                        or made[-1])
    monkeypatch.setattr(CaptionPairs, "__getitem__", lambda self, i: fetched.append((self, i)) or real_getitem(self, i))
    # 8 steps: the NaN step 4 and four trained steps after it (enough for NaN weights had it been applied).
    summary = train.train(train.parse_config(train_args(tiny, tmp_path, "nan", "--final-eval", "false",
                                                        "--max-steps", "8")))
    assert summary["nonfinite_steps"] == 1 and not summary["interrupted"]
    log = read_jsonl(tmp_path / "nan" / "train_log.jsonl")
    [bad] = [r for r in log if r["type"] == "nonfinite"]
    assert bad["step"] == 4 and bad["image_ids"] and all(i.startswith("images/train_") for i in bad["image_ids"])
    records, pairs = made[0]  # the training split's; the 4th batch of 16 is the one poisoned
    batch = [i for fetched_from, i in fetched if fetched_from is pairs][48:64]
    assert bad["image_ids"] == sorted({records[pairs.image_index(i)].image_id for i in batch})
    assert bad["losses"] == ["NaN"] and bad["grad_norm"] == "NaN"  # spelled out: a bare NaN is not JSON
    for line in (tmp_path / "nan" / "train_log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse_bare_constant)  # as jq or JavaScript would read it
    # Had the NaN gradient been applied, AdamW would have turned every weight into NaN.
    weights = load_file(tmp_path / "nan" / "last" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if r["type"] == "train")


def test_nonfinite_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    poison_calls(monkeypatch, {7, 8, 9})
    args = train_args(tiny, tmp_path, "diverged", "--max-nonfinite-steps", "3", "--final-eval", "false",
                      "--max-steps", "12")  # the resumed run goes on past the trouble (7-9) and ends
    assert run_cli(train.main, args) == 2
    error = capsys.readouterr().err
    assert "3 non-finite steps in a row" in error
    run = tmp_path / "diverged"
    assert read_json(run / "resume" / "trainer_state.json")["step"] == 5  # the save before the trouble
    monkeypatch.undo()
    # The command the error gives continues the run at a tenth of the rate.
    program, script, *args = shlex.split(error.split("lower learning rate (")[1].split(") or check")[0])
    assert (program, script) == ("python", "train.py") and args[-2:] == ["--learning-rate", "0.0003"], args
    assert train.main([*args, "--no-progress"]) == 0
    assert read_json(run / "run_config.json")["learning_rate"] == 0.0003  # conftest's 3e-3, a tenth
    # And the steps take it: step 6 the cosine's rate after 5 of 12 steps (no warm-up), at the new peak.
    lr_of_step_6 = next(r["lr"] for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "train" and r["step"] == 6)
    assert lr_of_step_6 == pytest.approx(0.0003 * 0.5 * (1 + math.cos(math.pi * 5 / 12)))


@pytest.fixture
def fp16_accelerator():
    """An Accelerator with the loss scaler that mixed_precision="fp16" sets up on a GPU, here with
    torch's CPU GradScaler (on a CPU, Accelerate makes none). Accelerate's state is shared by the
    whole process: it is put back afterwards."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no")
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**16), True
    accelerator.state._mixed_precision = "fp16"
    yield accelerator
    accelerator.state._mixed_precision = "no"


def test_fp16_loss_scaler_overflow_is_skipped_without_counting_and_training_goes_on(fp16_accelerator):
    accelerator = fp16_accelerator
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    layer, optimizer, scheduler = accelerator.prepare(layer, optimizer, scheduler)
    inputs = torch.randn(2, 4)

    def step(loss_factor: float) -> train.StepOutcome:
        loss = layer(inputs).square().mean() * loss_factor
        accelerator.backward(loss)
        return train.optimizer_step(accelerator, layer, optimizer, scheduler, [loss.detach()], 1.0)

    before = layer.weight.detach().clone()
    # A finite loss whose scaled gradient overflows: the scaler's normal search for its scale.
    overflow = step(1e36)
    assert not overflow.applied and not overflow.nonfinite and overflow.loss_scale == 2.0**15
    assert torch.equal(layer.weight, before)
    # The next step must work (the scaler's step was closed) and be applied.
    assert step(1.0).applied and not torch.equal(layer.weight, before)
    # A NaN loss is a bad step, counted, and the step after it still works.
    after = layer.weight.detach().clone()
    nan = step(float("nan"))
    assert not nan.applied and nan.nonfinite and torch.equal(layer.weight, after)
    assert step(1.0).applied


def test_a_step_the_fp16_loss_scaler_skipped_moves_the_schedule_on_like_any_other(fp16_accelerator):
    """Accelerate's scheduler wrapper does not step after a step the scaler skipped: the schedule fell one
    step behind the run's count for each overflow (a longer warm-up, a run ending above its final rate)."""
    accelerator = fp16_accelerator
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    layer, optimizer, scheduler = accelerator.prepare(layer, optimizer, scheduler)
    inputs = torch.randn(2, 4)
    outcomes = []
    for loss_factor in (1e36, 1.0, float("nan"), 1.0):  # an overflow, applied, non-finite, applied
        accelerator.backward(layer(inputs).square().mean() * loss_factor)
        outcomes.append(train.optimizer_step(accelerator, layer, optimizer, scheduler,
                                             [torch.tensor(loss_factor)], 1.0))
    assert [outcome.applied for outcome in outcomes] == [False, True, False, True]
    assert not outcomes[0].nonfinite, "the first step should be the scaler's overflow"
    assert scheduler.scheduler.last_epoch == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)


def test_a_damaged_resume_state_or_log_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    train.main(train_args(tiny, tmp_path, "good", "--final-eval", "false", "--max-steps", "2"))
    damages = {
        "trainer_state.json": lambda run: (run / "resume" / "trainer_state.json").write_text('{"step": 2, "x": 1}'),
        "optimizer.json": lambda run: (run / "resume" / "optimizer.json").write_text("{}"),
        "rng_0.json": lambda run: (run / "resume" / "rng_0.json").unlink(),
        "run_config.json": lambda run: (run / "run_config.json").write_text("[]"),
        "batch_size is '16'": lambda run: (run / "run_config.json").write_text(
            (run / "run_config.json").read_text().replace('"batch_size": 16', '"batch_size": "16"')),
    }
    for name, damage in damages.items():
        run = Path(shutil.copytree(tmp_path / "good", tmp_path / f"bad-{name}"))
        damage(run)
        assert run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", run.name, "--resume",
                                    "--no-progress", "--max-steps", "3"]) == 2, name
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and "\n" not in error and name in error, error

    # A crash while appending to the log leaves a torn last line: resuming drops it and goes on.
    run = Path(shutil.copytree(tmp_path / "good", tmp_path / "torn"))
    with open(run / "train_log.jsonl", "a") as log:
        log.write('{"type": "train", "step": 3, "lo')
    assert train.main(["--output-dir", str(tmp_path), "--run-name", "torn", "--resume", "--no-progress",
                       "--max-steps", "3"]) == 0
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "train"][-1] == 3
    # A bad line elsewhere is not a torn write: an error naming the line.
    (run / "train_log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="train_log.jsonl line 2 is not JSON"):
        read_jsonl(run / "train_log.jsonl")
    # ... which stops a resume before run_config.json takes the new flags.
    config = (run / "run_config.json").read_text()
    assert run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", "torn", "--resume", "--no-progress",
                                "--max-steps", "5"]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    assert (run / "run_config.json").read_text() == config


def test_every_file_reaches_the_disk_before_its_name_does(tiny, tmp_path, monkeypatch):
    """A rename is atomic against a crash of the process, not against a power cut: file systems write
    a new file's data later than its name, which could survive pointing at an empty file while the
    old checkpoint is already deleted. Each file of a checkpoint, an export and a feature cache part
    is fsynced under its temporary name, before the rename; the folder holding the new name after."""
    events = []  # ("sync", path) and ("rename", source, target), in order
    real_fsync, real_rename = os.fsync, os.rename

    def recording_fsync(descriptor):
        events.append(("sync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def recording_rename(source, target, *args, **kwargs):
        events.append(("rename", str(source), str(target)))
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    args = train_args(tiny, tmp_path, "run", "--max-steps", "4", "--final-eval", "false", "--eval-every", "2",
                      "--save-every", "2", "--feature-cache-dir", str(tmp_path / "cache"))
    assert train.main(args) == 0
    run = tmp_path / "run"
    synced = [event[1] for event in events if event[0] == "sync"]
    for folder in ("resume", "last"):
        files = list((run / folder).iterdir())
        assert files and all(str(run / f"{folder}.tmp" / path.name) in synced for path in files), (files, events)
        # Each swap: the finished folder synced last, then renamed into the run, then the run synced
        # (before the old checkpoint is deleted).
        swaps = [i for i, event in enumerate(events) if event == ("rename", str(run / f"{folder}.tmp"), str(run / folder))]
        assert swaps, events
        for i in swaps:
            last_sync_before = next(event for event in reversed(events[:i]) if event[0] == "sync")
            assert last_sync_before == ("sync", str(run / f"{folder}.tmp")), events
            assert events[i + 1] == ("sync", str(run)), events
    for name in ("adapter.safetensors", "adapter_config.json", "run_config.json"):
        assert str(run / f"{name}.tmp") in synced, name
    parts = list((tmp_path / "cache").glob("*/part-*"))
    assert parts and all(str(part) + ".tmp" in synced for part in parts), (parts, synced)


def train_killed_in(argv: list[str], function: str, parameters: str, counted: str, at: int) -> None:
    """train.main(argv) in a process of its own, SIGKILLed (no cleanup possible) at the `at`-th call of
    train.`function` (taking `parameters`) for which the expression `counted` holds."""
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        f"real, calls = train.{function}, [0]\n"
        f"def dying({parameters}):\n"
        f"    calls[0] += bool({counted})\n"
        f"    if ({counted}) and calls[0] == {at}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"    return real({parameters})\n"
        f"train.{function} = dying\n"
        f"train.main({argv!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_kill_in_the_middle_of_a_save_keeps_the_last_good_checkpoint(tiny, tmp_path):
    # 15 steps (of 26): checkpoints at 5 and 10, and the resumed run crosses the epoch boundary (13).
    steps = ("--final-eval", "false", "--max-steps", "15")
    train.main(train_args(tiny, tmp_path, "straight", *steps))
    expected = load_file(tmp_path / "straight" / "last" / "adapter.safetensors")

    # A real SIGKILL, no cleanup possible: each checkpoint writes rng_0, optimizer, scheduler;
    # the process dies after the second checkpoint's RNG and optimizer files are on disk.
    args = train_args(tiny, tmp_path, "killed", *steps)
    train_killed_in(args, "save_state", "folder, name, state", "True", 6)
    run = tmp_path / "killed"
    assert (run / "resume.tmp").is_dir()  # the half-written state, ignored
    assert read_json(run / "resume" / "trainer_state.json")["step"] == 5
    assert train.main(train_args(tiny, tmp_path, "killed", "--resume", *steps)) == 0
    resumed = load_file(run / "last" / "adapter.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_a_crash_in_the_save_after_a_crash_between_its_renames_leaves_a_resume_state(tiny, tmp_path):
    """A crash between a save's two renames leaves resume.old as the only state; the resumed run's next
    save must not delete it before its own state is in place, or a second crash leaves nothing to resume."""
    steps = ("--final-eval", "false", "--max-steps", "15")
    train.main(train_args(tiny, tmp_path, "straight", *steps))
    expected = load_file(tmp_path / "straight" / "last" / "adapter.safetensors")

    args = train_args(tiny, tmp_path, "twice", *steps)
    run = tmp_path / "twice"

    # SIGKILL once the step-10 state is written, before it is swapped in (the first swap is step 5's).
    train_killed_in(args, "sync_tree", "folder", "folder.name == 'resume.tmp'", 2)
    (run / "resume").rename(run / "resume.old")  # as a crash between the renames of a save leaves it
    # The resumed run's first save, from step 5 to 10.
    train_killed_in([*args, "--resume"], "sync_tree", "folder", "folder.name == 'resume.tmp'", 1)
    assert read_json(run / "resume.old" / "trainer_state.json")["step"] == 5
    assert train.main([*args, "--resume"]) == 0
    resumed = load_file(run / "last" / "adapter.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert not (run / "resume.old").exists()


def trained_run(tiny, tmp_path) -> Path:
    """A run of two steps, its best adapter (validated at step 2) at the top and last/ beside it."""
    assert train.main(train_args(tiny, tmp_path, "run", "--max-steps", "2", "--save-every", "2", "--eval-every", "2",
                                 "--final-eval", "false")) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_write_stopped_before_its_rename_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch, stop):
    """Ctrl-C (or a full disk) between writing a file aside and renaming it into place left the .tmp in the run
    folder until the next write of that file (predictions.jsonl.tmp, curve_loss.png.tmp: eval.py stopped as it
    wrote its outputs). The old file stays, the half-written copy goes: JSON, the curve PNGs, adapter weights."""
    import model
    import report
    import utils

    def stopped(tmp, path):
        raise stop

    for module in (utils, report, model):
        monkeypatch.setattr(module, "replace_durably", stopped)
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"type": "train", "step": 1, "loss": 2.0}) + "\n")
    writes = {"metrics.json": lambda: utils.write_json(tmp_path / "metrics.json", {"new": 1}),
              "curve_loss.png": lambda: report.training_curves(log, tmp_path),
              "adapter.safetensors": lambda: model.save_adapter_weights(tmp_path / "adapter.safetensors",
                                                                        torch.nn.Linear(2, 2))}
    for name, write in writes.items():
        (tmp_path / name).write_text("the old file\n")
        with pytest.raises(type(stop)):
            write()
        assert (tmp_path / name).read_text() == "the old file\n", name
        assert not list(tmp_path.glob("*.tmp")), (name, sorted(path.name for path in tmp_path.iterdir()))


def test_links_planted_in_a_run_folder_are_replaced_on_resume_not_written_through(tiny, tmp_path):
    """A run folder from elsewhere may hold links where train.py --resume writes: .train.lock -> ~/.bashrc was
    truncated to the lock's "pid ..." line, last.tmp -> a folder got the run's adapter written into it, a .tmp
    file was written through, and a dangling train_log.jsonl link created the file it named."""
    run = trained_run(tiny, tmp_path)
    victim, outside = tmp_path / "victim.txt", tmp_path / "outside"
    victim.write_text("the user's own file\n")
    outside.mkdir()
    for name in (".train.lock", "run_config.json.tmp", "adapter_config.json.tmp", "adapter.safetensors.tmp"):
        (run / name).symlink_to(victim)
    for name in ("last.tmp", "last.old", "resume.tmp"):
        (run / name).symlink_to(outside, target_is_directory=True)
    (run / "train_log.jsonl").unlink()
    (run / "train_log.jsonl").symlink_to(tmp_path / "created-by-the-log")
    assert train.main(["--output-dir", str(tmp_path), "--run-name", "run", "--resume", "--no-progress",
                       "--max-steps", "4"]) == 0
    assert victim.read_text() == "the user's own file\n" and not list(outside.iterdir())
    assert not (tmp_path / "created-by-the-log").exists()
    assert not any((run / name).is_symlink() for name in (".train.lock", "run_config.json.tmp", "last.tmp",
                                                          "last.old", "resume.tmp", "train_log.jsonl"))
    assert read_json(run / "last" / "adapter_config.json")["training"]["step"] == 4


def test_a_log_line_train_py_does_not_write_stops_a_resume_in_one_line(tmp_path):
    """Cutting the log back to the checkpoint compared each line's step: [1] or a step of "x" (an edited log, or
    one from elsewhere) was an AttributeError or TypeError traceback."""
    log = tmp_path / "train_log.jsonl"
    for odd in ([1], {"type": "train", "step": "x"}, {"step": True}):
        log.write_text(json.dumps({"type": "train", "step": 1, "loss": 2.0}) + "\n" + json.dumps(odd) + "\n")
        with pytest.raises(UserError) as info:
            train.truncate_log(log, 1)
        assert str(info.value) == (f"{log} holds a line train.py does not write ({json.dumps(odd)}); fix or delete "
                                   "that line"), info.value


def test_cutting_the_log_back_keeps_the_lines_of_the_checkpoints_own_step(tmp_path):
    """A resumed run goes on from the step after its checkpoint, so the lines of the checkpoint's step (its
    validation, its loss) are written once, before the stop: cut with them, the log lost that validation."""
    log = tmp_path / "train_log.jsonl"
    write_jsonl(log, [{"type": "train", "step": 4, "loss": 2.0}, {"type": "eval", "step": 5, "val_loss": 1.5},
                      {"type": "train", "step": 6, "loss": 1.0}])
    train.truncate_log(log, 5)
    assert [(r["type"], r["step"]) for r in read_jsonl(log)] == [("train", 4), ("eval", 5)]


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, train.Terminated)])
def test_a_second_signal_stops_at_once_where_the_first_asks_for_a_checkpoint(signum, raised):
    """The first Ctrl-C (or SIGTERM) lets the loop save and leave at its next step; a second one, when that is
    taking too long, must end the script now."""
    with train.StopRequest() as stop:
        signal.raise_signal(signum)
        assert stop.signal_name == signal.Signals(signum).name
        with pytest.raises(KeyboardInterrupt) as info:
            signal.raise_signal(signum)
    assert info.type is raised


def test_a_nonfinite_gradient_of_a_finite_loss_is_not_applied():
    """A loss can be finite while its gradient is not (an overflow in the backward pass): applied, AdamW would
    turn every weight into NaN. Without a loss scaler (fp32, bf16) the gradient's norm decides too."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no")
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    layer, optimizer, scheduler = accelerator.prepare(layer, optimizer, scheduler)
    loss = layer(torch.randn(2, 4)).square().mean()
    accelerator.backward(loss)
    layer.weight.grad[0, 0] = float("inf")
    before = layer.weight.detach().clone()
    outcome = train.optimizer_step(accelerator, layer, optimizer, scheduler, [loss.detach()], 1.0)
    assert not outcome.applied and outcome.nonfinite and torch.equal(layer.weight, before)


class Loading(Exception):
    """Raised by a stand-in for app.load_run: the page got as far as loading a run."""


def test_readers_of_last_load_last_old_after_a_crash_between_the_renames_of_its_save(tiny, tmp_path, monkeypatch,
                                                                                       capsys):
    """A save swaps last/ in with two renames (train.swap_in): killed between them, the run holds last.old/ and
    no last/ until its next save. train.py --resume fell back to resume.old/; inference.py, eval.py and app.py
    given RUN/last stopped at "not found", and eval.py RUN pointed to a last/ that was not there."""
    import app
    import eval as eval_script
    import inference

    run = trained_run(tiny, tmp_path)
    (run / "last").rename(run / "last.old")  # as the crash leaves it (the new last.tmp/ is not yet trusted)
    old = run / "last.old"
    said = f"note: {run / 'last'} is missing (a save stopped between its two renames); using {old}, its last whole copy"
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    capsys.readouterr()
    assert inference.main(["--checkpoint", str(run / "last"), image]) == 0
    assert said in capsys.readouterr().err
    assert eval_script.main([str(run / "last"), "--limit", "2", "--no-progress", "--num-workers", "0"]) == 0
    assert read_json(old / "metrics.json")["checkpoint"] == str(old)
    assert eval_script.main(["--compare", str(run / "last")]) == 0
    loaded = []

    def load_run(checkpoint, *args, **kwargs):
        loaded.append(checkpoint)
        raise Loading

    monkeypatch.setattr(app, "import_gradio", lambda: None)
    monkeypatch.setattr(app, "check_can_serve", lambda host, port: None)
    monkeypatch.setattr(app, "load_run", load_run)
    with pytest.raises(Loading):
        app.main(["--checkpoint", str(run / "last"), "--device", "cpu"])
    assert loaded == [old]
    # A run stopped before any validation saved a best adapter is pointed to RUN/last, which finds last.old/.
    for name in ("adapter.safetensors", "adapter_config.json"):
        (run / name).unlink()
    with pytest.raises(UserError, match=re.escape(f"its last/ holds the last step's: give {run / 'last'}")):
        eval_script.main([str(run), "--no-progress"])


def test_outputs_written_into_last_are_kept_with_their_adapter_when_a_resume_replaces_it(tiny, tmp_path, capsys):
    """eval.py RUN/last writes its outputs into last/ (of a finished run, as the README says); a --resume with more
    steps swapped a new last/ in and deleted the old one, and the outputs with it, without a word."""
    import eval as eval_script

    run = trained_run(tiny, tmp_path)
    scored = eval_script.adapter_identity(run / "last")
    write_json(run / "last" / "metrics.json", {"adapter": scored})  # as eval.py RUN/last writes it, and more files
    for name in ("predictions.jsonl", "report.html", ".eval.lock", "notes.txt"):
        (run / "last" / name).write_text(f"the {name} of step 2\n")
    held = sorted(path.name for path in (run / "last").iterdir())
    capsys.readouterr()
    assert train.main(["--output-dir", str(tmp_path), "--run-name", "run", "--resume", "--no-progress",
                       "--max-steps", "4", "--final-eval", "false"]) == 0
    kept = run / "last-step-2"
    assert sorted(path.name for path in kept.iterdir()) == held
    assert eval_script.file_digest(kept / "adapter.safetensors") == scored["blake2b"]  # the adapter they describe
    assert sorted(path.name for path in (run / "last").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert read_json(run / "last" / "adapter_config.json")["training"]["step"] == 4
    others = ", ".join(name for name in held
                       if name not in ("adapter.safetensors", "adapter_config.json", ".eval.lock"))
    assert (f"note: {run / 'last'} held files train.py does not write ({others}): kept with the adapter they describe "
            f"in {kept}; {run / 'last'} now holds step 4's") in capsys.readouterr().out
    assert eval_script.stale_adapter_note(kept / "metrics.json", read_json(kept / "metrics.json")) == ""


def fake_checkpoint(folder: Path, step: int, *others: str) -> Path:
    folder.mkdir()
    write_json(folder / "adapter_config.json", {"training": {"step": step}})
    (folder / "adapter.safetensors").write_bytes(b"weights of step %d" % step)
    for name in others:
        (folder / name).write_text(name)
    return folder


def test_a_save_keeps_a_replaced_last_only_where_it_holds_files_not_its_own(tmp_path):
    """A crash between a save's renames leaves last.old/, which eval.py RUN/last writes into: the next save deleted
    it, outputs and all. A last/ with only its adapter (and eval.py's empty lock) is deleted as before, resume/ too."""
    def save(step: int) -> Path | None:
        return train.swap_in(tmp_path / "last", fake_checkpoint(tmp_path / "last.tmp", step), keep_others=True)

    fake_checkpoint(tmp_path / "last.old", 2, "metrics.json")
    assert save(4) == tmp_path / "last-step-2"
    assert (tmp_path / "last-step-2" / "metrics.json").read_text() == "metrics.json"
    assert (tmp_path / "last-step-2" / "adapter.safetensors").read_bytes() == b"weights of step 2"
    (tmp_path / "last" / ".eval.lock").touch()
    assert save(6) is None
    (tmp_path / "last" / "report.html").write_text("step 6's report")
    assert save(6) == tmp_path / "last-step-6"  # step 6 saved again: a resume from an older state
    (tmp_path / "last" / "report.html").write_text("step 6's other report")
    assert save(8) == tmp_path / "last-step-6-2"
    fake_checkpoint(tmp_path / "resume", 2, "rng_1.json")  # a resume with fewer processes writes no rng_1.json
    assert train.swap_in(tmp_path / "resume", fake_checkpoint(tmp_path / "resume.tmp", 4)) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last", "last-step-2", "last-step-6", "last-step-6-2",
                                                                "resume"]
    assert read_json(tmp_path / "last" / "adapter_config.json")["training"]["step"] == 8


def test_readers_take_the_best_weights_step_from_the_weights_after_a_crash_between_their_two_files(tiny, tmp_path):
    """The best adapter is replaced file by file (model.save_adapter): killed between the two renames, step 4's
    weights lie beside step 2's adapter_config.json. train.py --resume repairs it from the copy inside the
    weights; before that eval.py recorded step 2 for step 4's figures, and the report marked step 2 as kept."""
    import eval as eval_script
    from model import FORMAT_VERSION
    from report import kept_step
    from safetensors.torch import save_file

    run = trained_run(tiny, tmp_path)
    config = read_json(run / "adapter_config.json")
    training = config["training"]
    assert training["step"] == training["best"]["step"] == 2
    newer = {**config, "training": {**training, "step": 4, "best": {**training["best"], "step": 4}}}
    weights = {name: tensor + 0.01 for name, tensor in load_file(run / "adapter.safetensors").items()}
    save_file(weights, str(run / "adapter.safetensors"),
              metadata={"format_version": str(FORMAT_VERSION), "adapter_config.json": json.dumps(newer)})
    assert eval_script.main([str(run), "--limit", "2", "--out", str(tmp_path / "eval"), "--no-progress",
                             "--num-workers", "0"]) == 0
    assert read_json(tmp_path / "eval" / "metrics.json")["adapter"]["step"] == 4
    assert kept_step(run) == 4
    assert read_json(run / "adapter_config.json") == config  # a reader leaves the run's files as they are


def run_with_a_reader_that_leaves(script: str, argv: list[str], together: bool = False) -> subprocess.CompletedProcess:
    """`python -u SCRIPT ARGV | head -1` (`2>&1 | head -1` if `together`): the reader of stdout takes one line
    and goes. Unbuffered, as a pipe's 8 KiB buffer would hold a short run's every later line until the exit's
    flush."""
    command = [sys.executable, "-u", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
               f"from utils import run_cli; import {script}; sys.exit(run_cli({script}.main, {argv!r}))"]
    stderr = subprocess.STDOUT if together else subprocess.PIPE
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True) as process:
        assert process.stdout.readline()
        process.stdout.close()
        err = "" if together else process.stderr.read()
        return subprocess.CompletedProcess(command, process.wait(timeout=300), "", err)


def test_training_goes_on_when_the_reader_of_its_output_leaves(tiny, tmp_path):
    """`python train.py | head`, or a `| tee` killed: the next line printed raised BrokenPipeError, which
    ended training at once, with no checkpoint."""
    done = run_with_a_reader_that_leaves("train", train_args(tiny, tmp_path, "run", "--max-steps", "6",
                                                             "--final-eval", "false"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "the reader of standard output has gone" in done.stderr, done.stderr
    run = tmp_path / "run"
    assert read_json(run / "resume" / "trainer_state.json")["finished"] is True
    assert (run / "last" / "adapter.safetensors").is_file()
    # stderr into the same pipe, as `2>&1 | head` sends it: its next line (a progress bar) failed the same way
    done = run_with_a_reader_that_leaves("train", train_args(tiny, tmp_path, "both", "--max-steps", "6",
                                                             "--final-eval", "false", "--progress"), together=True)
    assert done.returncode == 0
    assert read_json(tmp_path / "both" / "resume" / "trainer_state.json")["finished"] is True


def copy_data_with_bad_images(tiny, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data)
    truncated = data / "images" / "train_0001.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (data / "images" / "train_0002.png").write_bytes(b"")
    return data


def test_unreadable_images_are_skipped_and_reported(tiny, tmp_path, capsys):
    data = copy_data_with_bad_images(tiny, tmp_path)
    args = train_args(tiny, tmp_path, "skip", "--final-eval", "false", "--max-steps", "3")
    args[args.index("--data-dir") + 1] = str(data)
    summary = train.train(train.parse_config(args))
    assert summary["bad_samples"] == 2
    bad = read_jsonl(tmp_path / "skip" / "bad_samples.jsonl")
    assert [b["image_id"] for b in bad] == ["images/train_0001.png", "images/train_0002.png"]
    assert "skipped 2 images that could not be read (missing or unreadable)" in capsys.readouterr().out

    # An unreadable test image: the run that skips bad images also skips it in its final evaluation.
    test_image = data / "images" / "test_0001.png"
    test_image.write_bytes(test_image.read_bytes()[:100])
    (data / "images" / "test_0002.png").unlink()
    args = train_args(tiny, tmp_path, "with-test", "--max-steps", "2")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "skipping 2 test images that could not be read (missing or unreadable): images/test_0002.png" in out
    assert "images/test_0001.png" in out
    metrics = read_json(tmp_path / "with-test" / "metrics.json")
    assert metrics["num_images"] == 4

    strict = train_args(tiny, tmp_path, "strict", "--on-bad-sample", "error")
    strict[strict.index("--data-dir") + 1] = str(data)
    assert run_cli(train.main, strict) == 2
    err = capsys.readouterr().err  # the missing test file is found first, before any image is decoded
    assert "1 of 6 test images are missing" in err and "test_0002.png" in err and "Traceback" not in err
    shutil.copy(Path(tiny["data_dir"]) / "images" / "test_0002.png", data / "images" / "test_0002.png")
    assert run_cli(train.main, strict) == 2
    err = capsys.readouterr().err
    assert "train_0001.png" in err and "Traceback" not in err
    # Training images readable, one test image not: it stops the final evaluation, named, not left out of it.
    for name in ("train_0001.png", "train_0002.png", "test_0002.png"):
        shutil.copy(Path(tiny["data_dir"]) / "images" / name, data / "images" / name)
    strict = train_args(tiny, tmp_path, "strict-test", "--on-bad-sample", "error", "--max-steps", "2")
    strict[strict.index("--data-dir") + 1] = str(data)
    assert run_cli(train.main, strict) == 2
    err = capsys.readouterr().err
    assert "test evaluation stopped" in err and "test_0001.png" in err and "Traceback" not in err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each worker in a session of its
    own, so killing a process group would leave the workers running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # parent pid -> pid
    pending, tree = [pid], []
    while pending:
        tree.append(pending.pop())
        pending.extend(children.get(tree[-1], []))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


# Validation at steps 10 and 20 on all 6 validation images: 2 batches of 4 images (4 + 2) and 8 of 4 pairs
# (30 pairs), so 2 processes share it unevenly.
VALIDATION_FLAGS = ("--eval-every", "10", "--val-limit", "0", "--eval-batch-size", "4")


def run_training_processes(tiny, out: Path, name: str, processes: int, batch: int, *extra: str,
                           script: Path = ROOT / "train.py", returncode: int = 0,
                           timeout: int = 600, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # 30 images, 150 pairs: 19 batches of 8, an odd number, so the 2-process runs' last round of each epoch
    # is short (as the 1-process run's last step is): no pair may be trained on twice.
    args = train_args(tiny, out, name, "--final-eval", "false", "--train-limit", "30", "--batch-size", str(batch),
                      "--epochs", "2", *VALIDATION_FLAGS, "--save-every", "0", "--log-every", "1", *extra)
    args.remove("--no-progress")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, str(script), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *launcher, str(script), *args]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: kill the launcher and every worker, none left behind
        kill_process_tree(child.pid)
        stdout, stderr = child.communicate()
        pytest.fail(f"{name}: {processes} training processes still running after {timeout} s (a hang?)\n"
                    f"{stderr[-3000:]}")
    done = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_processes(tiny, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process run (batch 8 each) that two tests compare with: (its output folder, the process). Each
    process prints how many images it captioned and pairs it scored, call by call (only validation does)."""
    out = tmp_path_factory.mktemp("two-processes")
    wrapper = out / "train_counting.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        "import model, train\n"
        "generate, forward, captioned, scored = model.Captioner.generate, model.Captioner.forward, [], []\n"
        "def counted_generate(self, image_features, decoding=None):\n"
        "    captioned.append(len(image_features))\n"
        "    return generate(self, image_features, decoding)\n"
        "def counted_forward(self, image_features, input_ids, labels):\n"
        "    if not torch.is_grad_enabled():  # the validation loss, not a training step\n"
        "        scored.append(len(input_ids))\n"
        "    return forward(self, image_features, input_ids, labels)\n"
        "model.Captioner.generate, model.Captioner.forward = counted_generate, counted_forward\n"
        "code = train.main(sys.argv[1:])\n"
        "print(f\"rank {os.environ['RANK']} captioned {captioned} scored {scored}\")\n"
        "sys.exit(code)\n")
    return out, run_training_processes(tiny, out, "two", 2, 8, script=wrapper)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny, tmp_path, two_processes):
    one = run_training_processes(tiny, tmp_path, "one", 1, 16)
    two_out, two = two_processes
    assert "processes = 2" in two.stdout and two.stdout.count("***** Running training *****") == 1
    assert "this is 1 process" not in one.stderr + two.stderr  # torchrun and plain python: no false alarm
    # One progress bar: only the main process draws one (each bar renders its 0% state once).
    assert two.stderr.count("training:   0%") == one.stderr.count("training:   0%") == 1
    losses = {}
    for name, out in (("one", tmp_path), ("two", two_out)):
        log = read_jsonl(out / name / "train_log.jsonl")
        losses[name] = [r["loss"] for r in log if r["type"] == "train"]
        assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 21))  # one log, no duplicate lines
    # Same pairs per step and the same token-weighted loss; only the order of float sums
    # differs. Stated tolerance: 1e-5 on losses and adapter weights after 20 steps.
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-5, atol=1e-5)
    a = load_file(tmp_path / "one" / "last" / "adapter.safetensors")
    b = load_file(two_out / "two" / "last" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    assert not (two_out / "two" / "last.tmp").exists()
    assert json.loads((two_out / "two" / "run_config.json").read_text())["batch_size"] == 8
    # Validation is shared in whole batches (eval.py's shards), at steps 10 and 20: the first batch of images
    # is process 0's and the second process 1's; each scores 4 of the 8 loss batches. One process did it all.
    assert "rank 0 captioned [4, 4] scored [4, 4, 4, 4, 4, 4, 4, 4]" in two.stdout, two.stdout[-2000:]
    assert "rank 1 captioned [2, 2] scored [4, 4, 4, 2, 4, 4, 4, 2]" in two.stdout, two.stdout[-2000:]
    # Both processes agreed on the record: it has one history. The adapters differ by float noise (within 1e-5,
    # above), and so may the loss; the captions, and so every caption metric, are the same.
    histories = {name: json.loads((out / name / "resume" / "trainer_state.json").read_text())["history"]
                 for name, out in (("one", tmp_path), ("two", two_out))}
    assert [h["step"] for h in histories["two"]] == [h["step"] for h in histories["one"]] == [10, 20]
    for one_record, two_record in zip(histories["one"], histories["two"]):
        assert two_record["val_loss"] == pytest.approx(one_record["val_loss"], rel=1e-5, abs=1e-5)
        assert {**two_record, "val_loss": None} == {**one_record, "val_loss": None}
    examples = {name: [(r["example"], r["warning"]) for r in read_jsonl(out / name / "train_log.jsonl")
                       if r["type"] == "eval"] for name, out in (("one", tmp_path), ("two", two_out))}
    assert examples["two"] == examples["one"]


@pytest.mark.slow
def test_a_data_error_every_process_finds_is_one_line(tiny, tmp_path):
    """Both processes find the same training image missing and stop; one line says so, not one per process
    (and not process 0's line while process 1 waits for a gather that never comes)."""
    from dataset import load_records

    data_dir = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data_dir)
    missing = Path(load_records("folder", "train", str(data_dir))[0].path)
    missing.unlink()
    failed = run_training_processes(tiny, tmp_path, "missing", 2, 8, "--data-dir", str(data_dir),
                                    "--on-bad-sample", "error", returncode=1, timeout=240)
    # Counted in the text, not by lines: two processes' lines written at once can share one.
    assert said_by_the_processes(failed.stderr).count("error: ") == 1, failed.stderr[-3000:]
    assert "train images are missing" in failed.stderr and missing.name in failed.stderr


@pytest.mark.slow
def test_a_run_folder_the_main_process_refuses_is_one_line_under_two_processes(tiny, tmp_path):
    """Process 0 refuses the run folder (it holds other files); the other process said "another process of
    this run ended ... continue it with --resume", for a run that never began."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    failed = run_training_processes(tiny, tmp_path, "taken", 2, 8, returncode=1, timeout=240)
    assert said_by_the_processes(failed.stderr).count("error: ") == 1, failed.stderr[-3000:]
    assert "holds files that are not a run" in failed.stderr and "another process" not in failed.stderr


@pytest.mark.slow
def test_refusals_on_resume_and_at_the_test_evaluation_are_one_line_under_two_processes(tiny, tmp_path):
    """Three refusals that were a line per process, or process 0's line and then process 1's "another process
    of this run ended ... continue it with --resume": a resume's refused flag (every process read the saved
    config and said so), a damaged log and the finished run's test evaluation (the main process's alone). Each
    is one line, and the launcher's summary, printed last, shows it in place of a link."""
    from dataset import load_records

    data_dir = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data_dir)
    for record in load_records("folder", "test", str(data_dir)):
        Path(record.path).write_bytes(b"not an image")
    flags = ("--data-dir", str(data_dir), "--on-bad-sample", "error", "--final-eval", "true", "--max-steps")
    # A 5 s monitor lets process 1 reach its next collective before the launcher stops it (see the test above).
    launch = partial(run_training_processes, tiny, tmp_path, "done", 2, returncode=1, timeout=240,
                     launcher=("--monitor-interval", "5"))
    for batch, extra, line in (
            (8, (*flags, "2"), f"error: training finished and is saved in {tmp_path / 'done'}, but the test evaluation "
                               f"stopped (python eval.py {tmp_path / 'done'} runs it again): cannot read image"),
            (8, (*flags, "4", "--resume"), f"error: {tmp_path / 'done' / 'train_log.jsonl'} line 3 is not JSON"),
            (4, (*flags, "4", "--resume"), "error: --resume continues"),
    ):
        failed = launch(batch, *extra)
        said = said_by_the_processes(failed.stderr)
        assert said.count("error: ") == 1 and line in said and "another process" not in said, failed.stderr[-3000:]
        assert f"traceback : {line}" in failed.stderr, failed.stderr[-3000:]  # the launcher's summary
        if "--resume" not in extra:  # the next start finds a damaged log
            log = tmp_path / "done" / "train_log.jsonl"
            log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]) + "{not json\n")


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_one_line_under_two_processes(tiny, tmp_path):
    """A run saved by one process, resumed by two: each process read the resume state and refused it alike, and
    said so, one line per process. It is one line, naming the number the run resumes with."""
    run_training_processes(tiny, tmp_path, "one", 1, 8, "--max-steps", "2")
    # A 5 s monitor lets process 1 say its line before the launcher stops it (see the test above).
    failed = run_training_processes(tiny, tmp_path, "one", 2, 8, "--max-steps", "4", "--resume", returncode=1,
                                    timeout=240, launcher=("--monitor-interval", "5"))
    said = said_by_the_processes(failed.stderr)
    assert said.count("error: ") == 1, failed.stderr[-3000:]
    assert "was saved by 1 process, not 2; resume with the same number of processes (1)" in said, said[-3000:]


def test_accelerate_launch_cpu_running_one_process_says_so(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (several need mpirun): the
    scripts must say so, not run alone in silence. Checked against the installed Accelerate."""
    probe = tmp_path / "probe.py"
    probe.write_text("import utils\nprint(repr(utils.lone_cpu_launch_warning('train.py')))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
        env.pop(name, None)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(probe)], capture_output=True, text=True, env=env, timeout=120)
    assert launched.returncode == 0, launched.stderr[-2000:]
    lines = launched.stdout.splitlines()
    assert len(lines) == 1, launched.stdout  # one process printed
    assert "torchrun --nproc_per_node N train.py" in lines[0], lines[0]
    plain = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60,
                           env={**env, "ACCELERATE_USE_CPU": "true"})
    assert plain.stdout.strip() == "''", plain.stdout  # one process asked for: nothing to say


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_the_same_step_and_resume_matches(tiny, tmp_path, two_processes):
    """SIGTERM reaches only rank 1 (as when a scheduler kills one worker first): both ranks must
    stop at the same step (else the next collective hangs), save once, and resume exactly."""
    wrapper = tmp_path / "train_signalled.py"
    wrapper.write_text(
        "import os, signal, sys\n"
        "import train\n"
        "def on_step(step):\n"
        "    if step == 6 and os.environ.get('RANK') == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "sys.exit(train.main(sys.argv[1:], on_step=on_step))\n")
    straight_out, straight = two_processes  # the same run, uninterrupted
    # Without the agreed stop, rank 0 would wait forever in the next all-reduce: hence the timeout.
    stopped = run_training_processes(tiny, tmp_path, "stopped", 2, 8, script=wrapper, returncode=1, timeout=240,
                                  launcher=("--monitor-interval", "5"))
    assert "SIGTERM" not in straight.stdout
    assert stopped.stdout.count("saved a checkpoint at step 6") == 1, stopped.stdout[-2000:]  # one rank prints
    state = json.loads((tmp_path / "stopped" / "resume" / "trainer_state.json").read_text())
    assert state["step"] == 6 and not state["finished"]  # the signalled step itself: the flag is read after it
    # The hint relaunches with 2 processes: `python train.py --resume` would be refused (1 process), and
    # on CPUs `accelerate launch --num_processes 2` would start one (lone_cpu_launch_warning).
    hint = stopped.stdout.split("continue with ")[-1].splitlines()[0]
    assert hint.startswith("ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train.py --run-name stopped "), hint
    assert "with 2 processes in all" in hint, hint
    resumed = run_training_processes(tiny, tmp_path, "stopped", 2, 8, "--resume")
    assert "resum" in resumed.stdout.lower()
    steps = [r["step"] for r in read_jsonl(tmp_path / "stopped" / "train_log.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 21)), "the resumed log continues without repeating or skipping steps"
    expected = load_file(straight_out / "two" / "last" / "adapter.safetensors")
    got = load_file(tmp_path / "stopped" / "last" / "adapter.safetensors")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_sigterm_during_feature_extraction_is_one_line_and_keeps_the_finished_parts(tiny, tmp_path, monkeypatch,
                                                                                    capsys):
    """A scheduler's SIGTERM before training begins (here: while CLIP features are extracted) ends the
    script with one line and exit code 143, and the parts already extracted are reused next time."""
    import dataset

    monkeypatch.setattr(dataset, "FEATURE_PART_SIZE", 8)
    real_add, added = dataset.FeatureCache.add, []

    def add_then_sigterm(self, keys, embeddings):
        real_add(self, keys, embeddings)
        added.append(list(keys))
        if len(added) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, as a real one would be

    monkeypatch.setattr(dataset.FeatureCache, "add", add_then_sigterm)
    # Stand-in for the default action (which would kill pytest): without run_cli's handler the run goes on.
    before = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, before)
    args = train_args(tiny, tmp_path, "termed", "--max-steps", "2", "--final-eval", "false")
    try:
        assert run_cli(train.main, args) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # the script's handler does not outlive it
    finally:
        signal.signal(signal.SIGTERM, previous)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    # Nothing of the run to resume yet: the advice is the same command, which then goes on (below), not --resume.
    assert error.startswith("interrupted (SIGTERM); the run had saved nothing yet: run the same command again"), error
    assert [len(keys) for keys in added] == [8, 8]

    first_run = {key for keys in added for key in keys}
    added.clear()
    monkeypatch.setattr(dataset.FeatureCache, "add", lambda self, keys, embeddings: (
        added.append(list(keys)), real_add(self, keys, embeddings)))
    assert run_cli(train.main, args) == 0
    second_run = {key for keys in added for key in keys}
    assert second_run and not second_run & first_run  # the 16 finished images were not encoded again


def test_a_stop_during_start_up_says_resume_only_where_there_is_a_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C before training began always said "continue it with --resume", which then answered "nothing to resume"
    (found by killing train.py at random moments). Now the advice is what the run folder allows."""
    real_open = train.open_run_folder

    def open_then_ctrl_c(run):
        real_open(run)  # the run's config and log are written: a folder without a checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "open_run_folder", open_then_ctrl_c)
    args = train_args(tiny, tmp_path, "early", "--max-steps", "2", "--final-eval", "false")
    assert run_cli(train.main, args) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'early'} stopped before its first checkpoint, so it cannot be resumed: delete" in error, error
    assert run_cli(train.main, [*args, "--resume"]) == 2  # as said: there is nothing to resume
    assert "has no resume state" in capsys.readouterr().err

    monkeypatch.setattr(train, "open_run_folder", real_open)
    args = train_args(tiny, tmp_path, "saved", "--max-steps", "2", "--save-every", "1", "--final-eval", "false")
    assert run_cli(train.main, args) == 0
    monkeypatch.setattr(train, "open_run_folder", open_then_ctrl_c)
    assert run_cli(train.main, [*args, "--resume"]) == 130  # a resume stopped as it starts
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"{tmp_path / 'saved'} keeps its last complete checkpoint (continue it with python train.py "
                          f"--run-name saved --output-dir {tmp_path} --resume) and the feature cache keeps every part "
                          "it finished"), error


def test_a_second_signal_before_the_first_save_keeps_the_validated_adapter_and_says_so(tiny, tmp_path, capsys):
    """A second Ctrl-C during the first save, after a validation had saved the best adapter: the line said to
    delete the run folder, adapter and all."""
    def second_ctrl_c(step):
        if step == 3:
            raise KeyboardInterrupt  # as StopRequest raises on a second signal

    args = train_args(tiny, tmp_path, "validated", "--max-steps", "6", "--eval-every", "2", "--save-every", "100",
                      "--final-eval", "false")
    assert run_cli(lambda argv: train.main(argv, on_step=second_ctrl_c), args) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be resumed, but it keeps the best adapter its validation saved (score it: python eval.py " \
           f"{tmp_path / 'validated'})" in error, error
    assert "delete" not in error and (tmp_path / "validated" / "adapter.safetensors").is_file()


def test_ctrl_c_or_sigterm_in_any_script_is_one_line_with_the_shell_exit_code():
    for signum, code, line in ((signal.SIGTERM, 143, "interrupted (SIGTERM)"), (signal.SIGINT, 130,
                                                                                "interrupted (Ctrl-C)")):
        # As each script starts: SIGINT's default action (a quiet end) while it imports; run_cli restores Ctrl-C.
        script = (f"import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); from utils import run_cli; "
                  f"sys.exit(run_cli(lambda argv: os.kill(os.getpid(), {int(signum)}) or __import__('time').sleep(30)))")
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.strip()) == (code, line), done.stderr[-2000:]



def test_a_sigterm_whose_exception_was_swallowed_still_ends_the_script_with_143():
    # Raised inside a __del__ (or a library callback), the exception is printed as ignored and the
    # code goes on: the script must still end as terminated, not finish its work and exit 0.
    script = ("import gc, os, signal, sys; from utils import run_cli\n"
              "class Finalised:\n"
              "    def __del__(self): os.kill(os.getpid(), signal.SIGTERM)\n"
              "def main(argv):\n"
              "    Finalised(); gc.collect()\n"
              "    print('went on')\n"
              "sys.exit(run_cli(main))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout == "went on\n" and "Exception ignored" in done.stderr  # the swallowing this guards against
    assert done.returncode == 143 and done.stderr.strip().endswith("interrupted (SIGTERM)"), done.stderr[-2000:]


def test_a_skipped_first_step_advances_the_schedule_without_torch_calling_it_a_mistake(tiny, tmp_path,
                                                                                        monkeypatch):
    poison_calls(monkeypatch, {1})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = train.train(train.parse_config(train_args(tiny, tmp_path, "first", "--final-eval", "false",
                                                            "--max-steps", "2", "--log-every", "1")))
    assert summary["nonfinite_steps"] == 1
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in seen]
    # The skipped step still moved the schedule on: step 2 used (and logs) the schedule's rate after one step.
    [logged] = [r for r in read_jsonl(tmp_path / "first" / "train_log.jsonl") if r["type"] == "train"]
    config = train.parse_config(train_args(tiny, tmp_path, "x", "--max-steps", "2"))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = train.lr_schedule(optimizer, config, 2, 1)
    optimizer.step(), schedule.step()
    assert logged["step"] == 2 and logged["lr"] == pytest.approx(schedule.get_last_lr()[0])


def test_resuming_with_another_number_of_processes_is_refused(tiny, tmp_path, capsys):
    """The global batch and each process's place in the epoch depend on the process count: a run
    saved by 2 processes (here: its resume state as 2 processes leave it) does not go on with 1."""
    train.main(train_args(tiny, tmp_path, "two", "--final-eval", "false", "--max-steps", "2"))
    resume = tmp_path / "two" / "resume"
    shutil.copy(resume / "rng_0.json", resume / "rng_1.json")
    assert run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", "two", "--resume", "--no-progress",
                                "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    flags = shlex.join(["--run-name", "two", "--output-dir", str(tmp_path), "--resume"])
    assert ("was saved by 2 processes, not 1; resume with the same number of processes (2): ACCELERATE_USE_CPU=true "
            f"torchrun --nproc_per_node 2 train.py {flags}") in err, err


def test_a_run_that_stopped_before_its_first_checkpoint_says_what_to_do(tiny, tmp_path, monkeypatch, capsys):
    # Non-finite from the first step: the stop cannot point to a checkpoint that was never written.
    poison_calls(monkeypatch, {1, 2, 3})
    args = train_args(tiny, tmp_path, "early", "--max-nonfinite-steps", "3", "--final-eval", "false")
    assert run_cli(train.main, args) == 2
    error = capsys.readouterr().err
    assert "before the run's first checkpoint: start again with a lower learning rate" in error, error
    assert not (tmp_path / "early" / "resume").exists()
    # A folder with a validated adapter but no resume state: neither --resume nor a new run is a dead end.
    monkeypatch.undo()
    (tmp_path / "early" / "adapter.safetensors").write_bytes(b"")
    assert run_cli(train.main, args) == 2
    assert "stopped before its first resumable checkpoint, so it cannot be continued; delete or rename" in \
        capsys.readouterr().err
    assert run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", "early", "--resume"]) == 2
    assert "it keeps the best adapter its validation saved" in capsys.readouterr().err


def test_a_resume_after_a_kill_before_the_first_checkpoint_says_the_way_on_and_keeps_the_adapter(tmp_path, capsys):
    """SIGKILL leaves no line saying what to type next, so the user's --resume must say it: "nothing to resume"
    named no way on, and "delete the folder" threw away the best adapter a validation had saved before the first
    checkpoint (found by SIGKILLing the demo at random moments)."""
    run = tmp_path / "cw"
    run.mkdir()
    (run / train.RUN_LOCK).write_text("1234 host")  # killed before the run saved its config
    assert run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", "cw", "--resume"]) == 2
    assert "run the command that started it again, without --resume" in capsys.readouterr().err
    (run / "adapter.safetensors").write_bytes(b"")  # killed between the first best adapter and the first checkpoint
    with pytest.raises(UserError, match=r"keeps the best adapter its validation saved \(score it: python eval.py "):
        train.load_resume_state(run, None, None, None, None)


def test_an_output_folder_that_cannot_be_written_is_one_line_before_anything_loads(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked and mode == os.W_OK
                        else real_access(path, mode, **kw))  # as a read-only mount answers (root ignores modes)
    monkeypatch.setattr(train, "build_captioner", lambda *a, **k: pytest.fail("loaded before checking the folder"))
    assert run_cli(train.main, train_args(tiny, locked / "runs", "new")) == 2
    assert capsys.readouterr().err.strip() == (f"error: {locked} cannot be written (a read-only disk or no "
                                               "permission); choose another --output-dir")


def test_relative_backbone_and_data_paths_are_saved_absolute_and_a_moved_backbone_is_named(tiny, tmp_path,
                                                                                              monkeypatch, capsys):
    """`--clip-model tiny/clip` was saved as given: eval.py, inference.py or --resume run from another
    folder took it for a Hub id. A backbone moved after training stopped --resume with a bare 'folder
    not found', and naming its new place was refused as a change: the error now says how to resume."""
    from model import load_captioner

    work = tmp_path / "work"
    for name, source in (("clip", tiny["clip_model"]), ("lm", tiny["lm_model"])):
        shutil.copytree(source, work / "backbones" / name)
    shutil.copytree(tiny["data_dir"], work / "data")
    monkeypatch.chdir(work)
    args = [*train_args(tiny, "runs", "rel", "--final-eval", "false", "--max-steps", "2"), "--clip-model",
            "backbones/clip", "--lm-model", "./backbones/lm", "--data-dir", "data"]
    assert train.main(args) == 0
    saved = json.loads((work / "runs" / "rel" / "run_config.json").read_text())
    assert (saved["clip_model"], saved["lm_model"], saved["data_dir"]) == (
        str(work / "backbones" / "clip"), str(work / "backbones" / "lm"), str(work / "data"))
    monkeypatch.chdir(tmp_path)  # another folder: the run still names its backbones
    assert load_captioner(work / "runs" / "rel").config.lm_model == str(work / "backbones" / "lm")
    monkeypatch.chdir(work)
    assert train.main([*args, "--resume", "--max-steps", "3"]) == 0  # the same relative flags: no change

    (work / "backbones" / "lm").rename(work / "lm-moved")
    resume = ["--output-dir", "runs", "--run-name", "rel", "--resume", "--no-progress", "--max-steps", "4"]
    capsys.readouterr()
    assert run_cli(train.main, resume) == 2
    error = capsys.readouterr().err.strip()
    assert f"ln -s NEW_PLACE {work / 'backbones' / 'lm'}" in error and "\n" not in error, error
    assert run_cli(train.main, [*resume, "--lm-model", str(work / "lm-moved")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is gone: if the folder was moved, put it back, or a link" in error and "\n" not in error, error
    (work / "backbones" / "lm").symlink_to(work / "lm-moved")
    assert run_cli(train.main, resume) == 0


def test_resume_refuses_other_data_and_another_runs_state_but_takes_moved_data(tiny, tmp_path, capsys):
    def resume(name, *extra):
        return run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", name, "--resume", "--no-progress",
                                    "--max-steps", "3", *extra])

    for name, seed in (("mine", "42"), ("other", "7")):
        train.main(train_args(tiny, tmp_path, name, "--final-eval", "false", "--max-steps", "2", "--seed", seed))
    moved = Path(shutil.copytree(tiny["data_dir"], tmp_path / "moved"))
    fewer = Path(shutil.copytree(tiny["data_dir"], tmp_path / "fewer"))
    rows = (fewer / "captions.jsonl").read_text().splitlines()
    (fewer / "captions.jsonl").write_text("\n".join(r for r in rows if "train_0001" not in r) + "\n")
    assert resume("mine", "--data-dir", str(fewer)) == 2
    error = capsys.readouterr().err
    assert "the training data is not the run's (saved: 40 images" in error and "now: 39 images" in error, error

    shutil.copytree(tmp_path / "mine", tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "resume")
    shutil.copytree(tmp_path / "other" / "resume", tmp_path / "mixed" / "resume")
    assert resume("mixed") == 2
    assert "resume does not belong to this run" in capsys.readouterr().err

    assert resume("mine", "--data-dir", str(moved)) == 0  # the same images in another place


def test_resume_refuses_captions_or_images_changed_in_place_and_other_validation_data(tiny, tmp_path, capsys):
    """The same image ids with edited captions, a re-saved image or changed validation data used to
    resume in silence: the rest of the run trained on other pairs, or picked its best by another set."""
    from PIL import Image

    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    assert train.main(train_args(tiny, tmp_path, "run", "--data-dir", str(data), "--final-eval", "false",
                                 "--max-steps", "2")) == 0
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]

    def resume_with(edited_rows=rows):
        (data / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in edited_rows))
        return run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", "run", "--resume", "--no-progress",
                                    "--max-steps", "3"])

    def first_caption_edited(split):
        return [{**row, "captions": [row["captions"][0] + " edited", *row["captions"][1:]]}
                if row["split"] == split else row for row in rows]

    assert resume_with(first_caption_edited("train")) == 2
    error = capsys.readouterr().err.strip()
    assert "training images' captions or files changed" in error and "\n" not in error, error
    assert resume_with(first_caption_edited("val")) == 2
    assert "validation images, their captions or files changed" in capsys.readouterr().err
    image = data / rows[0]["image"]
    original = image.read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(image)
    assert len(image.read_bytes()) != len(original)
    assert resume_with() == 2
    assert "training images' captions or files changed" in capsys.readouterr().err
    image.write_bytes(original)
    assert resume_with() == 0  # the data as it was saved


def test_a_trainer_state_edited_to_values_of_another_kind_is_one_line_naming_the_field(tiny, tmp_path, capsys):
    """A step of "2" used to end in a TypeError from the loop, and a step of -1 to train again steps taken."""
    assert train.main(train_args(tiny, tmp_path, "good", "--final-eval", "false", "--max-steps", "2")) == 0
    for field, value in (("step", "2"), ("step", -1), ("best_score", "0.5"), ("finished", 0), ("history", {})):
        run = Path(shutil.copytree(tmp_path / "good", tmp_path / f"bad-{field}-{value}"))
        state = json.loads((run / "resume" / "trainer_state.json").read_text())
        (run / "resume" / "trainer_state.json").write_text(json.dumps({**state, field: value}))
        assert run_cli(train.main, ["--output-dir", str(tmp_path), "--run-name", run.name, "--resume",
                                    "--no-progress", "--max-steps", "3"]) == 2, (field, value)
        error = capsys.readouterr().err.strip()
        assert "trainer_state.json does not fit this run" in error and f"{field} is {value!r}" in error, error
        assert "\n" not in error, error


def test_resume_takes_mixed_precision_auto_as_the_run_resolved_it(tiny, tmp_path, capsys):
    """The run saves what auto meant here ("no" on a CPU); the same command with --resume was refused
    as if it asked to change --mixed-precision."""
    args = train_args(tiny, tmp_path, "auto", "--final-eval", "false", "--max-steps", "2", "--mixed-precision", "auto")
    assert train.main(args) == 0
    assert train.main([*args, "--resume", "--max-steps", "3"]) == 0, capsys.readouterr().err


def test_missing_test_images_stop_the_run_before_training_not_after(tiny, tmp_path, capsys):
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    for image in (data / "images").glob("test_*"):
        image.unlink()
    args = train_args(tiny, tmp_path, "notest", "--data-dir", str(data), "--max-steps", "2")
    assert run_cli(train.main, args) == 2
    assert "test images are missing" in capsys.readouterr().err
    assert not (tmp_path / "notest" / "train_log.jsonl").exists()  # no training was done and lost
    # Without the final evaluation the test split is not needed.
    assert run_cli(train.main, [*args, "--final-eval", "false"]) == 0


def test_an_epochs_short_accumulation_window_is_the_mean_of_its_micro_batches(tiny, tmp_path):
    import math

    from dataset import load_records

    pairs = sum(len(r.captions) for r in load_records("folder", "train", tiny["data_dir"]))
    batches = math.ceil(pairs / 16)  # train_args' batch size
    logged = {}
    for accumulation in (batches, 100):  # one step over the whole epoch: a full window, then a short one
        name = f"accum{accumulation}"
        train.main(train_args(tiny, tmp_path, name, "--grad-accum-steps", str(accumulation), "--max-steps", "1",
                              "--log-every", "1", "--final-eval", "false", "--eval-every", "0"))
        [logged[accumulation]] = [r for r in read_jsonl(tmp_path / name / "train_log.jsonl") if r["type"] == "train"]
    assert logged[100]["loss"] == pytest.approx(logged[batches]["loss"], rel=1e-5)
    assert batches < 100  # so the second window is short, and unscaled it would log batches/100 of the mean
    # The logged loss is the sum of the losses that were back-propagated: the gradient is scaled alike.
    assert logged[100]["samples"] == logged[batches]["samples"] == pairs  # what the speed is counted from


def test_an_epoch_ends_with_its_short_accumulation_window_as_a_step(tiny, tmp_path):
    """13 micro-batches an epoch (train_args' batch of 16, 200 pairs) in windows of 2 are 7 steps, the last of one
    micro-batch: one epoch trains on every pair."""
    args = train_args(tiny, tmp_path, "accum2", "--grad-accum-steps", "2", "--epochs", "1", "--log-every", "1",
                      "--final-eval", "false", "--eval-every", "0")
    assert train.train(train.parse_config(args))["step"] == 7
    assert sum(r["samples"] for r in read_jsonl(tmp_path / "accum2" / "train_log.jsonl") if r["type"] == "train") == 200


def test_sigterm_during_the_final_test_evaluation_is_one_line_and_keeps_the_run(tiny, tmp_path, monkeypatch,
                                                                               capsys):
    def evaluation_terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the evaluation")

    monkeypatch.setattr(train, "final_evaluation", evaluation_terminated)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # pytest's stand-in, see above
    try:
        assert run_cli(train.main, train_args(tiny, tmp_path, "late", "--max-steps", "2")) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    error = capsys.readouterr().err.strip()
    assert error.startswith("interrupted: training finished and is saved in") and "\n" not in error, error
    assert read_json(tmp_path / "late" / "resume" / "trainer_state.json")["finished"]


def test_a_reader_that_stops_reading_ends_the_script_quietly():
    # `python inference.py *.jpg | head -1`: the closed pipe is the reader's choice, not an error to trace.
    script = "import sys; from utils import run_cli; sys.exit(run_cli(lambda argv: [print('a caption') for _ in range(10**6)]))"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "a caption\n"
    child.stdout.close()
    assert child.wait(timeout=60) == 128 + signal.SIGPIPE
    assert child.stderr.read() == ""


@pytest.mark.slow
def test_a_process_stopped_before_training_leaves_the_others_one_line_not_a_traceback(tiny, tmp_path):
    """SIGTERM reaches rank 1 alone while it reads its features (before training): it ends with its
    own line, and rank 0, whose next collective fails on the closed connection, says why in one.

    The launcher would also SIGTERM rank 0 as soon as its monitor (every 0.1 s by default) sees rank 1
    gone; rank 0 then says "interrupted", one line too, but a race that hides the line under test.
    A 5 s monitor interval lets rank 0 reach its collective first."""
    wrapper = tmp_path / "train_terminated_early.py"
    wrapper.write_text(
        "import os, signal, sys\n"
        "import train\n"
        "from utils import run_cli\n"
        "real = train.make_pairs\n"
        "def make_pairs(*args, **kwargs):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "train.make_pairs = make_pairs\n"
        "sys.exit(run_cli(train.main))\n")
    done = run_training_processes(tiny, tmp_path, "early", 2, 8, script=wrapper, returncode=1, timeout=240,
                                  launcher=("--monitor-interval", "5"))
    assert "interrupted (SIGTERM)" in done.stderr  # rank 1
    assert "error: another process of this run ended (Connection closed by peer)" in done.stderr, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_what_only_rank_1_sees_is_acted_on_by_all_and_reported(tiny, tmp_path):
    """Each process decodes the images it finds no cached features for (all of them here, as with a
    cache per machine): an image that fails on rank 1 alone (a flaky disk, a damaged copy on one
    machine) must be left out by both ranks, or rank 1 trains on other pairs under the same indices
    (and on another number of batches), and the report must name it though rank 0 read it.
    A NaN loss on rank 1 alone: the skipped step's log line (written by rank 0) holds rank 1's loss."""
    wrapper = tmp_path / "train_flaky_on_rank1.py"
    wrapper.write_text(
        "import os, sys\n"
        "import dataset, train\n"
        "from utils import UserError, run_cli\n"
        "real, failed = dataset.ImageRecord.open, []\n"
        "def open_flaky(self):\n"
        "    if os.environ.get('RANK') == '1' and self.split == 'train' and failed in ([], [self.image_id]):\n"
        "        failed[:] = [self.image_id]  # the first training image rank 1 decodes\n"
        "        raise UserError(f'cannot read image {self.image_id}: flaky on rank 1')\n"
        "    return real(self)\n"
        "dataset.ImageRecord.open = open_flaky\n"
        "real_loss, calls = train.TrainingLoss.__call__, []\n"
        "def loss_nan_on_rank1_second_step(self, **batch):\n"
        "    calls.append(1)\n"
        "    loss = real_loss(self, **batch)\n"
        "    return loss * float('nan') if os.environ.get('RANK') == '1' and len(calls) == 2 else loss\n"
        "train.TrainingLoss.__call__ = loss_nan_on_rank1_second_step\n"
        "sys.exit(run_cli(train.main))\n")
    done = run_training_processes(tiny, tmp_path, "flaky", 2, 8, "--no-feature-cache", "--max-steps", "3",
                                  script=wrapper, timeout=300)
    assert "images = 29   (image, caption) pairs = 145" in done.stdout, done.stdout[-2000:]  # 30 images less one
    skipped = "skipped 1 image that could not be read (missing or unreadable)"
    assert skipped in done.stdout and "flaky on rank 1" in done.stdout, done.stdout[-2000:]
    reported = read_jsonl(tmp_path / "flaky" / "bad_samples.jsonl")
    assert len(reported) == 1 and "flaky on rank 1" in reported[0]["reason"], reported
    skipped = [r for r in read_jsonl(tmp_path / "flaky" / "train_log.jsonl") if r["type"] == "nonfinite"]
    assert [r["step"] for r in skipped] == [2], skipped
    assert len(skipped[0]["losses"]) == 2 and skipped[0]["losses"][1] == "NaN", skipped  # rank 0's, rank 1's


@pytest.mark.parametrize("folder", ["last", "resume"])
def test_a_full_disk_while_saving_stops_the_run_in_one_line_with_its_last_checkpoint_whole(tiny, tmp_path, folder,
                                                                                            monkeypatch, capsys):
    """ENOSPC inside safetensors while the second checkpoint's `folder` is written: one line naming the file, the
    cause and the command that continues, not safetensors' traceback; the first checkpoint stays whole, and the
    half-written last.tmp/ or resume.tmp/ is gone (it held on to the space the line asks to free). safetensors
    reports a full disk as a SafetensorError, no OSError: a real full disk (a tmpfs) ended in its traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_save_file = safetensors.torch.save_file

    def disk_full_after_the_first_checkpoint(tensors, filename, *args, **kwargs):
        if (tmp_path / "full" / "resume" / train.TRAINER_STATE).is_file() and f"{folder}.tmp" in filename:
            # What safetensors 0.8 raised on a full tmpfs, word for word.
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_after_the_first_checkpoint)
    args = train_args(tiny, tmp_path, "full", "--max-steps", "6", "--final-eval", "false")
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {tmp_path / 'full'}") and "(No space left on device)" in err, err
    assert "--resume" in err and len(err.splitlines()) == 1, err
    assert read_json(tmp_path / "full" / "resume" / train.TRAINER_STATE)["step"] == 5
    assert not (tmp_path / "full" / f"{folder}.tmp").exists()


# Several machines, simulated on this one: two torchrun launches with --nnodes 2 on 127.0.0.1, one process
# each, as the README's two `accelerate launch --num_machines 2 --machine_rank 0|1` commands start them. A
# machine with a disk of its own is one whose flag or environment names another folder.

def launch_two_machines(script: Path, per_machine: list[list[str]], envs: list[dict] | None = None,
                        timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node_rank R --master_addr 127.0.0.1 SCRIPT ARGS_R` for R = 0, 1 at once. Their
    output goes to files, not pipes: a machine whose pipe filled up unread would stop the other too."""
    import tempfile

    port, children = free_port(), []
    for rank, args in enumerate(per_machine):
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               **((envs or [{}, {}])[rank])}
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "--monitor-interval", "1", str(script), *args]
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        children.append((command, subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=ROOT),
                         out, err))
    done = []
    for command, child, out, err in children:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: neither machine's processes are left behind
            for _, each, _, _ in children:
                kill_process_tree(each.pid)
            err.seek(0)
            pytest.fail(f"machine {len(done)} still running after {timeout} s (a hang?)\n{err.read()[-3000:]}")
        out.seek(0), err.seek(0)
        done.append(subprocess.CompletedProcess(command, child.returncode, out.read(), err.read()))
        out.close(), err.close()
    return done


def two_machine_args(tiny, out: Path, name: str, *extra: str) -> list[str]:
    """run_training_processes' flags (2 epochs of 30 images, batch 8 per process), progress bar shown."""
    args = train_args(tiny, out, name, "--final-eval", "false", "--train-limit", "30", "--batch-size", "8",
                      "--epochs", "2", *VALIDATION_FLAGS, "--save-every", "0", "--log-every", "1", *extra)
    args.remove("--no-progress")
    return args


@pytest.mark.slow
def test_two_machines_train_and_resume_as_two_processes_on_one_each_with_its_own_feature_cache(tiny, tmp_path,
                                                                                                two_processes):
    """The output folder shared, each machine's CAPTIONER_HOME (the feature cache) its own: machine 1's
    process extracts the features there itself (it found none). SIGTERM reaches machine 1's process
    alone; both stop at the same step, each machine says how to resume on several machines, and the
    resumed run ends with the 2-process run of one machine's adapter bit for bit, with one banner, one
    progress bar and one log."""
    wrapper = tmp_path / "train_signalled.py"
    wrapper.write_text("import os, signal, sys\n"
                       "import train\n"
                       "def on_step(step):\n"
                       "    if step == 6 and os.environ.get('RANK') == '1':\n"
                       "        os.kill(os.getpid(), signal.SIGTERM)\n"
                       "sys.exit(train.main(sys.argv[1:], on_step=on_step))\n")
    homes = [tmp_path / "home-0", tmp_path / "home-1"]
    envs = [{"CAPTIONER_HOME": str(home)} for home in homes]
    stopped = launch_two_machines(wrapper, [two_machine_args(tiny, tmp_path, "two")] * 2, envs)
    for machine in stopped:
        assert machine.returncode != 0 and "]: Traceback" not in machine.stderr, machine.stderr[-3000:]
        hint = machine.stdout.split("saved a checkpoint at step 6; continue with ")[1].splitlines()[0]
        assert hint.startswith("ACCELERATE_USE_CPU=true torchrun --nnodes 2 --nproc_per_node 1 --node_rank R "
                               "--master_addr 127.0.0.1 --master_port "), hint
        assert " train.py --run-name two " in hint and "on each of the 2 machines, R being its rank (0 to 1)" in hint
    assert stopped[1].stdout.count("SIGTERM: saved a checkpoint") == 1  # said where the signal came, too
    for home in homes:  # each machine's first process filled its own cache: train and val, one part each
        assert len(list(home.glob("features/*/part-*.npy"))) == 2, home
    resumed = launch_two_machines(ROOT / "train.py", [two_machine_args(tiny, tmp_path, "two", "--resume")] * 2, envs)
    for machine in resumed:
        assert machine.returncode == 0, machine.stderr[-3000:]
    for first, second in (stopped, resumed):
        assert first.stdout.count("***** Running training *****") == 1 and "***** Running" not in second.stdout
        assert first.stderr.count("training:") > 0 and "training:" not in second.stderr  # one progress bar
        assert "this machine trains process 1 of the run's 2; the banner, progress bar and messages are " \
               "printed by process 0's machine" in second.stdout, second.stdout
    assert [len(list(home.glob("features/*/part-*.npy"))) for home in homes] == [2, 2]  # read, not extracted again
    steps = [r["step"] for r in read_jsonl(tmp_path / "two" / "train_log.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 21))
    expected = load_file(two_processes[0] / "two" / "last" / "adapter.safetensors")
    got = load_file(tmp_path / "two" / "last" / "adapter.safetensors")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_machines_without_a_shared_output_folder_stop_at_once_in_one_line(tiny, tmp_path):
    """Machine 1 with a disk of its own (here: --output-dir names another folder) resumes a run that is
    only on machine 0's disk: it found nothing to resume and stopped, while machine 0 waited for it
    forever. Now every process says in one line that the folder must be shared, before loading anything."""
    own = [tmp_path / "machine-0", tmp_path / "machine-1"]
    (own[0] / "run").mkdir(parents=True)
    write_json(own[0] / "run" / "run_config.json", {"placeholder": True})  # never read: the check comes first
    resume = [["--output-dir", str(folder), "--run-name", "run", "--resume", "--no-progress"] for folder in own]
    for machine in launch_two_machines(ROOT / "train.py", resume, timeout=120):
        assert machine.returncode != 0
        errors = [line for line in machine.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, machine.stderr[-3000:]
        assert re.fullmatch(r"error: --output-dir \S+ is not one folder shared by every machine of this run: process 1 "
                            r"on \S+ cannot see the file process 0 \(on \S+\) wrote there\. A run has one run folder: "
                            r".* on --resume: put it on a file system every machine mounts .*", errors[0]), errors[0]
        assert "[rank0]: Traceback" not in machine.stderr and "[rank1]: Traceback" not in machine.stderr
    assert not own[1].exists() and [p.name for p in own[0].iterdir()] == ["run"]  # the probe file is gone


def test_machines_with_other_copies_of_the_data_stop_in_one_line(tiny, tmp_path):
    """Each machine reads its own copy of the data (its own --data-dir): a copy with one caption edited
    would have trained process 1 on other pairs under the same indices, without a word."""
    copy = tmp_path / "data-copy"
    shutil.copytree(tiny["data_dir"], copy)
    captions = copy / "captions.jsonl"
    captions.write_text(captions.read_text().replace(" on ", " upon ", 1))
    args = [two_machine_args(tiny, tmp_path, "data", "--no-progress", "--max-steps", "2"),
            two_machine_args(tiny, tmp_path, "data", "--no-progress", "--max-steps", "2", "--data-dir", str(copy))]
    for machine in launch_two_machines(ROOT / "train.py", args):
        assert machine.returncode != 0
        errors = [line for line in machine.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(
            "error: the processes of this run do not agree on the training data (a digest of image ids, captions, "
            "file sizes): process 0 on "), machine.stderr[-3000:]
        assert "give every machine the same data and backbones" in errors[0]
    assert not (tmp_path / "data").exists()  # stopped before writing anything


class FakeProcesses:
    """accelerate's PartialState and gather_object for check_processes_agree, as process `rank` of 2 sees them
    (each on a machine of its own unless `local_rank` says it is the second process of its machine)."""

    def __init__(self, rank: int, everyone: list, local_rank: int = 0):
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
        self.local_process_index = local_rank
        self.everyone = everyone

    def install(self, monkeypatch) -> None:
        import accelerate
        import accelerate.utils

        monkeypatch.setattr(accelerate, "PartialState", lambda *a, **k: self)
        monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: self.everyone)


def test_processes_that_disagree_on_a_flag_or_miss_a_file_all_stop_with_the_same_line(monkeypatch):
    from utils import check_processes_agree

    flags = {"--max-steps": "20", "--seed": "0"}
    FakeProcesses(1, [(0, "a", "", flags), (1, "b", "", {**flags, "--max-steps": "10"})]).install(monkeypatch)
    with pytest.raises(UserError) as raised:
        check_processes_agree({**flags, "--max-steps": "10"}, advice="the same flags")
    assert str(raised.value) == ("the processes of this run do not agree on --max-steps: process 0 on a has 20, "
                                 "process 1 on b 10; the same flags")
    FakeProcesses(0, [(0, "a", "", flags), (1, "b", "/r does not exist", flags)]).install(monkeypatch)
    with pytest.raises(UserError, match=r"^process 1 \(on b\): /r does not exist; copy it$"):
        check_processes_agree(flags, advice="copy it")
    FakeProcesses(0, [(0, "a", "", flags), (1, "b", "", dict(flags))]).install(monkeypatch)
    check_processes_agree(flags)  # agreeing processes go on


def raising(error: Exception):
    """A script's main that stops with `error`."""
    def main(argv=None):
        raise error
    return main


def test_a_script_that_stops_on_an_error_leaves_its_process_group_first():
    """Left to the interpreter's exit, gloo's threads were destroyed while running in about 1 stopped start
    in 3 under torchrun ("terminate called without an active exception", SIGABRT, which torchrun reported as
    the root cause instead of the one-line error). run_cli tears the group down on every way out."""
    script = (
        "import os, sys, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from utils import UserError, run_cli\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[1])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "def fail(argv):\n"
        "    raise UserError('--batch-size must be >= 1, got 0')\n"
        "code = run_cli(fail)\n"
        "print('still joined' if dist.is_initialized() else 'left', code)\n"
    )
    port = free_port()
    done = subprocess.run([sys.executable, "-c", script, str(port)], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["left", "2"], done.stdout + done.stderr
    assert done.stderr.strip() == "error: --batch-size must be >= 1, got 0"


def test_leaving_the_process_group_waits_a_while_not_for_a_collective_no_peer_joins():
    """Process 1 stops on an error with an all-reduce of its own still pending, which process 0, busy
    elsewhere, never joins: gloo's teardown waited for it until process 0 exited (here 60 s), and the
    launcher, which stops the others when one exits, never heard of the error."""
    script = (
        "import os, sys, time, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import utils\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[1])\n"
        "rank = int(sys.argv[2])\n"
        "dist.init_process_group('gloo', rank=rank, world_size=2)\n"
        "if rank == 0:\n"
        "    time.sleep(60)\n"
        "    sys.exit(0)\n"
        "utils.LEAVE_GROUP_TIMEOUT_S = 2.0\n"
        "def fail(argv):\n"
        "    dist.all_reduce(torch.ones(4), async_op=True)\n"
        "    raise utils.UserError('stopped mid-step')\n"
        "started = time.perf_counter()\n"
        "code = utils.run_cli(fail)\n"
        "print(code, round(time.perf_counter() - started))\n"
    )
    port = free_port()
    busy = subprocess.Popen([sys.executable, "-c", script, str(port), "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        done = subprocess.run([sys.executable, "-c", script, str(port), "1"], capture_output=True, text=True,
                              timeout=120)
    finally:
        busy.kill()
        busy.wait()
    code, seconds = done.stdout.split()
    assert code == "2" and int(seconds) < 20, done.stdout + done.stderr
    assert done.stderr.strip() == "error: stopped mid-step"


def test_a_line_every_process_stops_with_is_printed_once_per_machine(monkeypatch, capsys):
    """Two processes on one machine that disagree stop alike, but only the machine's first says why: the
    other's line would be the same line again in the same terminal."""
    from utils import SaidByAnotherProcess, check_processes_agree, run_cli

    flags = {"--seed": "0"}
    everyone = [(0, "a", "", flags), (1, "a", "", {"--seed": "1"})]
    lines = {}
    for rank in (0, 1):
        FakeProcesses(rank, everyone, local_rank=rank).install(monkeypatch)
        with pytest.raises(UserError) as raised:
            check_processes_agree(everyone[rank][3])
        assert isinstance(raised.value, SaidByAnotherProcess) == (rank == 1)
        assert run_cli(raising(raised.value)) == 2
        lines[rank] = capsys.readouterr().err
    assert lines[0] == "error: the processes of this run do not agree on --seed: process 0 on a has 0, process 1 on a 1\n"
    assert lines[1] == ""


def exit_code(main, argv: list[str]) -> int:
    """What `python script.py ARGV` exits with: run_cli's code, or argparse's SystemExit."""
    try:
        return run_cli(main, argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("script, argv, line", [
    ("eval", ["run", "--split", "nope"], "eval.py: error: argument --split: invalid choice: 'nope'"),
    ("train", ["--folder-split", "random"], "train.py: error: argument --folder-split/--folder_split: invalid choice"),
    ("train", ["--bogus"], "error: unknown arguments --bogus; see python train.py --help"),
])
def test_a_bad_flag_under_a_launcher_is_said_by_the_first_process_of_each_machine(monkeypatch, capsys, script, argv,
                                                                                    line):
    """Every process parses the same command line, so each stops on a bad flag alike: `torchrun
    --nproc_per_node 2 eval.py RUN --split nope` printed argparse's usage and error twice."""
    import eval as eval_script

    main = {"eval": eval_script.main, "train": train.main}[script]
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])  # argparse names the script by it
    said = {}
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert exit_code(main, argv) == 2
        said[local_rank] = capsys.readouterr().err
    assert line in said["0"]
    assert said["1"] == ""


def test_the_launchers_summary_shows_the_line_each_process_stopped_with(monkeypatch, tmp_path, capsys):
    """torchrun (which accelerate launch --multi_gpu runs) ends a failed launch with its summary of the failed
    processes, after everything else, read by torch's own code here; its "traceback :" field said "To enable
    traceback see: https://..." for a process that had stopped with one line, and buried that line. Each
    process now leaves it where torchrun reads it: the quiet ones too, and a flag argparse refuses."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from utils import SaidByAnotherProcess

    def failure(rank: int, error_file: Path) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=2, error_file=str(error_file))

    failures = {}
    for rank, error in enumerate((UserError("nothing to resume"), SaidByAnotherProcess("nothing to resume"))):
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error-{rank}.json"))
        assert run_cli(raising(error)) == 2
        failures[rank] = failure(rank, tmp_path / f"error-{rank}.json")
    assert capsys.readouterr().err == "error: nothing to resume\n"  # said once, by the first process
    summary = str(ChildFailedError("train.py", failures))
    assert summary.count("traceback : error: nothing to resume") == 2 and "To enable traceback" not in summary

    monkeypatch.setattr(sys, "argv", ["train.py"])  # argparse names the script by it
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error-flag.json"))
    assert exit_code(train.main, ["--folder-split", "random"]) == 2
    summary = str(ChildFailedError("train.py", {1: failure(1, tmp_path / "error-flag.json")}))
    assert "traceback : train.py: error: argument --folder-split/--folder_split: invalid choice" in summary


def test_the_resume_hint_of_a_run_on_several_machines_names_the_machines(monkeypatch):
    """A 2-machine run stopped by a signal: `torchrun --nproc_per_node 4` would start all 4 processes on
    one machine (and `accelerate launch --num_processes 4` alone, on one machine with 2 GPUs, fails)."""
    from types import SimpleNamespace

    config = train.parse_config(["--run-name", "big", "--output-dir", "runs"])
    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    cpu = SimpleNamespace(num_processes=4, device=torch.device("cpu"))
    assert train.resume_command(config, cpu) == (
        "ACCELERATE_USE_CPU=true torchrun --nnodes 2 --nproc_per_node 2 --node_rank R --master_addr 10.0.0.1 "
        "--master_port 29500 train.py --run-name big --output-dir runs --resume on each of the 2 machines, R being "
        "its rank (0 to 1) (or another launch of 4 processes in all, on as many machines as you like)")
    gpu = SimpleNamespace(num_processes=4, device=torch.device("cuda", 0))
    assert train.resume_command(config, gpu).startswith(
        "accelerate launch -q --multi_gpu --num_machines 2 --num_processes 4 --machine_rank R --main_process_ip "
        "10.0.0.1 --main_process_port 29500 train.py --run-name big --output-dir runs --resume on each of the 2 ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one machine: the hint as before
    assert train.resume_command(config, cpu).startswith("ACCELERATE_USE_CPU=true torchrun --nproc_per_node 4 train.py")


class ThreadedMachines:
    """4 processes on 2 machines of 2, as threads: Accelerators whose reduce("max") is a real exchange."""

    def __init__(self):
        import threading

        self.barrier, self.lock, self.flags = threading.Barrier(4), threading.Lock(), {}

    def accelerator(self, rank: int):
        machines = self

        class Accelerator:
            num_processes, device = 4, torch.device("cpu")
            is_main_process, is_local_main_process = rank == 0, rank % 2 == 0

            def reduce(self, tensor, reduction):
                assert reduction == "max"
                with machines.lock:
                    machines.flags[rank] = int(tensor)
                machines.barrier.wait(timeout=10)
                result = max(machines.flags.values())
                machines.barrier.wait(timeout=10)  # all have read it before the next exchange writes
                return torch.tensor(result)

        return Accelerator()

    def run(self, process) -> None:
        import threading

        threads = [threading.Thread(target=process, args=(rank,)) for rank in (3, 2, 1, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)


def test_first_on_each_machine_runs_the_main_process_then_each_machines_first_then_the_rest():
    """The order a feature cache is filled in: 2 machines of 2 processes, each seen through its exchanges."""
    machines, order, results = ThreadedMachines(), [], {}

    def process(rank):
        def work():
            with machines.lock:
                order.append(rank)
            return rank * 10

        results[rank] = train.first_on_each_machine(machines.accelerator(rank), work)

    machines.run(process)
    assert order[0] == 0 and order[1] == 2 and sorted(order[2:]) == [1, 3], order
    assert results == {0: 0, 1: 10, 2: 20, 3: 30}


def test_a_refusal_in_the_main_process_turn_stops_every_process_with_its_line(monkeypatch):
    """The main process refuses (a run folder that exists): the others skip their turn and all stop with its
    line; before, they waited for it at a barrier, then each said another process had ended."""
    machines, ran, stopped = ThreadedMachines(), [], {}

    def agree(facts, problem="", advice=""):  # check_processes_agree's verdict: process 0's problem, for all
        raise UserError("saved_models/big exists")

    monkeypatch.setattr(train, "check_processes_agree", agree)

    def process(rank):
        def work():
            ran.append(rank)
            if rank == 0:
                raise UserError("saved_models/big exists")

        with pytest.raises(UserError) as raised:
            train.first_on_each_machine(machines.accelerator(rank), work)
        stopped[rank] = str(raised.value)

    machines.run(process)
    assert ran == [0]
    assert stopped == dict.fromkeys(range(4), "saved_models/big exists")


def test_help_unread_says_nothing_of_training():
    """`train.py --help | true`: help is no training, but the reader's leaving got the note that training went on
    (the flags were parsed inside the guard kept for a training run's output)."""
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
               "from utils import run_cli; import train; sys.exit(run_cli(train.main, ['--help']))"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        process.stdout.close()  # gone before the help is written: the imports take a second or two
        stderr = process.stderr.read()
        assert process.wait(timeout=120) == 0, stderr
    assert stderr == "", stderr  # not a word: neither the note nor a BrokenPipeError


def test_inference_flushes_each_batch_of_captions_as_it_is_done(tiny, tmp_path, monkeypatch):
    """Into a pipe, stdout is block-buffered: a long `inference.py *.jpg | consumer` showed nothing until 8 KiB of
    captions piled up or the process ended. Each batch's lines now reach the pipe before the next batch starts
    (this test's shell setting PYTHONUNBUFFERED=1 would hide the bug, so stdout is a buffered stand-in)."""
    import io

    import inference

    run = trained_run(tiny, tmp_path)
    images = [str(Path(tiny["data_dir"]) / "images" / f"test_{i:04d}.png") for i in range(3)]
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="utf-8", write_through=False))
    seen_at_start = []
    real = inference.caption_batch

    def caption_batch(*args):
        seen_at_start.append(written.getvalue().decode().count("\n"))
        return real(*args)
    monkeypatch.setattr(inference, "caption_batch", caption_batch)
    assert inference.main(["--checkpoint", str(run), "--batch-size", "1", "--no-progress", *images]) == 0
    assert seen_at_start == [0, 1, 2]


def test_a_lost_process_says_what_the_run_left_and_how_to_go_on(tiny, tmp_path, monkeypatch, capsys):
    """A collective failing because another process ended said "continue it with --resume" whatever the run
    held: without --run-name/--output-dir that resumed in the default folder, and before the first checkpoint it
    answered "nothing to resume". It now says what a signal's stop says (what_an_early_stop_left)."""
    trained_run(tiny, tmp_path)
    capsys.readouterr()

    def lost(config, on_step=None):
        raise RuntimeError("[gloo] Connection closed by peer")
    monkeypatch.setattr(train, "train", lost)
    monkeypatch.setattr("utils.lost_another_process", lambda error: "Connection closed by peer")
    said = "error: another process of this run ended (Connection closed by peer), so this one stops too; "
    assert train.train_from_config(train.TrainConfig(run_name="fresh", output_dir=str(tmp_path)), None) == 1
    assert capsys.readouterr().err == said + "the run had saved nothing yet: run the same command again (the " \
        "feature cache keeps every part it finished)\n"
    assert train.train_from_config(train.TrainConfig(run_name="run", output_dir=str(tmp_path)), None) == 1
    error = capsys.readouterr().err
    flags = shlex.join(["--run-name", "run", "--output-dir", str(tmp_path), "--resume"])
    assert error.startswith(said) and f"keeps its last complete checkpoint (continue it with python train.py {flags})" \
        in error, error
    # Under a launcher: its command, with the run's process count (a run resumes only with as many).
    shutil.copy(tmp_path / "run" / "resume" / "rng_0.json", tmp_path / "run" / "resume" / "rng_1.json")  # saved by 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert train.train_from_config(train.TrainConfig(run_name="run", output_dir=str(tmp_path)), None) == 1
    error = capsys.readouterr().err
    assert f"(continue it with ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train.py {flags} (or the launcher" \
        in error, error
    # The launcher's summary of the failed processes, printed after it, shows that line, not a link on tracebacks.
    assert read_json(tmp_path / "error.json")["message"]["message"] == error.rstrip("\n")


def test_an_error_that_stops_the_steps_is_a_line_of_its_own_after_the_progress_bar(tiny, tmp_path, capsys):
    """The bar was left open when an error stopped the steps (another process gone, a full disk): the run's one
    error line, with its resume command, went on after the bar's counts, on the bar's line."""
    def stopped(step):
        if step == 2:
            raise UserError("the disk is full")
    args = train_args(tiny, tmp_path, "stopped", "--max-steps", "3")
    args.remove("--no-progress")
    assert run_cli(lambda argv: train.main(argv, on_step=stopped), args) == 2
    err = capsys.readouterr().err
    assert "2/3" in err and "\nerror: the disk is full\n" in err, err[-1000:]


def test_a_signal_stop_leaves_its_line_for_the_launchers_summary(tiny, tmp_path, monkeypatch, capsys):
    """torchrun sums up the processes that ended non-zero last; a machine the Ctrl-C never reached showed a link
    on recording tracebacks there, not the line saying where the run stands and how to go on."""
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))

    def stopped_at_2(step):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    summary = train.train(train.parse_config(train_args(tiny, tmp_path, "stopped", "--max-steps", "4")),
                          on_step=stopped_at_2)
    assert summary["interrupted"]
    said = [line for line in capsys.readouterr().out.splitlines() if "saved a checkpoint at step 2" in line]
    assert read_json(tmp_path / "error.json")["message"]["message"] == said[-1], said


def test_a_resume_launched_with_another_process_count_and_stopped_is_told_the_saved_count(tmp_path, monkeypatch):
    """A run saved by 2 processes, resumed by `python train.py ... --resume` and stopped during start-up (before the
    count is checked): the command it gave was python's, which the saved state refuses; and the other way round."""
    state = tmp_path / "run" / "resume"
    state.mkdir(parents=True)
    for name in (train.TRAINER_STATE, "rng_0.json", "rng_1.json"):
        (state / name).write_text("{}")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    for variable in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    flags = shlex.join(["--run-name", "run", "--output-dir", str(tmp_path), "--resume"])
    left = train.what_an_early_stop_left(train.TrainConfig(run_name="run", output_dir=str(tmp_path)))
    assert f"(continue it with ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train.py {flags} (or" in left, left
    (state / "rng_1.json").unlink()  # saved by 1, resumed under a launcher of 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    left = train.what_an_early_stop_left(train.TrainConfig(run_name="run", output_dir=str(tmp_path)))
    assert f"(continue it with python train.py {flags})" in left, left


@pytest.mark.parametrize("poisoned, max_in_a_row", [({2, 4}, "2"), ({2}, "0")])
def test_nonfinite_steps_stop_the_run_only_in_a_row_and_never_under_0(tiny, tmp_path, monkeypatch, poisoned,
                                                                      max_in_a_row):
    """--max-nonfinite-steps counts NaN steps in a row: a good step between two starts the count again; 0 is off."""
    poison_calls(monkeypatch, poisoned)
    summary = train.train(train.parse_config(train_args(tiny, tmp_path, "apart", "--max-nonfinite-steps", max_in_a_row,
                                                        "--final-eval", "false", "--max-steps", "5",
                                                        "--eval-every", "0")))
    assert summary["nonfinite_steps"] == len(poisoned) and summary["step"] == 5 and not summary["interrupted"]


def test_a_resume_state_beside_the_old_copy_its_save_had_not_yet_deleted_is_the_one_resumed(tmp_path):
    """A save renames the new state in (resume/) before it deletes the one it replaced (resume.old/): a crash
    between leaves both, the old one perhaps half deleted. resume/ is whole, and the newer."""
    for name in ("resume", "resume.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / train.TRAINER_STATE).write_text("{}")
    assert train.resume_state_dir(tmp_path) == tmp_path / "resume"
    shutil.rmtree(tmp_path / "resume")
    assert train.resume_state_dir(tmp_path) == tmp_path / "resume.old"


def test_a_crash_between_the_renames_of_a_swap_leaves_the_replaced_state_whole(tmp_path, monkeypatch):
    """swap_in renames the old folder aside before the new one takes its name: a crash between the two
    renames leaves resume.old/, which --resume reads, never no state at all."""
    folder, tmp = tmp_path / "resume", tmp_path / "resume.tmp"
    for path, step in ((folder, 5), (tmp, 10)):
        path.mkdir()
        write_json(path / train.TRAINER_STATE, {"step": step})
    real_rename = Path.rename

    def killed_at_the_second_rename(self, target):
        if self == tmp:
            raise KeyboardInterrupt  # as a SIGKILL there would leave the folder
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        train.swap_in(folder, tmp)
    assert read_json(train.resume_state_dir(tmp_path) / train.TRAINER_STATE) == {"step": 5}


def test_only_a_missing_last_falls_back_to_its_old_copy(tmp_path):
    """last/ alone is swapped in by two renames (train.swap_in); another folder missing beside a NAME.old/ is not a
    crashed save, and loading it must say it is missing, not load something else."""
    from model import ADAPTER_CONFIG, checkpoint_folder

    for name in ("last", "best", "run"):
        (tmp_path / f"{name}.old").mkdir()
        (tmp_path / f"{name}.old" / ADAPTER_CONFIG).write_text("{}")
    assert checkpoint_folder(tmp_path / "last", quiet=True) == tmp_path / "last.old"
    assert checkpoint_folder(tmp_path / "best", quiet=True) == tmp_path / "best"
    assert checkpoint_folder(tmp_path / "run", quiet=True) == tmp_path / "run"
