"""eval.py as a user runs it: metrics, baseline, report, decoding sweep, --compare, several processes."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import app
import eval as eval_script
import inference
import train
from conftest import built_once, said_by_the_processes, train_args, unchanged, without_loading_note
from dataset import extract_features, load_records
from metrics import COCO_METRICS, coco_metrics
from model import load_captioner
from report import best_validation, collapse_line, render_report
from utils import (BLEU_VARIANT, UserError, caption_diversity, collapse_warning, read_json, read_jsonl, run_cli,
                   write_json, write_jsonl)

ROOT = Path(__file__).resolve().parents[1]
SWEEP_NAMES = ["greedy", "beam 3", "beam 5", "nucleus top-p 0.9 T 1", eval_script.BASELINE]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    """A briefly trained run on the tiny fixture (no final evaluation: the tests evaluate it), once per test run."""
    def train_run(output: Path) -> None:
        assert train.main(train_args(tiny, output, "run", "--final-eval", "false")) == 0

    output = built_once(tmp_path_factory, "eval-runs", train_run)
    with unchanged(output):
        yield output / "run"


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory) -> Path:
    """`python eval.py RUN --decoding-sweep --out OUT`, once per test run for the tests that read its files."""
    def evaluate(folder: Path) -> None:
        assert eval_script.main([str(run), "--decoding-sweep", "--out", str(folder / "eval"), "--no-progress",
                                 "--num-workers", "0"]) == 0

    folder = built_once(tmp_path_factory, "eval-sweep", evaluate)
    with unchanged(folder):
        yield folder / "eval"


def test_metrics_baseline_and_report_hold_the_numbers_of_the_run(tiny, run, evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    rows = read_jsonl(evaluated / "predictions.jsonl")
    assert metrics["num_images"] == len(rows) == 6 and metrics["split"] == "test"
    assert metrics["coco_tokenization"] in ("ptb-java", "ptb-python")
    assert "rouge-score" in metrics["rougeL_variant"] and 0 <= metrics["rougeL"] <= 1
    for key, _ in COCO_METRICS:
        assert key in metrics and key in metrics["baseline"]
    assert metrics["baseline_decided_by"] == "coco_cider_d"
    assert metrics["beats_baseline"] == (metrics["coco_cider_d"] > metrics["baseline"]["coco_cider_d"])

    # The baseline, recomputed here from the run's training images: the nearest training image's first caption.
    captioner = load_captioner(run)
    train_records = load_records("folder", "train", tiny["data_dir"], seed=42)
    test_records = load_records("folder", "test", tiny["data_dir"], seed=42)
    expected = eval_script.nearest_neighbour_captions(
        extract_features(captioner, train_records, progress=False), [r.captions for r in train_records],
        extract_features(captioner, test_records, progress=False))
    assert [row["baseline"] for row in rows] == expected
    assert metrics["baseline"]["train_images"] == len(train_records)
    rescored = coco_metrics({"run": [r["prediction"] for r in rows], "baseline": expected},
                            [r.captions for r in test_records])
    for key, _ in COCO_METRICS:
        assert metrics[key] == pytest.approx(rescored["run"].metrics[key], rel=1e-12)
        assert metrics["baseline"][key] == pytest.approx(rescored["baseline"].metrics[key], rel=1e-12)
    assert [row["coco_cider_d"] for row in rows] == pytest.approx(rescored["run"].per_image["coco_cider_d"])
    assert [row["baseline_coco_cider_d"] for row in rows] == pytest.approx(
        rescored["baseline"].per_image["coco_cider_d"])

    # The report: self-contained, with the run's and the baseline's numbers, curves, the whole gallery worst first.
    report = (evaluated / "report.html").read_text()
    for value in (metrics["coco_cider_d"], metrics["baseline"]["coco_cider_d"], metrics["coco_bleu4"]):
        assert f"{100 * value:.2f}" in report
    assert metrics["coco_tokenization"] in report
    assert report.count('src="data:image/jpeg;base64,') == 6 and report.count('src="data:image/png;base64,') == 2
    assert not re.search(r'(src|href)="(?!data:)', report), "the report must not load anything from outside"
    assert ("does NOT beat" in report) == (not metrics["beats_baseline"])
    # The caption counts are of this run's captions and the baseline's, as predictions.jsonl holds them.
    for diversity, captions in ((metrics["diversity"], [r["prediction"] for r in rows]),
                                (metrics["baseline"]["diversity"], [r["baseline"] for r in rows])):
        assert diversity["distinct_captions"] == len(set(captions))
        assert diversity["top_caption_share"] == captions.count(diversity["top_caption"]) / len(captions)
    assert "one caption for" not in report  # 6 images are too few to call a collapse
    order = [m.group(1) for m in re.finditer(r'class="rank">#\d+ · ([^<]+)<', report)]
    worst_first = sorted(rows, key=lambda r: (r["coco_cider_d"], r["coco_rougeL"], r["image_id"]))
    assert order == [row["image_id"] for row in worst_first]
    for name in ("curve_loss.png", "curve_val_metrics.png"):
        with Image.open(evaluated / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_the_curves_mark_the_validation_whose_adapter_was_kept():
    # Since --select-by, train.py marks each validation that saved the top adapter; the last one holds.
    marked = [{"step": 2, "val_rougeL": 0.5, "best": True}, {"step": 4, "val_rougeL": 0.7, "best": True},
              {"step": 6, "val_rougeL": 0.9, "best": False}]  # e.g. --select-by loss: not the top ROUGE-L
    assert best_validation(marked) == 4
    # Older logs: the first step with the highest ROUGE-L, as those runs chose.
    old = [{"step": 2, "val_rougeL": 0.5}, {"step": 4, "val_rougeL": 0.7}, {"step": 6, "val_rougeL": 0.7}]
    assert best_validation(old) == 4
    # An older run resumed after the marks came: none of the new validations improved on the old best.
    resumed = old + [{"step": 8, "val_rougeL": 0.6, "best": False}, {"step": 10, "val_rougeL": 0.65, "best": False}]
    assert best_validation(resumed) == 4
    assert best_validation([]) is None


def test_the_report_difference_is_that_of_the_figures_shown():
    from report import metrics_table

    metrics = {"coco_cider_d": 2.527449, "coco_tokenization": "ptb", "baseline_decided_by": "coco_cider_d",
               "baseline": {"coco_cider_d": 6.586551}}
    row = next(line for line in metrics_table(metrics).splitlines() if "CIDEr-D" in line)
    assert re.findall(r"<td class=num>([^<]*)</td>", row) == ["252.74", "658.66", "-405.92"], row


def test_a_gallery_card_without_its_image_is_valid_html():
    from report import gallery_card

    row = {"image_id": "a.png", "references": ["a dog"], "prediction": "a cat", "baseline": "a dog"}
    card = gallery_card(1, row, None)
    assert "image not readable" in card and all("src=" in tag for tag in re.findall(r"<img[^>]*>", card)), card


def test_a_quote_in_an_image_name_stays_inside_its_attribute_in_the_report():
    """The image's name is written into its thumbnail's alt="...": a '"' in a file's name ended the attribute
    there, and the rest of the name became markup of the report (an onerror="..." that runs when it is opened)."""
    from report import gallery_card

    row = {"image_id": 'x" onerror="alert(1).png', "references": ["a dog"], "prediction": "a cat", "baseline": "a dog"}
    card = gallery_card(1, row, Image.new("RGB", (8, 8)))
    assert 'alt="x&quot; onerror=&quot;alert(1).png"' in card and 'onerror="' not in card, card


def test_a_large_split_shows_its_worst_images_in_the_report_and_says_so(tmp_path):
    """Every image got a card and a thumbnail: COCO's 5,000 test images made a 32 MiB page that took 27 s to write
    and a browser 5 s to open. eval.py by default, and train.py's final evaluation (write_eval_outputs as it calls
    it), show the worst GALLERY_SIZE, the page says how many of how many, and the metrics and predictions.jsonl
    stay of every image; --gallery-size 0 shows them all."""
    from dataset import ImageRecord
    from report import GALLERY_SIZE

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    scored = GALLERY_SIZE + 2
    records = [ImageRecord(f"{i:05d}.png", ["a red square"], "test", tmp_path / "red.png") for i in range(scored)]
    rows = [{"image_id": record.image_id, "prediction": "a red square", "references": record.captions,
             "baseline": "a square", "coco_cider_d": (i * 7 % scored) / scored, "coco_rougeL": 0.5}
            for i, record in enumerate(records)]
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": scored, "coco_tokenization": "ptb-java", "beats_baseline": True,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "baseline": {**scores, "coco_cider_d": 0.05, "method": "nearest", "train_images": 3}}
    assert eval_script.build_parser().parse_args(["RUN"]).gallery_size == GALLERY_SIZE
    eval_script.write_eval_outputs(tmp_path / "out", eval_script.SplitResult(metrics, rows), records)
    report = (tmp_path / "out" / "report.html").read_text()
    worst = sorted(rows, key=lambda row: row["coco_cider_d"])[:GALLERY_SIZE]
    shown = [m.group(1) for m in re.finditer(r'class="rank">#\d+ · ([^<]+)<', report)]
    assert shown == [row["image_id"] for row in worst]
    assert report.count('src="data:image/jpeg;base64,') == GALLERY_SIZE
    assert f"Gallery: the worst {GALLERY_SIZE:,} of {scored:,} images" in report
    assert f"The metrics above are of all {scored:,} images" in report and "--gallery-size 0" in report
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == scored
    every = render_report(metrics, rows, records, [], None, gallery_size=0)
    assert every.count('src="data:image/jpeg;base64,') == scored and f"Gallery: all {scored:,} images" in every
    assert "The metrics above are of all" not in every


def test_the_curves_read_a_log_with_nonfinite_values(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from report import training_curves
    from utils import write_jsonl

    plotted, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *args, **kw: plotted.append(args[1]) or plot(self, *args, **kw))

    # utils.finite_json spells NaN and infinity as strings, so train_log.jsonl stays JSON for jq and friends.
    write_jsonl(tmp_path / "train_log.jsonl", [
        {"type": "train", "step": 1, "loss": 2.0}, {"type": "train", "step": 2, "loss": float("inf")},
        {"type": "eval", "step": 2, "val_loss": float("nan"), "val_rougeL": 0.5, "val_cider_d": 1.0, "best": True}])
    paths = training_curves(tmp_path / "train_log.jsonl", tmp_path)
    assert [p.name for p in paths] == ["curve_loss.png", "curve_val_metrics.png"] and all(p.is_file() for p in paths)
    # As numbers: strings would make matplotlib draw a category axis ("2.0", "Infinity") without a word.
    assert plotted[:2] == [[2.0, float("inf")], [pytest.approx(float("nan"), nan_ok=True)]], plotted


def test_decoding_sweep_is_one_table_on_the_same_split(evaluated):
    sweep = json.loads((evaluated / "decoding_sweep.json").read_text())
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert [row["decoding"] for row in sweep["rows"]] == SWEEP_NAMES and sweep["num_images"] == 6
    greedy, baseline = sweep["rows"][0], sweep["rows"][-1]
    assert greedy["settings"]["strategy"] == "greedy" and sweep["rows"][2]["settings"]["num_beams"] == 5
    assert sweep["rows"][3]["settings"] | {"max_new_tokens": 0} == {
        "strategy": "sample", "num_beams": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 0}
    for key, _ in COCO_METRICS:
        assert greedy[key] == metrics[key] and baseline[key] == metrics["baseline"][key]
    # The baseline's row is no verdict on itself (the table would print "NO" beside it).
    assert baseline["beats_baseline"] is None and greedy["beats_baseline"] == metrics["beats_baseline"]
    assert "Decoding comparison" in (evaluated / "report.html").read_text()


def test_compare_puts_runs_side_by_side(evaluated, tmp_path, capsys):
    other = tmp_path / "other|b"  # a "|" in a folder's name must not split comparison.md's table
    other.mkdir()
    metrics = json.loads((evaluated / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "coco_cider_d": 1.2345, "coco_bleu4": 0.5678}))
    capsys.readouterr()
    assert eval_script.main(["--compare", str(evaluated), str(other), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    cider_row = next(line for line in printed.splitlines() if line.startswith("CIDEr-D"))
    assert cider_row.split()[1:] == [f"{100 * metrics['coco_cider_d']:.2f}", "123.45"]
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert table["header"] == ["metric (x100)", evaluated.name, "other|b"]
    assert table["metrics"][str(other)]["coco_bleu4"] == 0.5678
    assert table["metrics"][str(evaluated)]["coco_cider_d"] == metrics["coco_cider_d"]
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| CIDEr-D |" in markdown and "123.45" in markdown and "56.78" in markdown
    assert {line.replace("\\|", "").count("|") for line in markdown.split("\n\n")[0].splitlines()} == {4}

    (tmp_path / "never-evaluated").mkdir()
    assert run_cli(eval_script.main, ["--compare", str(evaluated), str(tmp_path / "never-evaluated")]) == 2
    assert run_cli(eval_script.main, []) == 2
    assert run_cli(eval_script.main, ["--compare", str(evaluated), str(tmp_path / "nowhere")]) == 2
    # Evaluation flags would do nothing here: said, not ignored.
    assert run_cli(eval_script.main, ["--compare", str(evaluated), str(other), "--limit", "5",
                                      "--decoding-sweep"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    assert "never-evaluated" in errors[0] and "python eval.py" in errors[0]
    assert errors[2].endswith(f"--compare: {tmp_path / 'nowhere'} does not exist"), errors[2]
    assert "--limit, --decoding-sweep would do nothing" in errors[3], errors[3]
    assert eval_script.main(["--compare", str(evaluated), str(evaluated)]) == 0
    assert f"note: {evaluated} is given 2 times" in capsys.readouterr().out



@contextlib.contextmanager
def a_pipe_whose_reader_has_left(buffering: int = -1):
    """A text stream into a pipe whose reading end is already closed, as `| head -1` leaves it once it has its
    line: each write that reaches the pipe raises BrokenPipeError (Python ignores SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = open(write_end, "w", buffering=buffering)
    try:
        yield stream
    finally:
        with contextlib.suppress(BrokenPipeError):
            stream.close()


def test_an_evaluation_goes_on_when_the_reader_of_its_output_leaves(run, evaluated, tmp_path, monkeypatch, capsys):
    """`python eval.py RUN | head -1`: the next line printed raised BrokenPipeError, which ended the evaluation
    before it wrote anything; under `2>&1 | head -1` a progress bar met the closed pipe first."""
    flags = ["--limit", "2", "--num-workers", "0"]
    # `2>&1 |`, progress bars on. First, with this test's feature cache still empty: the first line is the feature
    # extraction's bar, on stderr, before anything is printed on stdout.
    with a_pipe_whose_reader_has_left(buffering=1) as both, monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", both)
        patch.setattr(sys, "stderr", both)
        assert eval_script.main([str(run), "--out", str(tmp_path / "together"), *flags]) == 0
    assert read_json(tmp_path / "together" / "metrics.json")["num_images"] == 2

    # Now the features are cached, which is said on stdout before any file is written.
    with a_pipe_whose_reader_has_left(buffering=1) as stdout, monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", stdout)  # line-buffered: each line meets the closed pipe
        assert eval_script.main([str(run), "--out", str(tmp_path / "alone"), *flags]) == 0
    assert read_json(tmp_path / "alone" / "metrics.json")["num_images"] == 2
    err = capsys.readouterr().err
    assert (f"note: the reader of standard output has gone (a closed pipe); the evaluation goes on and writes its "
            f"files into {tmp_path / 'alone'}") in err and "Traceback" not in err, err

    # `eval.py --compare A B --out C | true`: the table, buffered whole, met the closed pipe only at the exit's flush
    with a_pipe_whose_reader_has_left() as stdout:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stdout", stdout)
            assert eval_script.main(["--compare", str(evaluated), str(tmp_path / "alone"), "--out",
                                     str(tmp_path / "cmp")]) == 0
        stdout.flush()  # as the interpreter's exit does: "Exception ignored ... BrokenPipeError" where it raised
    assert read_json(tmp_path / "cmp" / "comparison.json")["runs"] == [str(evaluated), str(tmp_path / "alone")]


def test_scoring_has_a_progress_bar_as_captioning_has(run, tmp_path, capsys):
    """After the last captioning bar, scoring every caption set (METEOR starting up, then each set in turn) took
    20-40 s on the demo's 900 training images, with nothing on the screen."""
    assert eval_script.main([str(run), "--limit", "2", "--out", str(tmp_path), "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    # A step for the adapter's captions, one for the baseline's
    assert re.search(r"scoring \(BLEU, METEOR, ROUGE-L, CIDEr-D\): 100%.* 2/2 ", err), err
    assert eval_script.main([str(run), "--limit", "2", "--out", str(tmp_path), "--num-workers", "0",
                             "--no-progress"]) == 0
    assert "scoring" not in capsys.readouterr().err


def test_an_evaluation_stopped_while_writing_leaves_no_metrics_beside_other_predictions(run, evaluated, tmp_path,
                                                                                        monkeypatch):
    """metrics.json marks a folder evaluated (--compare reads it): a stop while the new outputs are written
    must not leave the previous metrics.json posing as other predictions, nor its report, nor an earlier
    decoding sweep. They are all written aside first, so the stop leaves the earlier evaluation whole, and
    nothing of the new one. Meanwhile no other evaluation can write into the folder."""
    import fcntl

    out = tmp_path / "out"
    shutil.copytree(evaluated, out)
    (out / "decoding_sweep.json").write_text('{"num_images": 99}')  # from an earlier --decoding-sweep
    assert (out / "report.html").is_file()
    earlier = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}

    def stopped(*args, **kwargs):
        with open(out / ".eval.lock", "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second evaluation would wait here
        raise KeyboardInterrupt  # Ctrl-C while the report is written

    monkeypatch.setattr(eval_script, "write_report", stopped)
    args = [str(run), "--out", str(out), "--no-progress", "--num-workers", "0", "--limit", "2"]
    assert run_cli(eval_script.main, args) == 130
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == earlier
    assert not (out / eval_script.OUTPUTS_STAGE).exists()
    monkeypatch.undo()
    assert run_cli(eval_script.main, args) == 0
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 2
    assert (out / "report.html").is_file() and not (out / "decoding_sweep.json").exists()


def one_image_result() -> tuple[dict, dict]:
    """The metrics and the row of an evaluation of one image, as write_eval_outputs takes them."""
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 1, "coco_tokenization": "ptb-java", "beats_baseline": True,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "baseline": {**scores, "coco_cider_d": 0.05, "method": "nearest", "train_images": 3}}
    row = {"image_id": "a.png", "prediction": "a red circle", "references": ["a red circle"], "baseline": "a circle",
           "coco_cider_d": 0.1, "coco_rougeL": 0.1}
    return metrics, row


def test_eval_outputs_on_a_full_disk_leave_the_earlier_evaluation_whole(tmp_path, monkeypatch, capsys):
    """ENOSPC while an evaluation's outputs are written over an earlier one's: the earlier metrics.json, report.html,
    predictions.jsonl and curves stay as they were, nothing staged is left holding space, and the line says so.
    Before, the earlier metrics and report were deleted first, and on a full tmpfs neither came back."""
    import errno

    metrics, row = one_image_result()
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    write_jsonl(run / "train_log.jsonl", [{"type": "train", "step": 1, "loss": 2.0},
                                          {"type": "eval", "step": 1, "val_loss": 1.5, "val_rougeL": 0.5}])
    eval_script.write_eval_outputs(out, eval_script.SplitResult(metrics, [row]), [], run)
    earlier = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert {"metrics.json", "report.html", "curve_loss.png"} <= set(earlier)

    def disk_full(path, data):  # metrics.json, the last output written
        raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr(eval_script, "write_json", disk_full)
    other = eval_script.SplitResult({**metrics, "num_images": 2}, [row, {**row, "image_id": "b.png"}])
    with pytest.raises(UserError, match=r"^cannot write .*metrics\.json\.tmp \(No space left on device\): .*out keeps "
                                        r"the earlier evaluation's outputs as they were; free some space"):
        eval_script.write_eval_outputs(out, other, [], run)
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == earlier
    assert not (out / eval_script.OUTPUTS_STAGE).exists()


def test_an_evaluation_without_curves_leaves_none_of_an_earlier_ones_in_its_folder(tmp_path):
    """Two runs evaluated into one --out, the second without a train_log.jsonl (or without validations):
    the first run's curve PNGs stayed beside the second's report, which said it had no curves."""
    metrics, row = one_image_result()
    result, first_run, out = eval_script.SplitResult(metrics, [row]), tmp_path / "first", tmp_path / "out"
    first_run.mkdir()
    write_jsonl(first_run / "train_log.jsonl", [{"type": "train", "step": 1, "loss": 2.0},
                                                {"type": "eval", "step": 1, "val_loss": 1.5, "val_rougeL": 0.5}])
    written = eval_script.write_eval_outputs(out, result, [], first_run)
    assert {"curve_loss.png", "curve_val_metrics.png"} <= {path.name for path in written}
    written = eval_script.write_eval_outputs(out, result, [], None)
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == sorted(
        path.name for path in written) == ["metrics.json", "predictions.jsonl", "report.html"]


def test_outputs_clear_a_killed_evaluations_stage_leave_none_and_take_metrics_away_first(tmp_path, monkeypatch):
    """The stage a killed evaluation left is cleared (not "File exists"), and a written evaluation leaves no stage;
    a stop while the outputs are renamed into place leaves no earlier metrics.json beside the new predictions."""
    metrics, row = one_image_result()
    out = tmp_path / "out"
    (out / eval_script.OUTPUTS_STAGE).mkdir(parents=True)
    (out / eval_script.OUTPUTS_STAGE / "predictions.jsonl").write_text("left by a killed evaluation")
    eval_script.write_eval_outputs(out, eval_script.SplitResult(metrics, [row]), [], None)
    assert (out / "metrics.json").is_file() and not (out / eval_script.OUTPUTS_STAGE).exists()
    real_replace = eval_script.replace_durably

    def stopped_after_the_predictions(source, target):
        real_replace(source, target)
        if str(target).endswith("predictions.jsonl"):
            raise KeyboardInterrupt

    monkeypatch.setattr(eval_script, "replace_durably", stopped_after_the_predictions)
    with pytest.raises(KeyboardInterrupt):
        eval_script.write_eval_outputs(out, eval_script.SplitResult(metrics, [row, {**row, "image_id": "b.png"}]),
                                       [], None)
    assert len(read_jsonl(out / "predictions.jsonl")) == 2 and not (out / "metrics.json").exists()


def test_dtype_bf16_evaluates_and_captions_with_bf16_weights_on_a_cpu(tiny, run, evaluated, tmp_path, monkeypatch,
                                                                      capsys):
    """--dtype bf16 (faster on a CPU with AMX): eval.py loads the backbones so and says so in metrics.json and
    --compare; inference.py and app.py load them so too. The default on a CPU stays fp32."""
    assert json.loads((evaluated / "metrics.json").read_text())["lm_dtype"] == "float32"
    out = tmp_path / "bf16"
    assert eval_script.main([str(run), "--dtype", "bf16", "--limit", "2", "--out", str(out), "--no-progress",
                             "--num-workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lm_dtype"] == "bfloat16" and metrics["num_images"] == 2
    assert eval_script.main(["--compare", str(evaluated), str(out)]) == 0
    assert re.search(r"LM weights\s+\|?\s*float32\s+\|?\s*bfloat16", capsys.readouterr().out)

    loaded = []
    real = eval_script.load_captioner

    def spy(*args, **kwargs):
        loaded.append(kwargs["dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "load_captioner", spy)
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    assert inference.main(["--checkpoint", str(run), "--dtype", "bf16", str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")
    monkeypatch.setattr("model.load_captioner", spy)
    app.load_run(run, torch.device("cpu"), with_baseline=False, progress=False,
                 dtype=eval_script.chosen_dtype("bf16", torch.device("cpu")))
    assert loaded == [torch.bfloat16, torch.bfloat16]


def test_dtype_bf16_on_a_gpu_without_it_is_refused_before_any_data_is_read(run, tmp_path, monkeypatch):
    """On a GPU without bf16 (a T4, a V100), --dtype bf16 was refused only when the backbones loaded: after
    the split and the baseline's training images had been read (minutes for a Hub data set)."""
    import dataset

    def read_data(*args, **kwargs):
        raise AssertionError("data was read before --dtype was checked")

    monkeypatch.setattr(eval_script, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(eval_script, "gpu_computes_in_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    monkeypatch.setattr(eval_script, "load_records", read_data)
    monkeypatch.setattr(dataset, "load_records", read_data)
    with pytest.raises(UserError, match=r"^--dtype bf16: the GPU Tesla T4 has no bf16; use --dtype fp32"):
        eval_script.main([str(run), "--dtype", "bf16", "--out", str(tmp_path / "out"), "--no-progress"])


def test_two_evaluations_writing_into_one_folder_take_turns(tmp_path, capsys):
    import threading

    order = []

    def second():
        with eval_script.outputs_lock(tmp_path):
            order.append("second")

    with eval_script.outputs_lock(tmp_path):
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # it waits for the first to finish writing
        order.append("first")
    waiting.join(timeout=30)
    assert order == ["first", "second"]
    assert "waiting for another evaluation to finish writing" in capsys.readouterr().err


def test_a_damaged_training_log_costs_the_report_its_curves_not_the_evaluation(run, tmp_path, capsys):
    copied = Path(shutil.copytree(run, tmp_path / "copied"))
    log = copied / "train_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage{", *lines[1:]]) + "\n")
    out = tmp_path / "out"
    assert eval_script.main([str(copied), "--out", str(out), "--no-progress", "--num-workers", "0", "--limit",
                             "2"]) == 0
    printed = capsys.readouterr().out
    assert "note: no training curves in the report:" in printed and "line 2 is not JSON" in printed, printed
    assert (out / "metrics.json").is_file() and not list(out.glob("curve_*.png"))
    assert "No training curves" in (out / "report.html").read_text()


def test_compare_says_when_runs_were_scored_on_different_images(evaluated, tmp_path, capsys):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert len(metrics["images_digest"]) == 16
    for name, digest in (("same", metrics["images_digest"]), ("subset", "0" * 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({**metrics, "images_digest": digest}))
    capsys.readouterr()
    assert eval_script.main(["--compare", str(evaluated), str(tmp_path / "same")]) == 0
    assert "different images" not in capsys.readouterr().out
    assert eval_script.main(["--compare", str(evaluated), str(tmp_path / "subset")]) == 0
    assert "not comparable: the runs were scored on different images" in capsys.readouterr().out
    # A metrics.json from elsewhere is one line, not a KeyError.
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.json").write_text('{"coco_cider_d": 1.0}')
    assert run_cli(eval_script.main, ["--compare", str(evaluated), str(tmp_path / "foreign")]) == 2
    assert "is not a metrics.json of this version of eval.py" in capsys.readouterr().err
    # A run to evaluate and --compare at once: which was meant is not guessed.
    assert run_cli(eval_script.main, [str(evaluated), "--compare", str(evaluated), str(tmp_path / "same")]) == 2
    assert "or --compare RUN RUN ..., not both" in capsys.readouterr().err


def test_compare_says_when_runs_were_scored_on_other_data_under_the_same_file_names(tiny, run, evaluated, tmp_path,
                                                                                  capsys):
    # Another data folder whose test images have the same names (as "images/0001.jpg" or Karpathy
    # imgids do) gave the same images_digest, and --compare put the two evaluations side by side in silence.
    other = Path(shutil.copytree(tiny["data_dir"], tmp_path / "other"))
    rows = [json.loads(line) for line in (other / "captions.jsonl").read_text().splitlines()]
    for row in rows:
        if row["split"] == "test":
            row["captions"] = [f"another caption {i} of another image" for i in range(3)]
    (other / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert eval_script.main([str(run), "--data-dir", str(other), "--out", str(out), "--no-progress",
                             "--num-workers", "0"]) == 0
    ours, theirs = (json.loads((folder / "metrics.json").read_text()) for folder in (evaluated, out))
    assert ours["images_digest"] == theirs["images_digest"]  # the same names: only the captions tell them apart
    capsys.readouterr()
    assert eval_script.main(["--compare", str(evaluated), str(out)]) == 0
    assert "not comparable: the runs were scored on images of the same names with different captions" in \
        capsys.readouterr().out
    # The same data evaluated again stays comparable.
    assert eval_script.main(["--compare", str(evaluated), str(evaluated)]) == 0
    assert "not comparable" not in capsys.readouterr().out


def test_a_data_dir_of_another_layout_is_read_as_its_files_show(tiny, run, tmp_path, capsys):
    """A run trained on a caption folder, scored on a Karpathy folder given by --data-dir alone: it was read as a
    caption folder ("has neither captions.jsonl nor captions.csv"), --dataset karpathy had to be guessed."""
    karpathy = tmp_path / "karpathy"
    images = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[:3]
    (karpathy / "images").mkdir(parents=True)
    for image in images:
        shutil.copy(image, karpathy / "images" / image.name)
    (karpathy / "dataset_flickr8k.json").write_text(json.dumps({"images": [
        {"filename": image.name, "imgid": i, "split": "test", "sentences": [{"raw": f"caption {i}"}]}
        for i, image in enumerate(images)]}))
    out = tmp_path / "out"
    assert eval_script.main([str(run), "--data-dir", str(karpathy), "--out", str(out), "--no-progress",
                             "--num-workers", "0"]) == 0
    assert f"note: --data-dir {karpathy} holds dataset_flickr8k.json: read as --dataset karpathy" in \
        capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 3


def test_the_upper_bound_note_is_for_images_the_run_trained_on(tiny, run, tmp_path, capsys):
    # It was written for any --split train, a folder of one's own too (whose images the run never saw);
    # and it was only in metrics.json: the terminal showed the verdict against the baseline without it.
    note = "2 of the 2 images are among the run's training images: there the baseline retrieves each image's own"
    other = shutil.copytree(tiny["data_dir"], tmp_path / "other")
    for data_dir, expected in ((tiny["data_dir"], [note]), (str(other), [])):
        out = tmp_path / f"eval-{Path(data_dir).name}"  # not inside the data folder (refused)
        assert eval_script.main([str(run), "--data-dir", data_dir, "--split", "train", "--limit", "2", "--out",
                                 str(out), "--no-progress", "--num-workers", "0"]) == 0
        notes = json.loads((out / "metrics.json").read_text())["notes"]
        assert [n[: len(note)] for n in notes if "upper bound" in n] == expected, notes
        printed = [line for line in capsys.readouterr().out.splitlines() if "upper bound" in line]
        assert [line[: len("note: " + note)] for line in printed] == ["note: " + n for n in expected], printed


def test_a_held_out_byte_copy_of_a_training_image_is_said_to_flatter_the_figures(tiny, run, tmp_path, capsys):
    # dataset.py finds one file under several names, not a byte copy under another name: the test split
    # held a training picture, scored as unseen, and nothing said so. Its CLIP feature is the training one's.
    # A link to a file the run trained on is the upper-bound note's (the same file), not counted again here.
    note = "1 of the 6 images has the very CLIP feature of a training image: copies of it, or pictures CLIP " \
           "cannot tell from it (images/test_0002.png = images/train_0007.png)"
    distinct = shutil.copytree(tiny["data_dir"], tmp_path / "distinct")
    copied = shutil.copytree(tiny["data_dir"], tmp_path / "copied")
    shutil.copyfile(copied / "images" / "train_0007.png", copied / "images" / "test_0002.png")  # a file of its own
    (copied / "images" / "test_0003.png").unlink()
    (copied / "images" / "test_0003.png").symlink_to(Path(tiny["data_dir"]) / "images" / "train_0008.png")
    for data_dir, expected in ((copied, [note]), (distinct, [])):
        out = tmp_path / f"eval-{data_dir.name}"
        assert eval_script.main([str(run), "--data-dir", str(data_dir), "--out", str(out), "--no-progress",
                                 "--num-workers", "0"]) == 0
        notes = json.loads((out / "metrics.json").read_text())["notes"]
        assert [n[: len(note)] for n in notes if "very CLIP feature" in n] == expected, notes
        printed = [line for line in capsys.readouterr().out.splitlines() if "very CLIP feature" in line]
        assert [line[: len("note: " + note)] for line in printed] == ["note: " + n for n in expected], printed
        assert any("1 of the 6 images is among the run's training images" in n for n in notes) == bool(expected)


def test_a_run_that_skipped_a_missing_training_image_can_be_evaluated(tiny, tmp_path, capsys):
    # train.py's default --on-bad-sample skip trains without a missing file; eval.py's baseline then
    # stopped on that file ("1 of 40 train images are missing"), so such a run could not be evaluated.
    data_dir = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    (data_dir / "images" / "train_0003.png").unlink()
    flags = ["--data-dir", str(data_dir), "--epochs", "1", "--final-eval", "false"]
    assert train.main(train_args(tiny, tmp_path, "run", *flags)) == 0
    out = tmp_path / "eval"
    assert eval_script.main([str(tmp_path / "run"), "--out", str(out), "--no-progress", "--num-workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"]["train_images"] == 39 and metrics["num_images"] == 6
    assert "the baseline leaves out 1 training image with a missing file" in capsys.readouterr().err


def test_a_run_that_skipped_a_damaged_training_image_is_not_said_to_have_changed_data(tiny, tmp_path, capsys):
    # train.py skips an image it cannot read; its baseline leaves it out too, but the note said the unchanged
    # folder had "images added, or splits changed, since", sending the user to look for a change there was not.
    data_dir = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    (data_dir / "images" / "train_0003.png").write_text("not an image")
    flags = ["--data-dir", str(data_dir), "--epochs", "1", "--final-eval", "false"]
    assert train.main(train_args(tiny, tmp_path, "run", *flags)) == 0
    out = tmp_path / "eval"
    capsys.readouterr()
    assert eval_script.main([str(tmp_path / "run"), "--out", str(out), "--no-progress", "--num-workers", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["baseline"]["train_images"] == 39
    assert "images added, or splits changed" not in capsys.readouterr().err

    # Where the run does not list the images it trained on (other data than a folder, an older run), the
    # baseline finds the damaged image unreadable itself: said, as a missing one is (it was left out in silence).
    state_file = tmp_path / "run" / "resume" / "trainer_state.json"
    write_json(state_file, {**json.loads(state_file.read_text()), "train_images": []})
    assert eval_script.main([str(tmp_path / "run"), "--out", str(out), "--no-progress", "--num-workers", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["baseline"]["train_images"] == 39
    assert "the baseline leaves out 1 training image it could not read, as training did (first: " \
           "images/train_0003.png)" in capsys.readouterr().err


def test_eval_rescores_a_run_on_the_test_images_its_final_evaluation_skipped(tiny, tmp_path, capsys):
    """train.py's final evaluation (--on-bad-sample skip, the default) leaves out test images it cannot read, but
    `eval.py RUN` stopped at the first of them: the run's own figures could not be scored again. It now follows the
    run's setting, scores the same images to the same figures and says which it left out; --compare does not set
    them beside a score of the whole split."""
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    damaged, missing = data / "images" / "test_0001.png", data / "images" / "test_0002.png"
    damaged_bytes, missing_bytes = damaged.read_bytes(), missing.read_bytes()
    damaged.write_bytes(damaged_bytes[:100])
    missing.unlink()
    args = train_args(tiny, tmp_path, "run", "--max-steps", "2", "--num-workers", "0")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    trained = read_json(tmp_path / "run" / "metrics.json")
    note = ("2 of the 6 test images could not be read (missing or unreadable) and were left out (--on-bad-sample "
            "skip): images/test_0002.png, images/test_0001.png; the scores cover the other 4")
    flags = ["--no-progress", "--num-workers", "0"]
    skipped = tmp_path / "skipped"
    capsys.readouterr()
    assert eval_script.main([str(tmp_path / "run"), "--out", str(skipped), *flags]) == 0
    again = read_json(skipped / "metrics.json")
    assert trained["num_images"] == again["num_images"] == 4
    for key in ("images_digest", "references_digest", *eval_script.metric_keys()):
        assert again[key] == trained[key], key
    assert [n for n in again["notes"] if n.startswith(note)], again["notes"]
    assert f"note: {note}" in capsys.readouterr().out

    # Asked to, or for a run that records no setting (saved before eval.py had one), it stops on them as before.
    assert run_cli(eval_script.main, [str(tmp_path / "run"), "--on-bad-sample", "error", *flags]) == 2
    assert "1 of 6 test images are missing" in capsys.readouterr().err
    run_config = tmp_path / "run" / "run_config.json"
    write_json(run_config, {k: v for k, v in read_json(run_config).items() if k != "on_bad_sample"})
    assert run_cli(eval_script.main, [str(tmp_path / "run"), *flags]) == 2
    assert "1 of 6 test images are missing" in capsys.readouterr().err

    # Repaired, the whole split scores; side by side with the skip-scored figures, the table says they differ.
    damaged.write_bytes(damaged_bytes)
    missing.write_bytes(missing_bytes)
    assert eval_script.main([str(tmp_path / "run"), "--out", str(tmp_path / "whole"), *flags]) == 0
    capsys.readouterr()
    assert eval_script.main(["--compare", str(skipped), str(tmp_path / "whole")]) == 0
    printed = capsys.readouterr().out
    assert "not comparable: the runs differ in num_images (4, 6)" in printed
    assert "not comparable: the runs were scored on different images" in printed


def test_a_split_with_no_readable_image_is_one_line_under_skip_too(tiny, run, tmp_path, capsys):
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    for image in (data / "images").glob("test_*"):
        image.write_bytes(b"not an image")
    flags = ["--data-dir", str(data), "--out", str(tmp_path / "out"), "--no-progress", "--num-workers", "0"]
    assert run_cli(eval_script.main, [str(run), *flags, "--on-bad-sample", "skip"]) == 2
    err = capsys.readouterr().err
    assert "none of the 6 images of the split could be read (first: " in err and "Traceback" not in err, err


def test_the_note_on_skipped_images_says_a_limit_drew_the_scored_ones(tiny, run, tmp_path, capsys):
    """Under --limit (train.py's --test-limit) the missing images are counted in the whole split, before the draw: the
    note said "1 of the 3 test images could not be read" of a split of 6 scored on 2. train.py's final evaluation
    (load_test_split) scores the same 2 images and says the same (this test had asked skipped_images_note itself,
    so a final evaluation that said "1 of the 3" again passed it)."""
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    (data / "images" / "test_0000.png").unlink()
    assert eval_script.main([str(run), "--data-dir", str(data), "--limit", "2", "--out", str(tmp_path / "out"),
                             "--no-progress", "--num-workers", "0"]) == 0
    metrics = read_json(tmp_path / "out" / "metrics.json")
    note = ("1 of the test images could not be read (missing or unreadable) and was left out (--on-bad-sample skip): "
            "images/test_0000.png; the scores cover a limit's sample of 2 of the others")
    assert metrics["num_images"] == 2 and [n for n in metrics["notes"] if n.startswith(note)], metrics["notes"]

    args = train_args(tiny, tmp_path, "final", "--test-limit", "2", "--max-steps", "2")
    args[args.index("--data-dir") + 1] = str(data)
    assert train.main(args) == 0
    assert "skipping 1 test image that could not be read (missing or unreadable)" in capsys.readouterr().out
    final = read_json(tmp_path / "final" / "metrics.json")
    assert final["images_digest"] == metrics["images_digest"]
    assert final["num_images"] == 2 and [n for n in final["notes"] if n.startswith(note)], final["notes"]
    # A limit that draws nothing out (5 images are there): the note counts the split's images, as without one.
    args[args.index("--test-limit") + 1] = "5"
    records, missing, sampled = train.load_test_split(train.parse_config(args))
    assert eval_script.skipped_images_note(missing, len(records), "test", sampled).startswith(
        "1 of the 6 test images could not be read")


def test_meteor_starts_once_the_split_was_read_not_for_a_split_that_stops_on_an_unreadable_image(tiny, run, tmp_path,
                                                                                                   monkeypatch):
    """METEOR's JVM loads for seconds (~8 s of CPU) while the images are captioned; an evaluation that stops on
    an unreadable image never scores, and started it for nothing."""
    started = []
    monkeypatch.setattr(eval_script, "start_meteor", lambda: started.append("meteor"))
    data_dir = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    Path(load_records("folder", "test", str(data_dir), seed=42)[-1].path).write_bytes(b"not an image")
    flags = ["--data-dir", str(data_dir), "--no-progress", "--num-workers", "0", "--on-bad-sample", "error"]
    assert run_cli(eval_script.main, [str(run), *flags, "--out", str(tmp_path / "bad")]) != 0
    assert started == [] and not (tmp_path / "bad" / "metrics.json").exists()
    assert eval_script.main([str(run), *flags, "--limit", "2", "--out", str(tmp_path / "good")]) == 0
    assert started == ["meteor"]


def test_a_run_still_training_is_said_so_and_its_adapter_is_named_as_it_was_loaded(run, tmp_path, monkeypatch,
                                                                                    capsys):
    # Evaluating a run that train.py still trains: nothing said so, and metrics.json named the adapter
    # the folder held after captioning (a newer best saved meanwhile), not the one whose figures it holds.
    live = shutil.copytree(run, tmp_path / "live")
    scored_digest = eval_script.file_digest(live / "adapter.safetensors")
    evaluate = eval_script.evaluate_captioner

    def training_saves_a_new_best_meanwhile(*args, **kwargs):
        results = evaluate(*args, **kwargs)
        (live / "adapter.safetensors").write_bytes((live / "last" / "adapter.safetensors").read_bytes() + b" ")
        return results

    monkeypatch.setattr(eval_script, "evaluate_captioner", training_saves_a_new_best_meanwhile)
    lock = train.lock_run_folder(live)  # as the training process holds it
    try:
        assert eval_script.main([str(live), "--limit", "2", "--out", str(tmp_path / "out"), "--no-progress",
                                 "--num-workers", "0"]) == 0
    finally:
        train.release_run_folder(lock, live)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["adapter"]["blake2b"] == scored_digest
    assert any("is still being trained" in note for note in metrics["notes"]), metrics["notes"]
    assert "is still being trained: these figures are of its adapter of step" in capsys.readouterr().out


def test_outputs_are_not_written_into_the_last_checkpoint_of_a_run_still_training(run, tmp_path, capsys):
    # eval.py RUN/last wrote its outputs into last/, which the run's next save swapped out and deleted.
    live = shutil.copytree(run, tmp_path / "live")
    flags = ["--limit", "2", "--no-progress", "--num-workers", "0"]
    lock = train.lock_run_folder(live)  # as the training process holds it
    try:
        assert run_cli(eval_script.main, [str(live / "last"), *flags]) == 2
        assert "give --out FOLDER for the outputs" in capsys.readouterr().err
        assert not (live / "last" / "metrics.json").exists()
        assert eval_script.main([str(live / "last"), *flags, "--out", str(tmp_path / "out")]) == 0
    finally:
        train.release_run_folder(lock, live)
    assert eval_script.main([str(live / "last"), *flags]) == 0  # finished: last/ stays as it is
    assert (live / "last" / "metrics.json").is_file()


def test_a_run_with_only_its_last_adapter_is_pointed_to_last(run, tmp_path):
    # A run stopped before any validation saved a best adapter holds last/ alone: eval.py and inference.py
    # said only "not a run folder" / "adapter_config.json not found", not where its adapter is.
    import inference

    folder = tmp_path / "stopped"
    shutil.copytree(run / "last", folder / "last")
    shutil.copy(run / "run_config.json", folder)
    advice = f"its last/ holds the last step's: give {folder / 'last'}"
    with pytest.raises(eval_script.UserError, match=re.escape(advice)):
        eval_script.main([str(folder), "--no-progress"])
    with pytest.raises(eval_script.UserError, match=re.escape(advice)):
        inference.main(["--checkpoint", str(folder), str(tmp_path / "photo.png")])


def test_validation_images_the_best_adapter_was_chosen_by_are_said_to_flatter_it(run, tmp_path, capsys):
    # `--split val` scored the images the run picked its best adapter by, and said nothing of it;
    # last/ was not picked by them.
    note = "4 of the 4 images are validation images by whose rougeL the run chose this adapter"
    for checkpoint, expected in ((run, [note]), (run / "last", [])):
        out = tmp_path / checkpoint.name
        assert eval_script.main([str(checkpoint), "--split", "val", "--limit", "4", "--out", str(out),
                                 "--no-progress", "--num-workers", "0"]) == 0
        notes = json.loads((out / "metrics.json").read_text())["notes"]
        assert [n[: len(note)] for n in notes if "validation images" in n] == expected, notes
        printed = [line for line in capsys.readouterr().out.splitlines() if "validation images" in line]
        assert [line[: len("note: " + note)] for line in printed] == ["note: " + n for n in expected], printed


def test_another_split_is_written_beside_the_runs_test_figures_not_over_them(run, tmp_path, capsys):
    """`eval.py RUN --split val` wrote its metrics.json, predictions and report over the run's test figures (training's
    final evaluation's), which --compare RUN then showed as the run's: they go into RUN/eval-val/ instead."""
    folder = Path(shutil.copytree(run, tmp_path / "run"))
    flags = ["--limit", "4", "--no-progress", "--num-workers", "0"]
    assert eval_script.main([str(folder), "--split", "val", *flags]) == 0
    assert f"wrote {folder / 'eval-val' / 'metrics.json'}, " in capsys.readouterr().out
    assert not (folder / "metrics.json").exists()
    # A run evaluated on val only: --compare RUN says where those figures are.
    with pytest.raises(UserError, match=re.escape(f"its other splits' are in {folder / 'eval-val'}")):
        eval_script.main(["--compare", str(folder)])
    with pytest.raises(UserError, match=re.escape(f"evaluate it first (python eval.py {folder} --split train)")):
        eval_script.main(["--compare", str(folder / "eval-train")])  # not `eval.py RUN/eval-train`, no run

    assert eval_script.main([str(folder), *flags]) == 0
    test_files = {name: (folder / name).read_bytes() for name in ("metrics.json", "predictions.jsonl", "report.html")}
    assert eval_script.main([str(folder), "--split", "val", *flags]) == 0
    assert {name: (folder / name).read_bytes() for name in test_files} == test_files
    assert read_json(folder / "metrics.json")["split"] == "test"
    assert read_json(folder / "eval-val" / "metrics.json")["split"] == "val"
    assert (folder / "eval-val" / "report.html").is_file() and (folder / "eval-val" / "predictions.jsonl").is_file()
    out = tmp_path / "out"  # --out still says where
    assert eval_script.main([str(folder), "--split", "val", *flags, "--out", str(out)]) == 0
    assert read_json(out / "metrics.json")["split"] == "val" and not (out / "eval-val").exists()

    capsys.readouterr()
    assert eval_script.main(["--compare", str(folder), str(folder / "eval-val")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[-2:] == ["run", "run/eval-val"], printed  # whose eval-val it is
    assert next(line for line in printed.splitlines() if line.startswith("split")).split()[1:] == ["test", "val"]
    assert "stale" not in printed
    for name in ("adapter.safetensors", "adapter_config.json"):  # training went on: the val figures are stale
        shutil.copy(run / "last" / name, folder / name)
    assert eval_script.main(["--compare", str(folder / "eval-val")]) == 0
    # The command that writes them again writes them where they are, with no --out.
    command = shlex.split(re.search(r"re-evaluate it \((python eval\.py .*)\)$", capsys.readouterr().out,
                                    re.MULTILINE).group(1))
    assert command[:5] == ["python", "eval.py", str(folder), "--split", "val"] and "--out" not in command, command


def test_metrics_report_and_compare_say_how_the_lm_was_quantised(run, evaluated, tmp_path, capsys):
    """The same adapter scores differently over a quantised LM (on the demo: CIDEr-D 185.90 with the
    8-bit LM it trained with, 181.41 with --lm-quantization none), so each evaluation must say which."""
    assert json.loads((evaluated / "metrics.json").read_text())["lm_quantization"] == "none"
    out = tmp_path / "4bit"
    assert eval_script.main([str(run), "--lm-quantization", "4bit", "--out", str(out), "--no-progress",
                             "--num-workers", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["lm_quantization"] == "4bit"
    assert "LM quantization: 4bit" in (out / "report.html").read_text()
    capsys.readouterr()
    assert eval_script.main(["--compare", str(evaluated), str(out)]) == 0
    printed = capsys.readouterr().out
    assert next(line for line in printed.splitlines() if line.startswith("LM quantization")).split()[2:] == [
        "none", "4bit"]
    assert "not comparable: the runs' LMs were loaded with different --lm-quantization (4bit, none)" in printed


def test_an_evaluation_stopped_while_drawing_a_curve_leaves_the_old_curve_whole(tmp_path, monkeypatch):
    """The curve PNGs are replaced atomically like eval.py's other outputs: savefig straight onto the
    file once left half a PNG when Ctrl-C came mid-write."""
    import matplotlib.figure

    from report import LOSS_CURVE, training_curves

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (
        {"type": "train", "step": 1, "loss": 2.0}, {"type": "eval", "step": 2, "val_loss": 1.5, "val_rougeL": 0.3})))
    assert len(training_curves(log, tmp_path)) == 2
    whole = (tmp_path / LOSS_CURVE).read_bytes()

    def stopped_half_way(self, target, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            out = target if hasattr(target, "write") else stack.enter_context(open(target, "wb"))
            out.write(whole[: len(whole) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        training_curves(log, tmp_path)
    assert (tmp_path / LOSS_CURVE).read_bytes() == whole


def test_a_full_disk_while_writing_a_curve_leaves_the_old_curve_whole(tmp_path, monkeypatch):
    """A curve is written under a temporary name and renamed: written straight onto the old PNG, a write the disk
    could not finish left half of one in its place."""
    from report import LOSS_CURVE, training_curves

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"type": "train", "step": 1, "loss": 2.0}) + "\n")
    assert training_curves(log, tmp_path) == [tmp_path / LOSS_CURVE]
    whole = (tmp_path / LOSS_CURVE).read_bytes()

    def disk_full(self, data):
        with open(self, "wb") as out:
            out.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        training_curves(log, tmp_path)
    assert (tmp_path / LOSS_CURVE).read_bytes() == whole and not list(tmp_path.glob("*.tmp"))


def test_a_log_without_a_loss_or_a_validation_draws_no_empty_curve(tmp_path):
    """A run stopped before its first log line (its log holds a skipped non-finite step, say) has no curve to
    draw: the report says so, rather than showing an empty "Loss" chart."""
    from report import training_curves

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"type": "nonfinite", "step": 1, "losses": ["NaN"], "grad_norm": "NaN"}) + "\n")
    assert training_curves(log, tmp_path) == [] and not list(tmp_path.glob("*.png"))


def test_compare_says_when_a_folder_holds_another_adapter_than_its_metrics_scored(run, evaluated, tmp_path, capsys):
    """Training on (--resume, more epochs) replaces the adapter beside an older metrics.json: --compare
    must not show that file's figures as the folder's."""
    metrics = json.loads((evaluated / "metrics.json").read_text())
    best_step = json.loads((run / "adapter_config.json").read_text())["training"]["step"]
    assert metrics["adapter"]["step"] == best_step and len(metrics["adapter"]["blake2b"]) == 32
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    shutil.copy(evaluated / "metrics.json", folder)
    capsys.readouterr()
    assert eval_script.main(["--compare", str(folder), str(evaluated)]) == 0
    printed = capsys.readouterr().out
    assert "stale" not in printed
    assert next(line for line in printed.splitlines() if line.startswith("adapter step")).split()[2:] == [
        str(best_step)] * 2

    # The folder's adapter is replaced by a later one, as training on would: the metrics are stale.
    last_step = json.loads((run / "last" / "adapter_config.json").read_text())["training"]["step"]
    assert last_step != best_step
    for name in ("adapter.safetensors", "adapter_config.json"):
        shutil.copy(run / "last" / name, folder / name)
    assert eval_script.main(["--compare", str(folder), str(evaluated)]) == 0
    printed = capsys.readouterr().out
    # They are the figures of a --decoding-sweep, whose nucleus captions depend on the batches they were drawn in.
    sweep = (f"--max-new-tokens {metrics['decoding']['max_new_tokens']} "
             f"--batch-size {metrics['options']['batch_size']} --decoding-sweep")
    assert (f"stale: {folder} scored the adapter of step {best_step}, but {folder} now holds another (step "
            f"{last_step}): re-evaluate it (python eval.py {folder} {sweep})") in printed, printed
    assert printed.count("stale") == 1  # `evaluated` (written with --out) is checked against the run it names

    # Figures of another split, written with --out: the command to write them again says both.
    other = tmp_path / "val-eval"
    other.mkdir()
    write_json(other / "metrics.json", {**metrics, "split": "val", "checkpoint": str(folder)})
    assert eval_script.main(["--compare", str(folder), str(other)]) == 0
    assert f"re-evaluate it (python eval.py {folder} --split val {sweep} --out {other})" in capsys.readouterr().out


def test_the_command_to_evaluate_stale_figures_again_repeats_that_evaluation(tiny, run, tmp_path, capsys):
    """--compare's "stale" note gives the command that writes the figures again: it left out --limit, the decoding
    and the other flags, so that pasting it made another evaluation (greedy, of every image) under the old name."""
    folder = Path(shutil.copytree(run, tmp_path / "run"))
    out = tmp_path / "eval"
    flags = ["--limit", "4", "--strategy", "sample", "--temperature", "0.8", "--seed", "5", "--batch-size", "2",
             "--max-new-tokens", "8", "--data-dir", tiny["data_dir"], "--gallery-size", "3"]
    assert eval_script.main([str(folder), *flags, "--out", str(out), "--no-progress", "--num-workers", "0"]) == 0
    scored = read_jsonl(out / "predictions.jsonl")
    best = {name: (folder / name).read_bytes() for name in ("adapter.safetensors", "adapter_config.json")}
    for name in best:  # training went on: the folder holds another adapter now
        shutil.copy(run / "last" / name, folder / name)
    capsys.readouterr()
    assert eval_script.main(["--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    command = shlex.split(re.search(r"re-evaluate it \((python eval\.py .*)\)$", printed, re.MULTILINE).group(1))
    assert command[:3] == ["python", "eval.py", str(folder)] and command[-2:] == ["--out", str(out)], command
    for name, content in best.items():  # the adapter those figures were of, to see that the command repeats them
        (folder / name).write_bytes(content)
    assert eval_script.main([*command[2:], "--no-progress", "--num-workers", "0"]) == 0
    assert read_jsonl(out / "predictions.jsonl") == scored
    options = read_json(out / "metrics.json")["options"]
    assert [options[name] for name in ("limit", "seed", "batch_size", "gallery_size")] == [4, 5, 2, 3]


def test_without_java_the_report_names_the_python_tokenisation(run, tmp_path, monkeypatch, capsys):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))
    assert eval_script.main([str(run), "--out", str(tmp_path), "--no-progress", "--num-workers", "0"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in without_loading_note(captured.err).splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "java not found" in notes[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["coco_tokenization"] == "ptb-python" and metrics["coco_meteor"] is None
    assert any("java not found" in note for note in metrics["notes"])
    assert "n/a" in captured.out
    report = (tmp_path / "report.html").read_text()
    assert "ptb-python" in report and "java not found" in report


def test_report_flags_a_run_that_does_not_beat_the_baseline(tmp_path):
    class Record:
        image_id, captions = "a<b>.png", ["a red circle"]

        def open(self):
            return Image.new("RGB", (300, 200), (200, 30, 30))

    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 1, "coco_tokenization": "ptb-java", "beats_baseline": False,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "baseline": {**scores, "coco_cider_d": 0.5, "method": "nearest", "train_images": 3}}
    row = {"image_id": "a<b>.png", "prediction": "<script>alert(1)</script>", "references": ["a red circle"],
           "baseline": "a red circle", "coco_cider_d": 0.1, "coco_rougeL": 0.1}
    html = render_report(metrics, [row], [Record()], [], None)
    assert 'class="verdict bad"' in html and "does NOT beat the nearest-neighbour baseline on CIDEr-D" in html
    assert "10.00 vs 50.00" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "a&lt;b&gt;.png" in html


def test_a_name_that_is_not_utf8_is_escaped_in_the_report_not_its_end(tmp_path):
    """An image and a run folder named in Latin-1 bytes (Python holds them as lone surrogates): report.html,
    written as UTF-8, failed on them in a UnicodeEncodeError after the whole split was scored, before
    metrics.json was written."""
    from report import write_report

    name, run = os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"saved_models/r\xe9sum\xe9")
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 1, "coco_tokenization": "ptb-java", "beats_baseline": True, "checkpoint": run,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1}, "notes": [f"about {name}"],
               "baseline": {**scores, "coco_cider_d": 0.05, "method": "nearest", "train_images": 3}}
    row = {"image_id": name, "prediction": "a red circle", "references": ["a red circle"], "baseline": "a circle",
           "coco_cider_d": 0.1, "coco_rougeL": 0.1}
    (report,) = write_report(tmp_path, metrics, [row], [], None)
    text = report.read_text(encoding="utf-8")
    assert "caf\\udce9.png" in text and "r\\udce9sum\\udce9" in text and "note: about caf\\udce9.png" in text


def test_bidi_controls_in_captions_and_names_cannot_reorder_the_report(tmp_path):
    """A right-to-left override in a caption (a reference, or the model's own) or an image's name turned
    the rest of its line around: the baseline's CIDEr-D after it read backwards. They are shown as escapes;
    right-to-left text itself is kept."""
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 1, "coco_tokenization": "ptb-java", "beats_baseline": True,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "baseline": {**scores, "coco_cider_d": 0.05, "method": "nearest", "train_images": 3}}
    row = {"image_id": "\u2067evil.png", "prediction": "\u202ba dog", "references": ["\u05db\u05dc\u05d1 dog"],
           "baseline": "\u202ea dog", "baseline_coco_cider_d": 0.12, "coco_cider_d": 0.1, "coco_rougeL": 0.1}
    html = render_report(metrics, [row], [], [], None)
    assert not any(chr(code) in html for code in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
    assert "baseline: \\u202ea dog (CIDEr-D 12.00)" in html and "\\u2067evil.png" in html
    assert "\\u202ba dog" in html and "\u05db\u05dc\u05d1 dog" in html


def table_cells(page: str) -> list[list[list[str]]]:
    """The text of each cell of each <table> of a report, row by row."""
    return [[re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", row) for row in re.findall(r"<tr[^>]*>.*?</tr>", table, re.S)]
            for table in re.findall(r"<table>.*?</table>", page, re.S)]


def test_each_figure_of_the_report_tables_is_in_its_own_row_and_column():
    """The metrics and decoding tables cell by cell, every score a number of its own: a figure under another
    metric's name, the baseline's column showing the run's figure, a METEOR without Java (None) shown as a number,
    a row left out, or the baseline's own row of the decoding comparison saying NO, each still made a page that
    the other report tests passed."""
    keys = [key for key, _ in COCO_METRICS] + ["rougeL", "bleu4"]
    ours = {key: (i + 1) / 100 for i, key in enumerate(keys)} | {"coco_meteor": None}
    theirs = {key: (i + 1) / 1000 for i, key in enumerate(keys)} | {"coco_meteor": None}
    metrics = {**ours, "num_images": 6, "coco_tokenization": "ptb-python", "coco_tokenization_detail": "no java",
               "beats_baseline": True, "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "rougeL_variant": "rouge-score as recorded",
               "baseline": {**theirs, "method": "nearest", "train_images": 40}}
    sweep = {"rows": [{"decoding": "greedy", **ours, "beats_baseline": True},
                      {"decoding": "beam 3", **ours, "beats_baseline": False},
                      {"decoding": eval_script.BASELINE, **theirs, "beats_baseline": None}]}
    page = render_report(metrics, [], [], [], sweep)
    scores_table, decoding_table = table_cells(page)

    def shown(value) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    coco = "COCO (pycocoevalcap), ptb-python"
    names = [*COCO_METRICS, ("rougeL", "ROUGE-L (rouge-score)"), ("bleu4", "BLEU-4 (NLTK)")]
    variants = [coco] * len(COCO_METRICS) + ["rouge-score as recorded", BLEU_VARIANT]
    assert scores_table == [["metric (x100)", "this run", "NN baseline", "difference", "variant"]] + [
        [name, shown(ours[key]), shown(theirs[key]),
         "n/a" if ours[key] is None else f"{100 * (ours[key] - theirs[key]):+.2f}", variant]
        for (key, name), variant in zip(names, variants)]
    assert re.findall(r'<tr class="decides"><td>([^<]*)<', page) == ["CIDEr-D"]  # the metric that decides, in bold
    assert decoding_table == [["decoding", *(name for _, name in COCO_METRICS), "ROUGE-L (rouge-score)",
                               "beats baseline"]] + [
        [row["decoding"], *(shown(row[key]) for key, _ in COCO_METRICS), shown(row["rougeL"]), said]
        for row, said in zip(sweep["rows"], ["yes", "NO", ""])]
    assert "tokenisation: ptb-python (no java)" in page and "over 40 training images" in page


def test_a_gallery_card_shows_each_score_under_its_name_and_every_caption_as_text():
    """Captions and image names come from data files and from the model: each is text on the page, markup in one
    included; each per-image score stands under its own name (METEOR without Java as n/a), the baseline's CIDEr-D
    beside its caption, and an empty caption says so."""
    from report import gallery_card

    row = {"image_id": "<i>x.png", "prediction": "<b>a cat", "baseline": "<u>a dog", "references": ["<s>a cow"],
           "coco_cider_d": 0.01, "coco_bleu4": 0.02, "coco_meteor": None, "coco_rougeL": 0.04, "rougeL": 0.05,
           "baseline_coco_cider_d": 0.06}
    card = gallery_card(3, row, Image.new("RGB", (8, 8)))
    assert not re.search(r"<[ibus]>", card), card
    for shown in ('<div class="rank">#3 · &lt;i&gt;x.png</div>', '<div class="pred">&lt;b&gt;a cat</div>',
                  '<div class="base">baseline: &lt;u&gt;a dog (CIDEr-D 6.00)</div>', "<li>&lt;s&gt;a cow</li>",
                  '<div class="scores">CIDEr-D 1.00 · BLEU-4 2.00 · METEOR n/a · ROUGE-L 4.00 · '
                  "ROUGE-L (rouge-score) 5.00</div>"):
        assert shown in card, (shown, card)
    assert '<div class="pred"><i>(empty)</i></div>' in gallery_card(1, {**row, "prediction": ""}, None)


def test_the_run_name_notes_and_baseline_in_the_report_are_text_not_markup():
    """A run folder's name, the data set's, a note (which names files of the data) and the baseline's method come
    from the command line and metrics.json: each is text on the page. The gallery counts from #1."""
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 2, "coco_tokenization": "ptb-java", "beats_baseline": True,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1}, "checkpoint": "runs/<b>x",
               "dataset": "folder<i>", "split": "test", "notes": ["skipped <img src=x onerror=alert(1)>.png"],
               "baseline": {**scores, "method": "<u>nearest", "train_images": 3}}
    rows = [{"image_id": f"{i}.png", "prediction": "a cat", "references": ["a cat"], "baseline": "a dog",
             "coco_cider_d": i / 10, "coco_rougeL": 0.1} for i in range(2)]
    page = render_report(metrics, rows, [], [], None)
    assert not re.search(r"<(b|i|u|img)[ >]", page), page
    for shown in ("<title>Evaluation: runs/&lt;b&gt;x</title>", "<h1>Evaluation: runs/&lt;b&gt;x</h1>",
                  '<div class="meta">folder&lt;i&gt; test split', "Baseline: &lt;u&gt;nearest, over 3 training images",
                  '<div class="note">note: skipped &lt;img src=x onerror=alert(1)&gt;.png</div>'):
        assert shown in page, shown
    assert re.findall(r'class="rank">#(\d+) · ([^<]+)<', page) == [("1", "0.png"), ("2", "1.png")]


def test_the_gallery_breaks_cider_ties_by_lower_rouge_then_by_name():
    """The page says its order: worst per-image CIDEr-D first, ties (common: CIDEr-D is 0 for every caption sharing
    no n-gram with its references) by lower COCO ROUGE-L, then by the image's name, whatever the split's order."""
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 4, "coco_tokenization": "ptb-java", "beats_baseline": True,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "baseline": {**scores, "method": "nearest", "train_images": 3}}
    rows = [{"image_id": name, "prediction": "a cat", "references": ["a cat"], "baseline": "a dog",
             "coco_cider_d": cider, "coco_rougeL": rouge}
            for name, cider, rouge in (("d.png", 0.0, 0.5), ("c.png", 0.0, 0.2), ("a.png", 0.3, 0.0),
                                       ("b.png", 0.0, 0.2))]
    page = render_report(metrics, rows, [], [], None)
    assert re.findall(r'class="rank">#\d+ · ([^<]+)<', page) == ["b.png", "c.png", "d.png", "a.png"]


def test_the_gallery_size_given_to_eval_reaches_the_report(tmp_path):
    """eval.py --gallery-size N: write_eval_outputs hands it on to the page, which shows the worst N."""
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    metrics = {**scores, "num_images": 3, "coco_tokenization": "ptb-java", "beats_baseline": True,
               "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
               "baseline": {**scores, "method": "nearest", "train_images": 3}}
    rows = [{"image_id": f"{i}.png", "prediction": "a cat", "references": ["a cat"], "baseline": "a dog",
             "coco_cider_d": i / 10, "coco_rougeL": 0.1} for i in range(3)]
    eval_script.write_eval_outputs(tmp_path, eval_script.SplitResult(metrics, rows), [], gallery_size=2)
    report = (tmp_path / "report.html").read_text()
    assert "Gallery: the worst 2 of 3 images" in report and "the gallery shows the worst 2, and" in report
    assert re.findall(r'class="rank">#\d+ · ([^<]+)<', report) == ["0.png", "1.png"]


def test_the_validation_curve_plots_every_validation_x100_and_marks_the_kept_adapter(tmp_path, monkeypatch):
    """Each validation's ROUGE-L x100 at its step; CIDEr-D on an axis of its own only where every validation
    logged it (an older run resumed since logged it for the new ones only: that was a KeyError, and no report); the
    dashed line at the step of the adapter at the run's top as adapter_config.json records it, over the log's marks
    (a resume can cut the record of the best validation from the log)."""
    from matplotlib.axes import Axes

    from report import training_curves

    plotted, marked, plot = [], [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *args, **kw: plotted.append(kw.get("label")
                                                                               and (kw["label"], *args[:2]))
                        or plot(self, *args, **kw))
    monkeypatch.setattr(Axes, "axvline", lambda self, x, **kw: marked.append((x, kw["label"])))
    write_jsonl(tmp_path / "train_log.jsonl", [
        {"type": "train", "step": 1, "loss": 2.0},
        {"type": "eval", "step": 2, "val_loss": 1.5, "val_rougeL": 0.25, "best": True},
        {"type": "eval", "step": 4, "val_loss": 1.0, "val_rougeL": 0.5, "val_cider_d": 1.5, "best": False}])
    write_json(tmp_path / "adapter_config.json", {"training": {"step": 6, "best": {"step": 6}}})
    training_curves(tmp_path / "train_log.jsonl", tmp_path)
    assert ("ROUGE-L (rouge-score)", [2, 4], [25.0, 50.0]) in plotted, plotted
    assert not any(label.startswith("CIDEr-D") for label, *_ in filter(None, plotted)), plotted
    assert marked == [(6, "best, saved (step 6)")]


@pytest.mark.filterwarnings("error")
def test_a_curve_with_nothing_labelled_is_drawn_without_a_warning(tmp_path):
    """Validations that logged only their loss (no ROUGE-L, no kept adapter to mark): matplotlib warned "No artists
    with labels found to put in legend" into the output of eval.py and of train.py's final evaluation."""
    from report import LOSS_CURVE, METRIC_CURVE, training_curves

    write_jsonl(tmp_path / "train_log.jsonl", [{"type": "train", "step": 1, "loss": 2.0},
                                               {"type": "eval", "step": 2, "val_loss": 1.5}])
    assert [path.name for path in training_curves(tmp_path / "train_log.jsonl", tmp_path)] == [
        LOSS_CURVE, METRIC_CURVE]


def test_the_reports_image_count_has_thousands_separators_as_its_gallery_title_does():
    scores = {key: 0.5 for key in [key for key, _ in COCO_METRICS] + ["rougeL", "bleu4"]}
    metrics = {**scores, "num_images": 25010, "coco_tokenization": "ptb-python", "processes": {"num_processes": 1},
               "beats_baseline": True, "baseline_decided_by": "coco_cider_d",
               "baseline": {**scores, "method": "nearest", "train_images": 40}}
    assert " · 25,010 images · " in render_report(metrics, [], [], [], None)


def test_print_metrics_shows_the_baseline_figures_beside_the_runs(capsys):
    """The table eval.py prints: each metric's row holds the run's figure, then the baseline's."""
    keys = [key for key, _ in COCO_METRICS] + ["rougeL", "bleu4"]
    ours = {key: (i + 1) / 100 for i, key in enumerate(keys)}
    metrics = {**ours, "coco_tokenization": "ptb-java", "rougeL_variant": "r", "bleu4_variant": "b",
               "beats_baseline": True, "baseline_decided_by": "coco_cider_d",
               "baseline": {key: value / 10 for key, value in ours.items()}}
    eval_script.print_metrics(metrics, "test split")
    printed = capsys.readouterr().out
    for key, name in [*COCO_METRICS, ("rougeL", "ROUGE-L (rouge-score)"), ("bleu4", "BLEU-4 (NLTK)")]:
        assert re.search(rf"^{re.escape(name)} +{100 * ours[key]:.2f} +{10 * ours[key]:.2f} ", printed, re.M), name


def test_one_caption_for_most_images_is_flagged_unless_the_data_is_as_repetitive(tmp_path):
    """A collapsed adapter (the LM ignores its prefix) can score a fair ROUGE-L on similar images:
    the report and the printed table must say so, measured against the baseline's own repetition."""
    class Record:
        def __init__(self, i):
            self.image_id, self.captions = f"{i}.png", [f"caption {i}"]

        def open(self):
            return Image.new("RGB", (64, 64))

    images = 12
    collapsed = ["a dog"] * 10 + ["a cat", "a cow"]
    scores = {key: 0.1 for key, _ in COCO_METRICS} | {"rougeL": 0.1, "bleu4": 0.1}
    for baseline_captions, flagged in ((list(collapsed), False), ([f"caption {i}" for i in range(images)], True)):
        metrics = {**scores, "num_images": images, "coco_tokenization": "ptb-java", "beats_baseline": True,
                   "baseline_decided_by": "coco_cider_d", "processes": {"num_processes": 1},
                   "diversity": caption_diversity(collapsed),
                   "baseline": {**scores, "method": "nearest", "train_images": 3,
                                "diversity": caption_diversity(baseline_captions)}}
        rows = [{"image_id": f"{i}.png", "prediction": collapsed[i], "references": [f"caption {i}"],
                 "baseline": baseline_captions[i], "coco_cider_d": 0.1, "coco_rougeL": 0.1} for i in range(images)]
        html = render_report(metrics, rows, [Record(i) for i in range(images)], [], None)
        assert ("one caption for 83% of the 12 images (&#x27;a dog&#x27;)" in html) == flagged, flagged
        assert (collapse_line(metrics) != "") == flagged
    assert metrics["diversity"] == {"distinct_captions": 3, "top_caption": "a dog", "top_caption_share": 10 / 12}
    # Below the share, or on too few images, nothing is said.
    assert collapse_warning(caption_diversity(["a dog"] * 5 + [str(i) for i in range(7)]), 12) == ""
    assert collapse_warning(caption_diversity(["a dog"] * 9), 9) == ""
    assert collapse_warning(caption_diversity(["a dog"] * 6 + [str(i) for i in range(6)]), 12) != ""


def test_two_processes_caption_each_image_once_and_match_one_process(run, evaluated, tmp_path):
    """ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 eval.py RUN: shards of whole batches, gathered. The sweep's
    sampled captions too: each batch is seeded by its index in the split, whichever process captions it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "eval.py"), str(run), "--out", str(tmp_path), "--batch-size", "2", "--num-workers", "0",
               "--decoding-sweep"]
    # One thread each: two processes on the test machine's cores, not each spinning up a thread per core.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, "only the main process writes and prints"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    single = json.loads((evaluated / "metrics.json").read_text())
    # 6 images in 3 batches of 2: one batch for process 0, two for process 1.
    assert metrics["processes"] == {"num_processes": 2, "images_per_process": [2, 4]}
    # The main process's bars count its own shard, and say so: not "1/1 batch" for the whole split.
    assert "captioning (greedy), process 0's 2 of 6 images" in result.stderr, result.stderr[-3000:]
    # So do the baseline's: its 40 training images, not the 20 of process 0's share.
    assert "(training images, for the baseline, process 0's 20 of 40 images)" in result.stderr, result.stderr[-3000:]
    rows, single_rows = read_jsonl(tmp_path / "predictions.jsonl"), read_jsonl(evaluated / "predictions.jsonl")
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in single_rows]  # each once, in split order
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in single_rows]
    for key in [k for k, _ in COCO_METRICS] + ["rougeL", "bleu4", "baseline", "beats_baseline"]:
        assert metrics[key] == single[key], key
    # One process in the same batches of 2 samples the same captions as process 1 did for the split's batches 1 and 2.
    assert eval_script.main([str(run), "--decoding-sweep", "--batch-size", "2", "--out", str(tmp_path / "one"),
                             "--no-progress", "--num-workers", "0"]) == 0
    sweeps = [read_json(folder / "decoding_sweep.json", "sweep") for folder in (tmp_path, tmp_path / "one")]
    assert sweeps[0]["rows"] == sweeps[1]["rows"]


def evaluate_in_two_processes(script: Path, run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 SCRIPT RUN --out OUT ...`, batches of 2. The
    launcher's 5 s monitor lets a process whose peer ended reach its next gather before the launcher
    stops it too (as test_resilience's test of the same for train.py)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--monitor-interval", "5", str(script), str(run), "--out", str(out), "--batch-size", "2",
               "--num-workers", "0", "--no-progress", *extra]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_an_unreadable_image_in_another_process_shard_is_one_error_line(tiny, run, tmp_path):
    """The processes pool their unreadable images and all stop; only the main one says so (each used to
    print the same error line)."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data_dir)
    last = load_records("folder", "test", str(data_dir), seed=42)[-1]  # in process 1's shard
    Path(last.path).write_bytes(b"not an image")
    result = evaluate_in_two_processes(ROOT / "eval.py", run, tmp_path / "out", "--data-dir", str(data_dir),
                                       "--on-bad-sample", "error")
    assert result.returncode != 0
    assert said_by_the_processes(result.stderr).count("evaluation scores every image of the split") == 1, \
        result.stderr[-3000:]
    assert Path(last.path).name in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_two_processes_skipping_unreadable_images_each_read_their_shard_of_the_split(tiny, run, tmp_path):
    """Under --on-bad-sample skip (a run's own default) every process read every image of the split to find the
    unreadable ones, and stored the split's features in the cache once per process. Each now reads its shard and
    they pool what they found: the note names the image process 1 could not read."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data_dir)
    last = load_records("folder", "test", str(data_dir), seed=42)[-1]  # in process 1's shard
    Path(last.path).write_bytes(b"not an image")
    logged = tmp_path / "eval_logging_reads.py"  # eval.py, each process listing the images it decodes
    logged.write_text(
        "import os, sys\n"
        "import dataset, eval\n"
        "from utils import run_cli\n"
        "encode = dataset._encode\n"
        "def logged(captioner, records, *args):\n"
        f"    with open({str(tmp_path)!r} + '/read.' + os.environ['RANK'], 'a') as log:\n"
        "        log.writelines(f'{record.image_id}\\n' for record in records)\n"
        "    return encode(captioner, records, *args)\n"
        "dataset._encode = logged\n"
        "sys.exit(run_cli(eval.main))\n")
    result = evaluate_in_two_processes(logged, run, tmp_path / "out", "--data-dir", str(data_dir),
                                       "--on-bad-sample", "skip")
    assert result.returncode == 0, result.stderr[-3000:]
    read = [{line for line in (tmp_path / f"read.{rank}").read_text().splitlines() if "test_" in line}
            for rank in (0, 1)]
    assert not read[0] & read[1] and len(read[0] | read[1]) == 6, read
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert metrics["num_images"] == 5
    assert [n for n in metrics["notes"] if n.startswith(f"1 of the 6 test images could not be read (missing or "
                                                        f"unreadable) and was left out (--on-bad-sample skip): "
                                                        f"{last.image_id}; the scores cover the other 5")], metrics


@pytest.mark.slow
def test_a_process_stopped_reading_its_shard_stops_the_other_in_one_line(run, tmp_path):
    """Under --on-bad-sample skip each process reads its shard, then they gather what they found. A line one of them
    stopped on while reading (the feature cache damaged under it) met the others' gather with its own, and was lost:
    process 1 left quietly, as if process 0 had said it, and process 0 ended with "another process ended"."""
    wrapper = tmp_path / "eval_stopped_reading.py"
    wrapper.write_text(
        "import os, sys\n"
        "import eval\n"
        "from utils import UserError, run_cli\n"
        "clip_features = eval.clip_features\n"
        "def stopped_reading(captioner, records, batch_size, num_workers, progress, desc, *args, **kwargs):\n"
        "    if os.environ['RANK'] == '1' and 'reading the split' in desc:\n"
        "        raise UserError('the feature cache X is being damaged while this run reads it')\n"
        "    return clip_features(captioner, records, batch_size, num_workers, progress, desc, *args, **kwargs)\n"
        "eval.clip_features = stopped_reading\n"
        "sys.exit(run_cli(eval.main))\n")
    result = evaluate_in_two_processes(wrapper, run, tmp_path / "out", "--on-bad-sample", "skip")
    assert result.returncode != 0
    said = said_by_the_processes(result.stderr)
    assert said.count("error: process 1 (on ") == 1 and said.count("the feature cache X is being damaged") == 1, said
    assert "]: Traceback" not in said and "another process" not in said, said  # a process's, not the launcher's own
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_a_data_error_every_process_meets_is_one_error_line(tiny, run, tmp_path):
    """A split with no images stops both processes alike; one line says so (each used to print it)."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny["data_dir"], data_dir)
    captions = data_dir / "captions.jsonl"
    captions.write_text("".join(line + "\n" for line in captions.read_text().splitlines() if '"test"' not in line))
    result = evaluate_in_two_processes(ROOT / "eval.py", run, tmp_path / "out", "--data-dir", str(data_dir),
                                       "--on-bad-sample", "error")
    # Counted in the text, not by lines: two processes' lines written at once can share one.
    assert result.returncode != 0 and said_by_the_processes(result.stderr).count("error: ") == 1, result.stderr[-3000:]
    assert f"error: the test split of folder {data_dir} has no images with captions" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("on_bad_sample", ["skip", "error"])  # its first gather: readable_split's, evaluate_captioner's
def test_a_process_stopped_mid_evaluation_ends_the_other_with_one_line(run, tmp_path, on_bad_sample):
    """SIGTERM reaches rank 1 alone (a scheduler stopping one worker) before it hands in its shard: rank 0,
    waiting for it, ends with one line, not the process group's traceback, and writes nothing."""
    wrapper = tmp_path / "eval_signalled.py"
    wrapper.write_text(
        "import os, signal, sys\n"
        "import eval\n"
        "from utils import run_cli\n"
        "gather = eval.Processes.gather\n"
        "def gather_or_stop(self, items):\n"
        "    if self.rank == 1:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return gather(self, items)\n"
        "eval.Processes.gather = gather_or_stop\n"
        "sys.exit(run_cli(eval.main))\n")
    result = evaluate_in_two_processes(wrapper, run, tmp_path / "out", "--on-bad-sample", on_bad_sample)
    assert result.returncode != 0
    assert "interrupted (SIGTERM)" in result.stderr, result.stderr[-3000:]
    assert "error: another process of this evaluation ended" in result.stderr, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_a_process_stopped_while_loading_ends_the_other_with_one_line(run, tmp_path):
    """SIGTERM reaches rank 1 once it has loaded the backbones, while rank 0 waits for it where the processes
    agree that the loading went well: rank 0 ends with one line, not the process group's traceback."""
    agreeing = tmp_path / "rank0_agreements"  # how often rank 0 has begun to agree: its second ends the loading
    wrapper = tmp_path / "eval_signalled_loading.py"
    wrapper.write_text(
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "import eval, utils\n"
        "from utils import run_cli\n"
        f"agreeing = Path({str(agreeing)!r})\n"
        "check_processes_agree = utils.check_processes_agree\n"
        "def counted(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '0':\n"
        "        agreeing.write_text(str(int(agreeing.read_text()) + 1 if agreeing.exists() else 1))\n"
        "    return check_processes_agree(*args, **kwargs)\n"
        "utils.check_processes_agree = counted\n"
        "load_captioner = eval.load_captioner\n"
        "def load_then_stop(*args, **kwargs):\n"
        "    captioner = load_captioner(*args, **kwargs)\n"
        "    if os.environ['RANK'] == '1':\n"
        "        deadline = time.monotonic() + 120\n"
        "        while not (agreeing.exists() and agreeing.read_text() == '2') and time.monotonic() < deadline:\n"
        "            time.sleep(0.1)\n"
        "        time.sleep(1)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return captioner\n"
        "eval.load_captioner = load_then_stop\n"
        "sys.exit(run_cli(eval.main))\n")
    result = evaluate_in_two_processes(wrapper, run, tmp_path / "out")
    assert result.returncode != 0
    assert "interrupted (SIGTERM)" in result.stderr, result.stderr[-3000:]
    assert "error: another process of this evaluation ended" in result.stderr, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_two_machines_stop_in_one_line_where_one_has_no_copy_of_the_run_or_another(run, tmp_path):
    """Two machines with disks of their own (simulated: machine 1 is given another folder): one without
    the run stopped in one line while machine 0 waited for it forever; one with a copy whose adapter
    differs would have captioned its shard with that adapter, without a word. A copy made whole works."""
    from test_resilience import launch_two_machines

    flags = ["--out", str(tmp_path / "out"), "--batch-size", "2", "--num-workers", "0", "--no-progress"]
    missing = launch_two_machines(ROOT / "eval.py", [[str(run), *flags], [str(tmp_path / "nowhere"), *flags]],
                                  timeout=120)
    for machine in missing:
        errors = [line for line in machine.stderr.splitlines() if line.startswith("error:")]
        assert machine.returncode != 0 and errors == [
            f"error: process 1 (on {socket.gethostname()}): {tmp_path / 'nowhere'} does not exist: give a run folder "
            f"(python eval.py saved_models/RUN); {eval_script.SAME_RUN_EVERYWHERE}"], machine.stderr[-3000:]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = bytearray((copy / "adapter.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of the last weight: a copy of another step, or one the copy damaged
    (copy / "adapter.safetensors").write_bytes(bytes(weights))
    for machine in launch_two_machines(ROOT / "eval.py", [[str(run), *flags], [str(copy), *flags]], timeout=120):
        errors = [line for line in machine.stderr.splitlines() if line.startswith("error:")]
        assert machine.returncode != 0 and len(errors) == 1, machine.stderr[-3000:]
        assert errors[0].startswith("error: the processes of this run do not agree on the adapter's weights (a "
                                    "digest): process 0 on "), errors[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_compare_under_two_processes_prints_and_writes_once(evaluated, tmp_path):
    """--compare evaluates nothing: under torchrun only the first process prints the table and writes its files."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "eval.py"), "--compare", str(evaluated), str(tmp_path / "again"), "--out", str(tmp_path)]
    shutil.copytree(evaluated, tmp_path / "again")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("beats baseline") == 1, result.stdout


def test_every_flag_has_help():
    parser = eval_script.build_parser()
    for action in parser._actions:
        assert action.help, action.dest


def test_a_cider_tie_at_zero_is_no_verdict_rather_than_a_loss():
    """With one test image every CIDEr-D is 0 (no n-gram can be weighed): saying the adapter does not
    beat the baseline would be a verdict the metric cannot give."""
    from eval import beats_baseline
    from report import baseline_verdict

    zero = {"coco_cider_d": 0.0}
    assert beats_baseline(zero, zero) is None
    assert beats_baseline({"coco_cider_d": 0.2}, zero) is True and beats_baseline(zero, {"coco_cider_d": 0.2}) is False
    assert beats_baseline({"coco_cider_d": 0.2}, {"coco_cider_d": 0.2}) is False  # matching it is not beating it
    metrics = {**zero, "baseline_decided_by": "coco_cider_d", "baseline": zero, "beats_baseline": None}
    assert baseline_verdict(metrics).startswith("No verdict against the nearest-neighbour baseline: CIDEr-D is 0.00")


def test_compare_names_an_older_metrics_file_that_cannot_say_which_data_it_scored(tmp_path):
    """A metrics.json written before eval.py recorded references_digest (or images_digest) was left out
    of the same-data checks: an old demo-v1 run and a new demo-v2 one (same file names, other images
    and captions) were set side by side with no note. Now the older file is named, with what to do."""
    scored = {"coco_cider_d": 1.0, "baseline": {"coco_cider_d": 0.5}, "beats_baseline": True, "dataset": "folder",
              "split": "test", "num_images": 4, "coco_tokenization": "ptb-java", "images_digest": "a" * 16}
    runs = {"old": scored, "older": {k: v for k, v in scored.items() if k != "images_digest"},
            "new": {**scored, "references_digest": "b" * 16}, "new2": {**scored, "references_digest": "b" * 16}}
    for name, metrics in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    notes = eval_script.comparison([str(tmp_path / "old"), str(tmp_path / "older"), str(tmp_path / "new")])["notes"]
    assert notes == [f"cannot tell whether {tmp_path / 'old'}, {tmp_path / 'older'} were scored on the same images "
                     "and captions as the others: an older eval.py wrote that metrics.json without recording them; "
                     f"re-evaluate them (python eval.py {tmp_path / 'old'})"], notes
    assert eval_script.comparison([str(tmp_path / "new"), str(tmp_path / "new2")])["notes"] == []


# ----------------------------------------------------------------------------------------------
# A run folder from elsewhere
# ----------------------------------------------------------------------------------------------

def test_links_planted_in_a_run_folder_are_replaced_not_written_through(run, tmp_path, capsys):
    """Each output is written as NAME.tmp and renamed: a run folder from elsewhere holding metrics.json.tmp ->
    ~/.bashrc had eval.py overwrite the user's file with the metrics (and .eval.lock -> a path created it)."""
    copied = Path(shutil.copytree(run, tmp_path / "copied"))
    victims = {name: tmp_path / f"victim-{name}" for name in ("metrics.json.tmp", "predictions.jsonl.tmp",
                                                               "report.html.tmp", "curve_loss.png.tmp")}
    for name, victim in victims.items():
        victim.write_text("the user's own file\n")
        (copied / name).symlink_to(victim)
    (copied / ".eval.lock").unlink(missing_ok=True)
    (copied / ".eval.lock").symlink_to(tmp_path / "created-by-the-lock")
    assert eval_script.main([str(copied), "--no-progress", "--num-workers", "0", "--limit", "2"]) == 0
    assert all(victim.read_text() == "the user's own file\n" for victim in victims.values())
    assert not (tmp_path / "created-by-the-lock").exists()
    assert not [path for path in copied.iterdir() if path.is_symlink()]
    assert json.loads((copied / "metrics.json").read_text())["num_images"] == 2


def test_compare_refuses_values_it_cannot_read_and_prints_none_raw(evaluated, tmp_path, capsys):
    """--compare reads metrics.json files it did not write: a score that is not a number (or a baseline that is
    not an object) was a traceback from deep inside the table; a string with an escape sequence reached the
    terminal raw, and one with HTML reached comparison.md raw, which Markdown viewers render."""
    metrics = json.loads((evaluated / "metrics.json").read_text())
    for name, edit, said in (("text", {"coco_cider_d": "x"}, "coco_cider_d is a string, not a number"),
                             ("flag", {"coco_bleu1": True}, "coco_bleu1 is true/false, not a number"),
                             ("list", {"baseline": []}, "baseline is a list, not an object"),
                             ("verdict", {"beats_baseline": [1]}, "beats_baseline is a list, not true, false or null"),
                             ("split", {"split": ["test"]}, "split is a list, not a string")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({**metrics, **edit}))
        assert run_cli(eval_script.main, ["--compare", str(evaluated), str(tmp_path / name)]) == 2, name
        error = capsys.readouterr().err.strip()
        assert error == (f"error: {tmp_path / name / 'metrics.json'} is not a metrics.json eval.py wrote ({said}): "
                         f"re-evaluate it (python eval.py {tmp_path / name})"), error

    hostile = "\x1b[2J\x1b]0;owned\x07<img src=x onerror=alert(1)>"
    (tmp_path / "hostile\x1b[2J").mkdir()
    (tmp_path / "hostile\x1b[2J" / "metrics.json").write_text(json.dumps({**metrics, "dataset": hostile}))
    assert eval_script.main(["--compare", str(evaluated), str(tmp_path / "hostile\x1b[2J"), "--out",
                             str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\x07" not in printed
    assert "hostile\\x1b[2J" in printed and "\\x1b[2J\\x1b]0;owned\\x07<img" in printed
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown and "\x1b" not in markdown


def test_the_command_compare_suggests_quotes_what_a_metrics_file_says():
    """The stale note's command is one to paste: a split "test; rm -rf ~" in a metrics.json from elsewhere ran."""
    command = eval_script.reevaluation_command(Path("runs/a/metrics.json"), {"split": "test; rm -rf ~"},
                                               Path("runs/a"))
    assert command == "python eval.py runs/a --split 'test; rm -rf ~'"


def test_a_training_log_with_records_train_py_does_not_write_costs_the_report_its_curves_only(tmp_path, capsys):
    """An edited log's "abc" for a loss, [1] for a record or a missing val_loss was a traceback after the whole
    evaluation, which then wrote no metrics.json."""
    from report import training_curves

    good = [{"type": "train", "step": 1, "loss": 2.0}, {"type": "eval", "step": 2, "val_loss": 1.5, "val_rougeL": 0.3}]
    for odd, said in (({"type": "train", "step": 2, "loss": "abc"}, "ValueError: could not convert string to float"),
                      ({"type": "train", "step": 2, "loss": [1]}, "TypeError: [1] is not a number"),
                      ({"type": "train", "step": "2", "loss": 1.0}, 'TypeError: step "2" is not a whole number'),
                      ({"type": "eval", "step": 3}, "KeyError: 'val_loss'"), ([1], "TypeError: [1] is not a record")):
        write_jsonl(tmp_path / "train_log.jsonl", [*good, odd])
        assert training_curves(tmp_path / "train_log.jsonl", tmp_path) == []
        printed = capsys.readouterr().out.strip()
        assert printed.startswith(f"note: no training curves in the report: {tmp_path / 'train_log.jsonl'} holds a "
                                  f"record train.py does not write ({said}"), printed


def folder_without_splits(tiny: dict, tmp_path: Path) -> Path:
    """A copy of the tiny data whose caption rows name no split: each image is dealt one."""
    data = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    rows = read_jsonl(data / "captions.jsonl")
    write_jsonl(data / "captions.jsonl", [{k: v for k, v in row.items() if k != "split"} for row in rows])
    return data


def add_image(data: Path, name: str) -> None:
    shutil.copy(next((data / "images").iterdir()), data / name)
    write_jsonl(data / "captions.jsonl", [*read_jsonl(data / "captions.jsonl"), {"image": name, "caption": "new"}])


def test_a_run_saved_before_the_hash_deal_keeps_the_shuffle_deal_and_its_refusal(tiny, tmp_path):
    # Images without a split were dealt one by a shuffle of all of them: one image added re-deals every split,
    # and eval.py used to score the new test split, made of images the run trained on, as unseen. A run saved
    # then (its run config names no --folder-split) keeps that deal when evaluated or resumed, and the refusal.
    data = folder_without_splits(tiny, tmp_path)
    args = train_args({**tiny, "data_dir": str(data)}, tmp_path, "run", "--max-steps", "2", "--final-eval", "false",
                      "--folder-split", "shuffle")
    assert train.main(args) == 0
    saved = read_json(tmp_path / "run" / "run_config.json", "")
    write_json(tmp_path / "run" / "run_config.json", {k: v for k, v in saved.items() if k != "folder_split"})
    state = read_json(tmp_path / "run" / "resume" / "trainer_state.json", "")
    write_json(tmp_path / "run" / "resume" / "trainer_state.json", {k: v for k, v in state.items() if k != "hash_deal"})
    evaluate = [str(tmp_path / "run"), "--limit", "2", "--out", str(tmp_path / "eval"), "--no-progress",
                "--num-workers", "0"]
    assert eval_script.main(evaluate) == 0  # the data as it was
    scored = {row["image_id"] for row in read_jsonl(tmp_path / "eval" / "predictions.jsonl")}
    test_by = {deal: {r.image_id for r in load_records("folder", "test", str(data), seed=42, folder_split=deal)}
               for deal in ("shuffle", "hash")}
    assert scored <= test_by["shuffle"] and not scored <= test_by["hash"], (scored, test_by)
    shown = {Path(path).name for path, label in app.example_images(tmp_path / "run", 3) if label.startswith("test")}
    assert shown == {Path(name).name for name in test_by["shuffle"]}  # the app's example test images too
    # Another folder deals as new runs do, so that runs old and new are scored on its same test images.
    other = shutil.copytree(data, tmp_path / "other")
    assert eval_script.main([*evaluate[:4], str(tmp_path / "other-eval"), *evaluate[5:], "--data-dir", str(other)]) == 0
    scored = {row["image_id"] for row in read_jsonl(tmp_path / "other-eval" / "predictions.jsonl")}
    assert scored <= test_by["hash"] and not scored <= test_by["shuffle"], (scored, test_by)
    assert train.main(args[:-2] + ["--resume", "--max-steps", "3"]) == 0  # its training data, as it was dealt
    trained = load_records("folder", "train", str(data), seed=42, folder_split="shuffle")
    next(iter(trained)).path.unlink()  # a file missing on disk deals nothing again: the caption file does
    assert eval_script.main(evaluate) == 0
    add_image(data, "added.png")
    with pytest.raises(UserError, match="lists other images than when .* trained .* may hold images the run trained on"):
        eval_script.main(evaluate)


def test_a_hash_dealt_folder_evaluates_after_images_are_added_not_when_its_test_images_were_removed(tiny, tmp_path,
                                                                                                   capsys):
    """A new run deals each image by a hash of its name: images added since training move none, so the
    grown folder evaluates, with a note. Removing the images hashed into test makes the lowest-placed
    training image stand in for them, and that is refused."""
    data = folder_without_splits(tiny, tmp_path)
    args = train_args({**tiny, "data_dir": str(data)}, tmp_path, "run", "--max-steps", "2", "--final-eval", "false")
    assert train.main(args) == 0
    assert read_json(tmp_path / "run" / "run_config.json", "")["folder_split"] == "hash"
    evaluate = [str(tmp_path / "run"), "--out", str(tmp_path / "eval"), "--no-progress", "--num-workers", "0"]
    test_images = {r.image_id for r in load_records("folder", "test", str(data), seed=42)}
    rows = read_jsonl(data / "captions.jsonl")
    for i in range(30):
        add_image(data, f"added{i}.png")
    capsys.readouterr()
    assert eval_script.main(evaluate) == 0
    note = capsys.readouterr().err
    assert f"lists 82 images without a split, 52 when {tmp_path / 'run'} trained" in note, note
    scored = {row["image_id"] for row in read_jsonl(tmp_path / "eval" / "predictions.jsonl")}
    assert test_images <= scored and all(name.startswith("added") for name in scored - test_images), scored
    # the caption file as the run trained on it, less its test images: a training image stands in for them
    write_jsonl(data / "captions.jsonl", [row for row in rows if row["image"] not in test_images])
    # It names the split the stand-in is for: val still has its images, test has none.
    with pytest.raises(UserError, match=r"no image's hash now falls in test, .* stands in .* may have trained on"):
        eval_script.main(evaluate)


def baseline_images(out: Path) -> int:
    return read_json(out / "metrics.json", "")["baseline"]["train_images"]


def test_the_baseline_on_a_grown_folder_retrieves_only_from_the_images_the_run_trained_on(tiny, tmp_path, capsys):
    """Images added to a caption folder since training are dealt to train (most of them): the baseline took
    them in and retrieved from more data than the run saw. Rows naming their split ("train") likewise."""
    data = folder_without_splits(tiny, tmp_path)
    args = train_args({**tiny, "data_dir": str(data)}, tmp_path, "run", "--max-steps", "2", "--final-eval", "false")
    assert train.main(args) == 0
    trained = {r.image_id for r in load_records("folder", "train", str(data), seed=42)}
    for i in range(10):
        add_image(data, f"added{i}.png")
    write_jsonl(data / "captions.jsonl", [*read_jsonl(data / "captions.jsonl"),
                                          {"image": "added0.png", "caption": "named", "split": "train"}])
    grown = {r.image_id for r in load_records("folder", "train", str(data), seed=42)}
    assert len(grown) > len(trained)
    evaluate = [str(tmp_path / "run"), "--out", str(tmp_path / "eval"), "--no-progress", "--num-workers", "0"]
    capsys.readouterr()
    assert eval_script.main(evaluate) == 0
    assert baseline_images(tmp_path / "eval") == len(trained)
    assert (f"the baseline retrieves from the {len(trained)} images the run trained on, of the {len(grown)} in "
            "the train split now") in capsys.readouterr().err
    assert app.build_baseline(load_captioner(tmp_path / "run"), tmp_path / "run", 8, False)[1].startswith(
        f"the first caption of the most CLIP-similar of the run's {len(trained)} training images")


def test_a_split_edited_since_training_cannot_put_a_training_image_in_the_test_split(tiny, tmp_path):
    """A folder whose rows name every image's split records no deal, so nothing compared it later: a training
    image whose row was edited to "test" was scored as unseen. That is refused; the folder as it was, or
    grown, evaluates; --split train scores training images knowingly (with its note)."""
    data = shutil.copytree(tiny["data_dir"], tmp_path / "data")
    args = train_args({**tiny, "data_dir": str(data)}, tmp_path, "run", "--max-steps", "2", "--final-eval", "false")
    assert train.main(args) == 0
    evaluate = [str(tmp_path / "run"), "--limit", "2", "--out", str(tmp_path / "eval"), "--no-progress",
                "--num-workers", "0"]
    rows = read_jsonl(data / "captions.jsonl")
    moved = next(row["image"] for row in rows if row["split"] == "train")
    write_jsonl(data / "captions.jsonl", [{**row, "split": "test"} if row["image"] == moved else row for row in rows])
    # --limit 2 draws from the test split as it is now: score all of it, the moved image among them
    with pytest.raises(UserError, match=rf"1 of the 7 test images are ones {re.escape(str(tmp_path / 'run'))} "
                                        rf"trained on \(first: {re.escape(moved)}\)"):
        eval_script.main([arg for arg in evaluate if arg not in ("--limit", "2")])
    assert eval_script.main([*evaluate, "--split", "train"]) == 0
    write_jsonl(data / "captions.jsonl", rows)
    assert eval_script.main(evaluate) == 0


def test_metrics_name_the_scored_run_by_a_path_that_holds_from_any_folder(run, monkeypatch):
    """A run evaluated as `eval.py saved_models/x` was recorded as that relative path, and --compare run from another
    folder found no adapter there to tell whether the figures were stale."""
    monkeypatch.chdir(run.parent)
    scored = eval_script.what_was_scored(Path(run.name), "folder", "test", [])
    assert scored["checkpoint"] == str(run) and Path(scored["checkpoint"]).is_absolute()


def test_eval_names_the_backbones_and_data_the_run_folder_makes_it_load(run, tiny, tmp_path, capsys):
    """Said once, before any of them loads, in one line on stderr; what a flag names is left out of it."""
    argv = [str(run), "--limit", "2", "--out", str(tmp_path), "--no-progress", "--num-workers", "0"]
    assert eval_script.main([*argv, "--lm-model", tiny["lm_model"]]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: loading ")]
    assert said == [f"note: loading CLIP {tiny['clip_model']}, as {run / 'adapter_config.json'} names them; data "
                    f"{tiny['data_dir']}, as {run / 'run_config.json'} names it"]


def test_a_hard_link_to_a_training_image_counts_as_that_image(tmp_path):
    """The overlap notes told images apart by real path: a hard link to a training image (the same file, under
    another name) was not counted among the training images."""
    from dataset import ImageRecord

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    os.link(tmp_path / "a.png", tmp_path / "a-copy.png")
    (tmp_path / "a-link.png").symlink_to(tmp_path / "a.png")
    train_records = [ImageRecord("a.png", ["x"], "train", path=tmp_path / "a.png")]
    held_out = [ImageRecord(name, ["x"], "test", path=tmp_path / name) for name in ("a-copy.png", "a-link.png")]
    assert eval_script.trained_on_note(held_out, train_records).startswith("2 of the 2 images are among the run's")


def test_eval_run_as_a_script_sets_what_loading_left_aside_for_the_collector(run, tmp_path):
    """`python eval.py RUN` starts with the cyclic collector paused, and once the captioner has loaded, what loading
    left is frozen (utils.resume_gc_after_loading): collections while captioning and scoring went through its some
    380,000 objects, and a demo evaluation of 150 images took 14.7 s, now 13.1 s (means of 3, 2-core AMD EPYC)."""
    import subprocess
    import sys

    script = """
import gc, json, runpy, sys
sys.argv = ["eval.py", *sys.argv[1:]]
try:
    runpy.run_path("eval.py", run_name="__main__")
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""
    done = subprocess.run([sys.executable, "-c", script, str(run), "--out", str(tmp_path / "out"), "--no-progress",
                           "--num-workers", "0"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and report["gc_enabled"] and report["frozen"] > 100_000, (report, done.stderr[-2000:])
    assert (tmp_path / "out" / "metrics.json").is_file()
