"""Bad command-line input is one line naming the flag and what to do, never a traceback, and is
caught before any model loads: eval.py, inference.py, app.py and bench.py."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

import app
import bench
import eval as eval_script
import inference
import train
from conftest import without_loading_note
from demo import build_demo_data
from model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig
from utils import append_jsonl, run_cli, write_json, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return build_demo_data(tmp_path_factory.mktemp("data"), seed=1, split_sizes={"train": 4, "val": 2, "test": 2})


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> Path:
    """A run folder as far as the scripts look before loading a model (its config, its data); the
    backbones it names do not exist, and `no_model` makes sure nothing tries to load them."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    folder.mkdir()
    AdapterConfig(clip_model="unused/clip", lm_model="unused/lm").to_json(folder / ADAPTER_CONFIG)
    (folder / ADAPTER_WEIGHTS).write_bytes(b"")  # there, unread
    write_json(folder / "run_config.json", {"dataset": "folder", "data_dir": str(data_dir)})
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model, or training the demo run, fails the test: every check must come first."""
    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the command line was checked")

    for module, name in ((inference, "load_captioner"), (eval_script, "load_captioner"), (app, "load_run"),
                         (app, "ensure_demo_run"), (bench, "make_captioner")):
        monkeypatch.setattr(module, name, fail)


def cli_error(capsys, main, argv) -> str:
    """Run a script's main as its command line does; assert exit status 2 and exactly one error line
    (argparse may print its usage above it, eval.py and inference.py the note naming what the run folder makes
    them load, said before it loads); return that line."""
    try:
        code = run_cli(main, argv)
    except SystemExit as exit:  # argparse's parser.error
        code = exit.code
    err = without_loading_note(capsys.readouterr().err)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert "error: " in lines[-1], err
    usage = lines[:-1]  # argparse's usage: "usage: ..." and its indented continuation lines
    assert all(line.startswith(("usage:", " ")) for line in usage), err
    return lines[-1]


def image(data_dir) -> str:
    return str(next(Path(data_dir, "images").glob("test_*.png")))


# ----------------------------------------------------------------------------------------------
# --device
# ----------------------------------------------------------------------------------------------

def script_argv(script, run, data_dir, *flags) -> list[str]:
    if script is inference:
        return ["--checkpoint", str(run), *flags, image(data_dir)]
    if script is eval_script:
        return [str(run), *flags]
    return ["--checkpoint", str(run), *flags]


@pytest.mark.parametrize("script", [inference, eval_script, app], ids=["inference", "eval", "app"])
def test_unavailable_or_unknown_device(script, run, data_dir, no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", "mps", "banana", "meta"):
        line = cli_error(capsys, script.main, script_argv(script, run, data_dir, "--device", device))
        assert f"--device {device}" in line.replace("'", "") and "use one of: auto, cpu" in line, line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = cli_error(capsys, script.main, script_argv(script, run, data_dir, "--device", "cuda:3"))
    assert "--device cuda:3" in line and "2 CUDA device(s)" in line and "cuda:1" in line, line


def test_a_checkpoint_named_by_one_of_its_files_points_to_the_folder(run, data_dir, no_model, capsys):
    line = cli_error(capsys, inference.main, ["--checkpoint", str(run / "adapter_config.json"), image(data_dir)])
    assert line.endswith(f"{run / 'adapter_config.json'} is a file: --checkpoint names the run folder (here {run})")


@pytest.mark.parametrize("script", ["inference", "app", "eval"])
def test_a_checkpoint_that_does_not_exist_is_said_so(script, tmp_path, data_dir, no_model, monkeypatch, capsys):
    # inference.py said "adapter_config.json not found", app.py "not a run folder": both sent people looking
    # inside a folder that was never there (a typo in its name).
    monkeypatch.setattr(app, "import_gradio", lambda: None)
    monkeypatch.setattr(app, "check_can_serve", lambda host, port: None)
    missing = tmp_path / "saved_models" / "typo"
    argv = {"inference": ["--checkpoint", str(missing), image(data_dir)], "app": ["--checkpoint", str(missing)],
            "eval": [str(missing)]}[script]
    line = cli_error(capsys, {"inference": inference.main, "app": app.main, "eval": eval_script.main}[script], argv)
    assert f"{missing} does not exist" in line, line


def test_an_evaluations_folder_inside_a_run_is_said_to_be_one(run, data_dir, tmp_path, no_model, capsys):
    """RUN/eval-val/ (eval.py RUN --split val writes there) given as the run: "not a run folder" did not say
    whose it is."""
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "eval-val").mkdir()
    (folder / "eval-val" / "metrics.json").write_text("{}")
    for script, argv in ((inference, ["--checkpoint", str(folder / "eval-val"), image(data_dir)]),
                         (eval_script, [str(folder / "eval-val")])):
        line = cli_error(capsys, script.main, argv)
        assert line.endswith(f"{folder / 'eval-val'} holds an evaluation's outputs, not a run: give its run folder, "
                             f"{folder}"), line


def test_app_names_a_bad_host_or_a_taken_port_before_loading(run, no_model, capsys):
    import socket

    line = cli_error(capsys, app.main, ["--checkpoint", str(run), "--host", "999.1.1.1"])
    assert "--host 999.1.1.1 is not an address this machine knows" in line, line  # was blamed on the port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = cli_error(capsys, app.main, ["--checkpoint", str(run), "--port", str(port)])
    assert line.endswith(f"port {port} on 127.0.0.1 is in use; pick another --port"), line


def test_app_checks_the_device_before_training_a_demo_run(no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, app.main, ["--device", "cuda"])  # no --checkpoint: the demo run would be trained
    assert "--device cuda" in line, line


def test_known_devices_still_parse(monkeypatch):
    assert eval_script.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert eval_script.pick_device("cuda:1") == torch.device("cuda:1")
    assert eval_script.pick_device("auto") == torch.device("cuda")


# ----------------------------------------------------------------------------------------------
# Numeric flags out of range: argparse's one-line error, naming the flag
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"),  # was range()'s ValueError traceback
    ("--batch-size", "-1"),  # was: nothing captioned, exit status 0
    ("--seed", str(2**64)),  # was torch.manual_seed's overflow traceback
    ("--num-beams", "100000"),  # sat for minutes allocating 100,000 KV caches before anything failed
    ("--num-beams", "1"),  # beam search of width 1 is greedy under another name
])
def test_inference_numeric_flags(flag, value, run, data_dir, no_model, capsys):
    line = cli_error(capsys, inference.main, ["--checkpoint", str(run), flag, value, image(data_dir)])
    assert f"argument {flag}: expected a whole number" in line and repr(value) in line, line


def test_sampling_temperature_must_be_finite(run, data_dir, no_model, capsys):
    line = cli_error(capsys, inference.main, ["--checkpoint", str(run), "--strategy", "sample", "--temperature", "inf",
                                              image(data_dir)])
    assert "sampling needs a finite temperature > 0" in line and "inf" in line, line


def test_a_strategys_own_flag_implies_it_and_a_stray_one_is_an_error(run, data_dir, no_model, capsys):
    """`--num-beams 5` alone used to decode greedily, the flag silently ignored."""
    def decoding(*flags):
        args = inference.build_parser().parse_args(["--checkpoint", "c", *flags, "x.png"])
        return eval_script.decoding_from_args(args)

    assert (decoding().strategy, decoding().num_beams, decoding().temperature) == ("greedy", 3, 0.7)
    assert (decoding("--num-beams", "5").strategy, decoding("--num-beams", "5").num_beams) == ("beam", 5)
    assert decoding("--temperature", "0.5").strategy == decoding("--top-p", "0.8").strategy == "sample"
    assert decoding("--strategy", "sample").top_p == 0.9
    line = cli_error(capsys, inference.main, ["--checkpoint", str(run), "--strategy", "greedy", "--num-beams", "5",
                                              image(data_dir)])
    assert "--num-beams applies to --strategy beam, not greedy" in line, line
    line = cli_error(capsys, inference.main, ["--checkpoint", str(run), "--num-beams", "5", "--top-p", "0.8",
                                              image(data_dir)])
    assert "give one kind, or --strategy" in line, line


@pytest.mark.parametrize("flags, said", [
    (["--seed", "5"], "note: --seed 5 changes nothing: only --strategy sample draws random numbers, not greedy"),
    (["--strategy", "beam", "--seed", "5"], "note: --seed 5 changes nothing: only --strategy sample draws random "
                                            "numbers, not beam"),
    (["--strategy", "sample", "--seed", "5"], ""),
    (["--seed", "0"], "note: --seed 0 changes nothing"),  # the default's value, given: told from the default
    ([], ""),
    (["--compile", "--strategy", "beam"], "note: --compile speeds up greedy decoding only; --strategy beam decodes "
                                          "eagerly"),
    (["--compile", "--strategy", "sample"], "note: --compile speeds up greedy decoding only; --strategy sample "
                                            "decodes eagerly"),
])
def test_inference_notes_a_decoding_flag_that_changes_nothing(flags, said, run, tmp_path, no_model, capsys):
    """Each was taken without a word. Before any model loads: here no image can be read, so none loads."""
    assert run_cli(inference.main, ["--checkpoint", str(run), *flags, str(tmp_path / "missing.png")]) == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ([] if not said else [notes[0]]) and (not said or notes[0].startswith(said)), notes


def test_eval_notes_a_seed_only_where_no_decoding_samples(capsys):
    def seed(*flags):
        args = eval_script.build_parser().parse_args(["RUN", *flags])
        decodings = [eval_script.decoding_from_args(args)]
        if args.decoding_sweep:
            decodings += eval_script.SWEEP_DECODINGS
        return eval_script.seed_from_args(args, decodings), capsys.readouterr().err

    assert seed() == (0, "")  # left out: the default, without a word
    assert seed("--seed", "7", "--num-beams", "5") == (7, "note: --seed 7 changes nothing: only --strategy sample "
                                                          "draws random numbers, not beam\n")
    assert seed("--seed", "7", "--decoding-sweep") == (7, "")  # the sweep's nucleus row samples
    assert seed("--seed", "7", "--top-p", "0.5") == (7, "")


def test_app_notes_an_output_dir_given_with_checkpoints(capsys):
    """--output-dir is where the demo run is looked for; with --checkpoint it was taken without a word."""
    def output_dir(*flags):
        return app.output_dir_from_args(app.build_parser().parse_args(list(flags))), capsys.readouterr().err

    assert output_dir() == ("saved_models", "")
    assert output_dir("--output-dir", "runs") == ("runs", "")
    assert output_dir("--checkpoint", "a", "--output-dir", "runs") == (
        "runs", "note: --output-dir runs changes nothing: it is where the demo run is looked for, and --checkpoint "
                "names the runs to serve\n")
    assert "(default: saved_models)" in " ".join(app.build_parser().format_help().split())


@pytest.mark.parametrize("flag, value, meaning", [
    ("--limit", "-1", "0 = all"),  # was silently "all"
    ("--gallery-size", "-2", "0 = every image"),  # was silently "every image"
    ("--num-workers", "-1", "0 = decode in this process"),  # was DataLoader's ValueError traceback
    ("--seed", str(-(2**64)), ""),
    ("--max-new-tokens", "100000000", "from 1 to 1024"),  # was a 24 GB allocation, then the kernel's kill
])
def test_eval_numeric_flags(flag, value, meaning, run, no_model, capsys):
    line = cli_error(capsys, eval_script.main, [str(run), flag, value, "--no-progress"])
    assert f"argument {flag}: expected a whole number" in line and repr(value) in line and meaning in line, line


def test_in_range_values_still_parse():
    args = eval_script.build_parser().parse_args(["RUN", "--limit", "0", "--num-workers", "0", "--gallery-size", "3",
                                                  "--seed", "-1", "--batch-size", "1"])
    assert (args.limit, args.num_workers, args.gallery_size, args.seed, args.batch_size) == (0, 0, 3, -1, 1)
    assert inference.build_parser().parse_args(["--checkpoint", "RUN", "--batch-size", "1", "x.png"]).batch_size == 1
    # A bound is a value the flag takes: the largest seed numpy's generators accept.
    import demo

    assert demo.build_parser().parse_args(["data", "--out", "x", "--seed", str(2**32 - 1)]).seed == 2**32 - 1



@pytest.mark.parametrize("flag, value", [
    ("--examples", "-1"),  # was silently no examples
    ("--max-megapixels", "nan"),  # was silently no limit: every size compares False with nan
    ("--max-upload-mb", "inf"),  # was OverflowError from int(inf) at launch, after the models loaded
    ("--max-megapixels", "0"),  # refused before too, by a check in main() that is now the flag's type
    ("--port", "70000"),  # likewise
    ("--max-upload-mb", "1e300"),  # was a TypeError traceback in every request: Gradio takes a 64-bit byte count
])
def test_app_numeric_flags(flag, value, run, no_model, capsys):
    line = cli_error(capsys, app.main, ["--checkpoint", str(run), flag, value])
    assert flag in line, line


# ----------------------------------------------------------------------------------------------
# Empty values (an unset "$VAR"): refused, not read as "." or as the flag left out
# ----------------------------------------------------------------------------------------------

def test_an_empty_image_argument_is_refused_not_read_as_the_current_folder(run, data_dir, no_model, monkeypatch,
                                                                          capsys):
    """inference.py --checkpoint RUN "$PHOTO" with PHOTO unset captioned every image under the current folder."""
    monkeypatch.chdir(data_dir)  # a folder of images, which "" stood for
    for images in ([image(data_dir), ""], ["", image(data_dir)]):  # wherever it stands among them
        line = cli_error(capsys, inference.main, ["--checkpoint", str(run), *images])
        assert line == ('error: an image argument is empty (an unset shell variable?): name an image, a folder ("." '
                        'for this one) or - for paths on standard input'), line


def test_inference_with_stdout_closed_stops_before_captioning(run, data_dir, no_model, monkeypatch, capsys):
    """Started with `>&-`, print() dropped every caption in silence and the exit status was 0."""
    monkeypatch.setattr("sys.stdout", None)
    line = cli_error(capsys, inference.main, ["--checkpoint", str(run), image(data_dir)])
    assert line == ("error: standard output is closed, so the captions would be lost: redirect it to a file "
                    "(> captions.txt) or leave it open"), line


@pytest.mark.parametrize("script, flag", [(eval_script, "--out"), (eval_script, "--clip-model"),
                                          (inference, "--lm-model")])
def test_an_empty_folder_flag_is_refused_not_read_as_left_out(script, flag, run, data_dir, no_model, capsys):
    """eval.py RUN --out "$OUT" with OUT unset wrote into the run folder, over the metrics.json there."""
    line = cli_error(capsys, script.main, script_argv(script, run, data_dir, flag, ""))
    assert line.endswith(f"argument {flag}: expected a folder or name, got '' (an unset shell variable?); leave the "
                         "flag out for its default"), line

@pytest.mark.parametrize("script", ["inference", "eval", "app"])
def test_an_empty_checkpoint_is_refused_not_read_as_the_current_folder(script, data_dir, no_model, capsys):
    # "$RUN" unset: the current folder, and a vague "adapter_config.json not found" in it.
    argv = {"inference": ["--checkpoint", "", image(data_dir)], "eval": [""], "app": ["--checkpoint", ""]}[script]
    line = cli_error(capsys, {"inference": inference.main, "eval": eval_script.main, "app": app.main}[script], argv)
    assert line.endswith("expected a run folder, got '' (an unset shell variable?)"), line


# ----------------------------------------------------------------------------------------------
# eval.py --out
# ----------------------------------------------------------------------------------------------

def test_eval_refuses_data_flags_its_source_would_ignore(run, data_dir, no_model, capsys):
    assert "--hub-data-files is read by --dataset flickr30k only, and this run reads --dataset folder" in cli_error(
        capsys, eval_script.main, [str(run), "--hub-data-files", "mine/*.parquet"])
    assert "but --dataset flickr30k reads the Hub's parquet files" in cli_error(
        capsys, eval_script.main, [str(run), "--dataset", "flickr30k", "--data-dir", str(data_dir)])
    # An empty --data-dir is not "the run's own": leaving the flag out is.
    assert "--data-dir is empty" in cli_error(capsys, eval_script.main, [str(run), "--data-dir", ""])


def test_eval_out_must_be_a_folder(run, no_model, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(a_file), "--no-progress"])
    assert f"--out {a_file} is a file" in line and "give a folder" in line, line  # was FileExistsError at the end
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(a_file / "sub"), "--no-progress"])
    assert f"is inside {a_file}, which is a file" in line, line
    # --compare writes there too
    line = cli_error(capsys, eval_script.main, ["--compare", str(run), str(run), "--out", str(a_file)])
    assert f"--out {a_file} is a file" in line, line


def test_eval_out_never_replaces_a_file_of_the_users(run, no_model, tmp_path, capsys):
    """eval.py RUN --out FOLDER replaced the report.html or metrics.json FOLDER held (and deleted a curve_loss.png
    or decoding_sweep.json of that name), whoever had written it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, content in (("report.html", "<p>my page</p>"), ("metrics.json", '{"mine": 1}'),
                          ("curve_loss.png", "my plot")):
        (mine / name).write_text(content)
        line = cli_error(capsys, eval_script.main, [str(run), "--out", str(mine), "--no-progress"])
        assert line == (f"error: --out {mine} holds a {name} that is no output of eval.py, and would be replaced: "
                        "give a folder of its own for the outputs (it is made if need be)"), line
        assert (mine / name).read_text() == content
        (mine / name).unlink()
    # --compare's own files likewise; and a comparison written beside the user's page makes it no evaluation's
    (mine / "report.html").write_text("<p>my page</p>")
    (mine / "comparison.md").write_text("my notes")
    line = cli_error(capsys, eval_script.main, ["--compare", str(run), "--out", str(mine)])
    assert f"--out {mine} holds a comparison.md that is no output of eval.py" in line, line
    (mine / "comparison.md").unlink()
    write_json(mine / "comparison.json", {"header": [], "rows": [], "runs": [], "notes": []})  # as --compare wrote
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(mine), "--no-progress"])
    assert f"--out {mine} holds a report.html that is no output of eval.py" in line, line


def test_eval_out_is_no_image_folder_nor_a_file_name(run, data_dir, no_model, tmp_path, capsys):
    """--out among the data's images (the curve PNGs then taken for images of the set), or named like a file
    (`--out results.json` made a folder of that name): refused before any work, and nothing made there."""
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(data_dir / "images"), "--no-progress"])
    assert line.startswith(f"error: --out {data_dir / 'images'} holds images (first: "), line
    photos = tmp_path / "photos"  # a folder of one's own photos alike
    photos.mkdir()
    Image.new("RGB", (4, 4)).save(photos / "cat.JPG")
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(photos), "--no-progress"])
    assert f"--out {photos} holds images (first: cat.JPG)" in line, line
    before = sorted(data_dir.rglob("*"))
    for out, said in ((data_dir / "eval", f"is inside the data folder {data_dir}"), (data_dir, "is the data folder")):
        line = cli_error(capsys, eval_script.main, [str(run), "--out", str(out), "--no-progress"])
        assert line == f"error: --out {out} {said}: give a folder outside it for the outputs", line
    assert sorted(data_dir.rglob("*")) == before  # its --out folder was made at the first check, and left there
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(tmp_path / "results.json"), "--no-progress"])
    assert f"--out {tmp_path / 'results.json'} names a file, but the outputs are several files" in line, line
    assert not (tmp_path / "results.json").exists()


def test_eval_of_a_run_folder_without_its_weights_is_one_line(run, no_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (ADAPTER_CONFIG, "run_config.json"):  # its weights deleted, or never copied beside them
        shutil.copy(run / name, bare / name)
    line = cli_error(capsys, eval_script.main, [str(bare), "--no-progress"])
    assert f"{bare / ADAPTER_WEIGHTS} not found" in line, line  # was FileNotFoundError, a traceback


def test_eval_out_is_not_another_runs_folder(run, no_model, tmp_path, capsys):
    """eval.py A --out B wrote A's figures into B's metrics.json, where B's own had been."""
    import shutil

    other = Path(shutil.copytree(run, tmp_path / "other"))
    last = Path(shutil.copytree(run, other / "last"))  # the last step's adapter, whose figures are not the run's
    for checkpoint, out in ((run, other), (last, other)):
        line = cli_error(capsys, eval_script.main, [str(checkpoint), "--out", str(out), "--no-progress"])
        assert f"--out {out} is another run's folder: its metrics.json would hold {checkpoint}'s figures" in line, line
    # The run's own folder, however it is spelled, is no other run's.
    (tmp_path / "link").symlink_to(other)
    for out in (other, tmp_path / "link", last / ".."):
        eval_script.check_outputs_can_be_written(other, str(out))


def test_eval_out_must_be_writable(run, no_model, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    # Permissions do not stop root (these tests may run as root): the folder is made unwritable this way.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    line = cli_error(capsys, eval_script.main, [str(run), "--out", str(locked / "eval"), "--no-progress"])
    assert f"cannot write in {locked}" in line, line  # was PermissionError at the end
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # a place where no folder can be made, even by root
        line = cli_error(capsys, eval_script.main, [str(run), "--out", "/proc/nope/eval", "--no-progress"])
        assert "--out /proc/nope/eval" in line, line  # was FileNotFoundError after all the captioning



def test_eval_checks_its_default_output_folder_before_any_work(run, no_model, tmp_path, monkeypatch, capsys):
    import shutil

    copied = Path(shutil.copytree(run, tmp_path / "copied"))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != copied)  # as a read-only disk answers
    line = cli_error(capsys, eval_script.main, [str(copied), "--no-progress"])
    assert f"{copied} cannot be written" in line and "pass --out FOLDER" in line, line


def test_eval_of_another_split_checks_its_own_folder_in_the_run_before_any_work(run, no_model, tmp_path, monkeypatch,
                                                                             capsys):
    """--split val writes into RUN/eval-val/ (not over the run's test figures): that folder is checked as --out is."""
    import shutil

    copied = Path(shutil.copytree(run, tmp_path / "copied"))
    (copied / "eval-val").write_text("mine")
    line = cli_error(capsys, eval_script.main, [str(copied), "--split", "val", "--no-progress"])
    assert line == (f"error: {copied / 'eval-val'} (where --split val writes unless --out says otherwise) is a file: "
                    "give a folder for the outputs (it is made if need be)"), line
    (copied / "eval-train").mkdir()
    (copied / "eval-train" / "report.html").write_text("<p>my page</p>")
    line = cli_error(capsys, eval_script.main, [str(copied), "--split", "train", "--no-progress"])
    assert f"{copied / 'eval-train'} (where --split train writes unless --out says otherwise) holds a report.html " \
           "that is no output of eval.py" in line, line
    assert (copied / "eval-train" / "report.html").read_text() == "<p>my page</p>"
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != copied / "eval-train")
    (copied / "eval-train" / "report.html").unlink()
    line = cli_error(capsys, eval_script.main, [str(copied), "--split", "train", "--no-progress"])
    assert f"cannot write in {copied / 'eval-train'}" in line, line


# ----------------------------------------------------------------------------------------------
# eval.py and an unreadable image: advice that is true of eval.py
# ----------------------------------------------------------------------------------------------

def test_eval_bad_image_message_offers_eval_s_own_flag(tiny, checkpoint, tmp_path, capsys):
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    first, second = sorted((data / "images").glob("test_*.png"))[:2]
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    second.write_bytes(b"")
    for workers in ("0", "2"):
        line = cli_error(capsys, eval_script.main, [str(checkpoint), "--dataset", "folder", "--data-dir", str(data),
                                                    "--no-progress", "--num-workers", workers])
        assert str(first) in line and "and 1 more unreadable images" in line, line
        assert "fix them or remove them from the split" in line, line
        # eval.py's own flag (it used to name train.py's, which leaves images out of training only).
        assert "or leave them out of the scores with --on-bad-sample skip" in line and "train.py" not in line, line


# ----------------------------------------------------------------------------------------------
# bench.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--batches", "0"),  # was RuntimeError from a reshape of an empty batch
    ("--batches", "abc"),  # was int()'s ValueError traceback
    ("--batches", "4,,8"),  # likewise
    ("--naive-batches", "0"),  # was the reshape's RuntimeError
    ("--repeats", "0"),  # was ZeroDivisionError (GPU) / StatisticsError (CPU)
    ("--repeats", "-1"),
    ("--generate-batch", "-1"),  # was torch.randn's RuntimeError in the generate section
    ("--variants", "max-autotune@x"),  # was int()'s ValueError, on a GPU, after the other measurements
])
def test_bench_flags(flag, value, no_model, capsys):
    line = cli_error(capsys, bench.main, ["--shapes", "tiny", "--only", "train,generate", flag, value])
    assert f"argument {flag}: expected" in line and repr(value) in line, line


@pytest.mark.parametrize("flag, value, message", [
    ("--only", "", "argument --only: name at least one of train"),  # measured nothing, exit status 0
    ("--variants", "foo@4", "argument --variants: unknown variant 'foo'; choose from default"),  # never validated
])
def test_bench_flags_that_would_measure_nothing(flag, value, message, no_model, capsys):
    line = cli_error(capsys, bench.main, ["--shapes", "tiny", flag, value])
    assert message in line, line


def test_bench_targets_from_refuses_flags_that_would_measure_nothing(tmp_path, capsys):
    """--targets-from measures nothing: --shapes real or --compile beside it were taken without a word."""
    line = cli_error(capsys, bench.main, ["--targets-from", str(tmp_path / "a.jsonl"), "--shapes", "real", "--compile"])
    assert line == ("error: --targets-from measures nothing, so --shapes, --compile would do nothing: give them to "
                    "the runs that measure, or leave them out"), line


@pytest.mark.parametrize("flags, said", [
    (["--only", "extract", "--generate-batch", "4"], ["note: --generate-batch changes nothing: it is for the generate "
                                                      "section, and --only names extract"]),
    (["--only", "extract,latency", "--batches", "4", "--naive-batches", "2"], [
        "note: --batches changes nothing: it is for the train, loss, quantized sections, and --only names "
        "extract,latency",
        "note: --naive-batches changes nothing: it is for the train section, and --only names extract,latency"]),
    (["--only", "train", "--profile"], ["note: --profile changes nothing: it profiles the compiled training step "
                                        "(--compile) on a GPU"]),
    (["--only", "loss", "--batches", "4"], []),  # the loss section's rows come from the largest batch
    (["--only", "latency", "--compile"], []),
])
def test_bench_notes_flags_the_chosen_sections_do_not_use(flags, said, no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = bench.build_parser().parse_args(["--shapes", "tiny", *flags])
    bench.check_args(args)
    assert capsys.readouterr().err.splitlines() == said


def test_app_serves_every_checkpoint_given(no_model):
    args = app.build_parser().parse_args(["--checkpoint", "a", "--checkpoint", "b", "c"])
    assert args.checkpoint == ["a", "b", "c"]  # a second --checkpoint used to replace the first


def test_bench_device(no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, bench.main, ["--shapes", "tiny", "--device", "cuda"])  # was an AssertionError
    assert "--device cuda" in line and "use one of: auto, cpu" in line, line


def test_bench_out(no_model, tmp_path, capsys):
    # Was IsADirectoryError / FileNotFoundError at the end of the run, its measurements lost.
    for out in (tmp_path, tmp_path / "missing" / "bench.jsonl"):
        line = cli_error(capsys, bench.main, ["--shapes", "tiny", "--out", str(out)])
        assert f"--out {out}: give a file in an existing folder" in line, line


def test_bench_flags_still_parse():
    args = bench.build_parser().parse_args(["--batches", "4,8", "--variants", "reduce-overhead@256,full-logits",
                                            "--only", "train,loss"])
    assert args.batches == [4, 8] and args.naive_batches == [] and args.generate_batch is None
    assert args.variants == [("reduce-overhead", 256), ("full-logits", None)] and args.only == ["train", "loss"]


def test_eval_says_what_is_wrong_with_the_run_or_data_path(run, data_dir, tmp_path, no_model, capsys):
    line = cli_error(capsys, eval_script.main, [str(tmp_path / "nowhere")])
    assert line.endswith(f"{tmp_path / 'nowhere'} does not exist: give a run folder (python eval.py saved_models/RUN)")
    line = cli_error(capsys, eval_script.main, [str(run / "adapter_config.json")])
    assert line.endswith(f"is a file: eval.py takes the run folder (here {run})"), line
    captions = next(Path(data_dir).glob("captions.*"))
    line = cli_error(capsys, eval_script.main, [str(run), "--data-dir", str(captions), "--no-progress"])
    assert f"--data-dir {captions} is a file: name the folder that holds it ({data_dir})" in line, line


def test_bench_out_that_cannot_be_written_is_one_line(capsys):
    # A folder that exists and takes no new files (even for root): was open()'s FileNotFoundError traceback.
    line = cli_error(capsys, bench.main, ["--shapes", "tiny", "--out", "/proc/bench.jsonl"])
    assert "--out /proc/bench.jsonl cannot be written" in line, line


def importing_torch(pid: int) -> bool:
    """Whether the process has begun `import torch` (its C library is mapped): the seconds in which a
    Ctrl-C used to print the import machinery's traceback."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc to see the import begin")
@pytest.mark.parametrize("script", ["train.py", "eval.py", "inference.py", "app.py", "bench.py", "demo.py"])
def test_ctrl_c_while_a_script_imports_ends_quietly(script):
    """Ctrl-C in the first seconds, before run_cli's handler exists, ends the process as the shell
    expects (killed by SIGINT) with no traceback."""
    import signal
    import subprocess
    import sys
    import time

    started = subprocess.Popen([sys.executable, script, "--help"], cwd=Path(__file__).resolve().parents[1],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not importing_torch(started.pid) and started.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    started.send_signal(signal.SIGINT)
    out, err = started.communicate(timeout=60)
    assert "Traceback" not in err, err[-2000:]
    assert started.returncode == -signal.SIGINT, (started.returncode, out[-500:], err[-500:])


def test_a_library_module_run_as_a_script_names_the_scripts():
    """`python model.py --help` used to print nothing and exit 0: it now says which files are scripts."""
    import subprocess
    import sys

    modules = ["model.py", "dataset.py", "metrics.py", "utils.py", "report.py"]
    runner = ("import runpy, sys\n"
              "for module in sys.argv[1:]:\n"
              "    try:\n"
              "        runpy.run_path(module, run_name='__main__')\n"
              "        print(module, 'ran to its end')\n"
              "    except SystemExit as stop:\n"
              "        print(stop.code)\n")
    done = subprocess.run([sys.executable, "-c", runner, *modules], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(modules), done.stdout + done.stderr[-2000:]
    for module, line in zip(modules, lines):
        assert line.startswith(f"{module} is a library module, not a script: run train.py, eval.py"), line


def test_train_py_runs_under_a_profiler():
    """`python -m cProfile train.py ...` (issue 3 asks for profiles) runs the script under a module that is not
    sys.modules["__main__"]: HfArgumentParser, looking TrainConfig's field types up there, failed before parsing."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", os.devnull, "train.py", "--help"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--run-name" in done.stdout, done.stderr[-2000:]


def test_eval_of_a_split_the_data_lacks_names_the_splits_it_has(run, data_dir, tmp_path, no_model, capsys):
    # A caption folder of one's own with only validation images: "no images" alone did not say what to change.
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(next((Path(data_dir) / "images").glob("*.png")), folder / "a.png")
    (folder / "captions.csv").write_text("image,caption,split\na.png,a red square,validation\n")
    line = cli_error(capsys, eval_script.main, [str(run), "--data-dir", str(folder)])
    assert line == f"error: the test split of folder {folder} has no images with captions; pass --split val (1 image)"


def test_an_image_named_like_a_flag_gets_an_error_saying_how_to_pass_it(run, tmp_path, monkeypatch, no_model, capsys):
    # argparse takes "-x.png" for a flag: alone, its error did not even name the file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.png").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    hint = "-x.png is a file: put -- before the images (inference.py --checkpoint RUN -- -x.png) or write ./-x.png"
    for images in (["-x.png"], ["a.png", "-x.png"]):
        assert cli_error(capsys, inference.main, ["--checkpoint", str(run), *images]).endswith(hint)
    # A misspelt flag is no file: argparse's own error, unchanged.
    assert cli_error(capsys, inference.main, ["--checkpoint", str(run), "--jsn", "a.png"]).endswith(
        "error: unrecognized arguments: --jsn")


# ----------------------------------------------------------------------------------------------
# Runs trained by older versions of this project
# ----------------------------------------------------------------------------------------------

def test_a_run_on_an_older_versions_gone_demo_assets_says_to_train_a_new_demo(data_dir, tmp_path, capsys):
    """A demo run trained before DEMO_VERSION was bumped names backbones and data in demo-v1 of the
    cache; with that folder gone (a cleared cache, another machine) the scripts said to put the folder
    back or pass its new place, which no one can: only that older version builds it."""
    import dataclasses

    from safetensors.torch import save_file

    import demo
    import train
    from utils import cache_home

    older = cache_home() / f"demo-v{demo.DEMO_VERSION - 1}"
    clip, lm, data = (str(older / "backbones" / "clip"), str(older / "backbones" / "lm"), str(older / "data"))
    run = tmp_path / "demo"
    run.mkdir()
    AdapterConfig(clip_model=clip, lm_model=lm).to_json(run / ADAPTER_CONFIG)
    save_file({"weight": torch.zeros(1)}, str(run / "adapter.safetensors"))
    config = train.TrainConfig(run_name="demo", output_dir=str(tmp_path), demo=True, dataset="folder",
                               data_dir=data, clip_model=clip, lm_model=lm)
    write_json(run / "run_config.json", dataclasses.asdict(config))
    said = f"older version of this project (demo-v{demo.DEMO_VERSION - 1}), which this version no longer builds"
    fix = "train a new demo run with python train.py --demo"
    resume = ["--resume", "--run-name", "demo", "--output-dir", str(tmp_path), "--no-progress"]
    for main, argv in ((inference.main, ["--checkpoint", str(run), image(data_dir)]),
                       (eval_script.main, [str(run), "--limit", "2"]), (train.main, resume)):
        line = cli_error(capsys, main, argv)
        assert said in line and line.endswith(fix), line
    assert not (older.parent / f"demo-v{demo.DEMO_VERSION}").exists()  # nothing was built on the way


# ----------------------------------------------------------------------------------------------
# A full disk or read-only folder where a script writes
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="needs /dev/full, where every write fails with ENOSPC")
def test_a_log_line_on_a_full_disk_names_its_file():
    """A write's (or close's) OSError names no file: on a full tmpfs, train.py's line named only the run folder
    ("cannot write RUN (No space left on device)"), not its train_log.jsonl. /dev/full is appended to, never
    replaced: write_text's rename would put a file in its place."""
    import errno

    with pytest.raises(OSError) as raised:
        append_jsonl("/dev/full", {"type": "train", "step": 1})
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, "/dev/full")


def test_a_replaced_file_on_a_full_disk_names_the_file_written(tmp_path, monkeypatch):
    """write_text's write names no file either: the line names the file it was writing (RUN/x.json.tmp)."""
    import errno

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as raised:
        write_json(tmp_path / "run_config.json", {})
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "run_config.json.tmp"))


def test_a_full_disk_anywhere_a_script_writes_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    """The checkpoint saves say more themselves (test_resilience); any other write, here the run's
    config at its start, used to end in json's traceback."""
    import errno

    import train
    from conftest import train_args

    real_write_json = train.write_json

    def disk_full(path, data):
        if Path(path).name == train.RUN_CONFIG:
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")
        return real_write_json(path, data)

    monkeypatch.setattr(train, "write_json", disk_full)
    line = cli_error(capsys, train.main, train_args(tiny, tmp_path, "full", "--max-steps", "2"))
    assert line == (f"error: cannot write {tmp_path / 'full' / 'run_config.json.tmp'} (No space left on device); "
                    "free some space (or use a writable folder) and run the command again"), line

    def missing(argv):  # not the disk: a bug's traceback stays a traceback
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        run_cli(missing, [])


def test_a_small_folder_dealt_no_training_image_stops_train_py_in_one_line_before_a_model_loads(tmp_path, capsys,
                                                                                               monkeypatch):
    """3 images without a split can all be dealt to val and test (these names' hashes under the default seed):
    that ended in "no training images with captions found" once the backbones had loaded, which said neither
    why nor what to do."""
    data = tmp_path / "data"
    data.mkdir()
    names = ["img20.png", "img23.png", "img31.png"]  # val, test, val
    for name in names:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(data / name)
    write_jsonl(data / "captions.jsonl", [{"image": name, "caption": f"picture {name}"} for name in names])

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the data was checked")

    monkeypatch.setattr(train, "build_captioner", fail)
    line = cli_error(capsys, train.main, ["--dataset", "folder", "--data-dir", str(data), "--clip-model",
                                          str(tmp_path / "clip"), "--lm-model", str(tmp_path / "lm"),
                                          "--output-dir", str(tmp_path / "runs"), "--run-name", "small"])
    assert line.startswith(f"error: {data}: no image is left to train on: its 3 images without a split were all "
                           "dealt to val and test"), line
    assert "add images" in line and "name each image's split in the caption file" in line, line
    assert not (tmp_path / "runs" / "small").exists()


def test_a_caption_folder_whose_file_names_no_training_image_stops_train_py_in_one_line_before_a_model_loads(
        tmp_path, capsys, monkeypatch):
    """Every image the caption file names is in val or test: nothing to train on, said before the backbones load."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(data / name)
    write_jsonl(data / "captions.jsonl", [{"image": "a.png", "caption": "a red square", "split": "val"},
                                          {"image": "b.png", "caption": "a red square", "split": "test"}])

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the data was checked")

    monkeypatch.setattr(train, "build_captioner", fail)
    line = cli_error(capsys, train.main, ["--dataset", "folder", "--data-dir", str(data), "--clip-model",
                                          str(tmp_path / "clip"), "--lm-model", str(tmp_path / "lm"),
                                          "--output-dir", str(tmp_path / "runs"), "--run-name", "none"])
    assert line == f"error: no training images with captions found in folder {data}", line


# ----------------------------------------------------------------------------------------------
# A caption budget past the language model's context
# ----------------------------------------------------------------------------------------------

def over_the_context(tiny) -> tuple[int, int]:
    """(a caption budget that with the default 10 prefix tokens runs past the tiny LM's context, that context)."""
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(tiny["lm_model"]).max_position_embeddings
    return context - 10 + 1, context


def test_train_refuses_max_caption_tokens_past_the_lm_context_before_any_features(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """It was refused only at the first validation, steps into the run, and as "--max-new-tokens", a flag
    train.py does not have."""
    from conftest import train_args

    def fail(*args, **kwargs):
        pytest.fail("features were extracted before the caption budget was checked")

    monkeypatch.setattr(train, "make_pairs", fail)
    tokens, context = over_the_context(tiny)
    line = cli_error(capsys, train.main, train_args(tiny, tmp_path, "long", "--max-caption-tokens", str(tokens)))
    assert line == (f"error: --max-caption-tokens {tokens} and the 10 prefix tokens exceed the language model's "
                    f"{context}-token context; use at most {context - 10}"), line
    assert not (tmp_path / "long").exists()  # no run folder left behind to refuse the corrected command


def test_eval_refuses_max_new_tokens_past_the_lm_context_before_captioning(tiny, checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    """It was refused at the first batch, after the split's and the baseline's features were extracted."""
    def fail(*args, **kwargs):
        pytest.fail("eval.py started captioning before the caption budget was checked")

    monkeypatch.setattr(eval_script, "evaluate_captioner", fail)
    run = shutil.copytree(checkpoint, tmp_path / "run")
    tokens, context = over_the_context(tiny)
    line = cli_error(capsys, eval_script.main, [str(run), "--dataset", "folder", "--data-dir", tiny["data_dir"],
                                                "--max-new-tokens", str(tokens), "--no-progress"])
    assert line == (f"error: --max-new-tokens {tokens} and the 10 prefix tokens exceed the language model's "
                    f"{context}-token context; use at most {context - 10}"), line


# ----------------------------------------------------------------------------------------------
# A run's run_config.json edited by hand
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("prefix_length", "ten", "expected int"),  # was read by nothing here, and evaluation went on
    ("train_limit", [5], "expected int"),  # was a TypeError traceback drawing the baseline's training images
    ("seed", 0.5, "expected int"),
    ("train_limit", True, "expected int"),  # JSON's true is no count: it was read as 1 training image
    ("dataset", "photos", "expected one of flickr30k, karpathy, folder"),
])
def test_a_run_config_edited_to_values_of_another_kind_is_one_line_naming_the_field(field, value, expected, run,
                                                                                    tmp_path, no_model, capsys):
    edited = shutil.copytree(run, tmp_path / "run")
    write_json(edited / "run_config.json", {**eval_script.read_json(run / "run_config.json"), field: value})
    line = cli_error(capsys, eval_script.main, [str(edited), "--no-progress"])
    assert line.startswith(f"error: {edited / 'run_config.json'}: {field} is {value!r}, {expected}"), line


def test_a_run_config_that_is_no_object_is_one_line_and_unknown_fields_are_left_alone(run, tmp_path, no_model,
                                                                                      capsys):
    edited = shutil.copytree(run, tmp_path / "run")
    (edited / "run_config.json").write_text("[]")  # was AttributeError: 'list' object has no attribute 'get'
    line = cli_error(capsys, eval_script.main, [str(edited), "--no-progress"])
    assert line == (f"error: {edited / 'run_config.json'} holds a list, not a run config object; restore the run's "
                    "own run_config.json"), line
    # A field this train.py does not know (a newer version's, or one since removed) is not checked.
    write_json(edited / "run_config.json", {**eval_script.read_json(run / "run_config.json"), "not_a_flag": [1]})
    assert eval_script.find_run_config(edited)["not_a_flag"] == [1]


def test_escape_sequences_in_a_run_folder_or_its_files_never_reach_the_terminal_raw(run, tmp_path, no_model, capsys):
    """A run folder's name (from an archive) or a path in its run_config.json, made elsewhere, printed raw in an
    error could clear the user's screen (ESC[2J) or retitle the terminal; the error stays one line too."""
    edited = shutil.copytree(run, tmp_path / "run\x1b[2J")
    write_json(edited / "run_config.json", {"dataset": "folder", "data_dir": str(tmp_path / "gone\x1b]0;owned\x07\n")})
    line = cli_error(capsys, eval_script.main, [str(edited), "--no-progress"])
    assert line == f"error: data folder not found: {tmp_path}/gone\\x1b]0;owned\\x07\\n", line
    (tmp_path / "empty\x1b[2J").mkdir()
    line = cli_error(capsys, inference.main, ["--checkpoint", str(tmp_path / "empty\x1b[2J"), "a.png"])
    assert line.startswith(f"error: {tmp_path}/empty\\x1b[2J/adapter_config.json not found"), line


def test_the_c1_controls_are_escaped_for_the_terminal_too():
    """U+009B is CSI on a terminal that reads C1 controls (ESC [ in one character): "\x9b2J" clears its screen."""
    from utils import for_terminal

    assert for_terminal("run\x9b2J\x85\x7f.") == "run\\x9b2J\\x85\\x7f."


def test_a_quiet_launch_ends_with_the_runs_own_line():
    """The README launches with `accelerate launch -q`: a run that stops with one line (a bad flag) is then
    followed by no launcher traceback (without -q, a CalledProcessError's for one process). Every
    `accelerate launch` the README and the scripts' resume hints show carries it."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(launcher), "launch", "-q", "--cpu", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(repo / "train.py"),
                           "--batch-size", "0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "error: --batch-size must be >= 1, got 0" in done.stderr and "Traceback" not in done.stderr, done.stderr
    text = "\n".join((repo / name).read_text() for name in ("README.md", "train.py", "eval.py"))
    launches = re.findall(r"accelerate launch[^`\n]*", text)
    assert len(launches) > 5 and all(re.match(r"accelerate launch -q ", launch) for launch in launches
                                     if re.search(r"\.py\b|\{processes\}", launch)), launches  # commands
