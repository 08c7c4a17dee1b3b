"""The evaluation report eval.py writes: one self-contained HTML file, and the training curves as PNGs.

report.html holds everything inline (CSS, 128-px JPEG thumbnails and the PNG curves as base64
data URIs), so it can be mailed or archived alone. It shows the metrics beside the
nearest-neighbour baseline (and the decoding comparison, when there is one), the loss and
validation curves from the run's train_log.jsonl, and a gallery of the images with their
predictions, the baseline's captions, their references and scores, worst first by per-image
CIDEr-D (ties: lower COCO ROUGE-L first): every image of a split up to GALLERY_SIZE, the worst
GALLERY_SIZE of a larger one (eval.py --gallery-size), the metrics always of all of them.
"""
from __future__ import annotations

import base64
import html
import io
import re
import sys
import time
from pathlib import Path

from metrics import COCO_METRICS
from model import ADAPTER_CONFIG, adapter_training
from utils import (BLEU_VARIANT, ROUGE_L_VARIANT, UserError, collapse_warning, escape_surrogates, is_whole_number,
                   json_text, json_value, not_a_link, not_a_script, read_jsonl, removed_unless_renamed,
                   replace_durably, write_text)

REPORT_FILE = "report.html"
LOSS_CURVE = "curve_loss.png"
METRIC_CURVE = "curve_val_metrics.png"
THUMBNAIL_SIZE = 128
# The gallery's cards by default (eval.py --gallery-size; train.py's final evaluation). Each thumbnail costs about
# 7 KiB of HTML and the decoding of its image: every card of COCO's 5,000 test images made a 32 MiB page that took
# 27-41 s to write and Chromium 5-7 s to open. 1,000 keeps the whole test split of Flickr30k (the default data) and of
# the demo; a larger split shows its worst 1,000, and says so.
GALLERY_SIZE = 1000
GALLERY_ORDER = "per-image CIDEr-D (whole-split IDF), worst first; ties: lower COCO ROUGE-L first"
PER_IMAGE_SCORES = (("coco_cider_d", "CIDEr-D"), ("coco_bleu4", "BLEU-4"), ("coco_meteor", "METEOR"),
                    ("coco_rougeL", "ROUGE-L"), ("rougeL", "ROUGE-L (rouge-score)"))

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .note { color: #7a5a00; background: #fff6d6; padding: 4px 8px; margin: 4px 0; }
.verdict { padding: 8px 12px; margin: 12px 0; font-weight: 600; border-radius: 4px; }
.good { background: #e4f5e4; color: #145214; } .bad { background: #fde2e2; color: #8a1010; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 4px 10px; border-bottom: 1px solid #e5e5e5; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.decides td { font-weight: 600; } .variant { color: #777; font-size: 12px; }
.curves img { max-width: 560px; width: 48%; margin-right: 1%; border: 1px solid #eee; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 12px; }
.card { display: flex; gap: 10px; border: 1px solid #e2e2e2; border-radius: 6px; padding: 8px; }
.card img { width: 128px; height: 128px; object-fit: contain; background: #f3f3f3; flex: none; }
.card .noimage { width: 128px; height: 128px; background: #f3f3f3; flex: none; display: flex; align-items: center;
  justify-content: center; color: #777; font-size: 12px; }
.card .text { min-width: 0; } .pred { font-weight: 600; } .base { color: #555; }
.refs { margin: 4px 0 0 16px; padding: 0; color: #333; font-size: 12.5px; }
.scores { font-size: 12px; color: #555; } .rank { color: #999; font-size: 12px; }
"""


# Rows of the metric tables beyond the COCO metrics: (metrics.json key, printed name, variant).
EXTRA_METRICS = (("rougeL", "ROUGE-L (rouge-score)", ROUGE_L_VARIANT), ("bleu4", "BLEU-4 (NLTK)", BLEU_VARIANT))
METRIC_NAMES = dict(COCO_METRICS) | {key: name for key, name, _ in EXTRA_METRICS}


def percent(value) -> str:
    """Scores x100, as papers print them; None (METEOR without Java) as n/a."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def baseline_verdict(metrics: dict) -> str:
    """A sentence: whether the run beats the nearest-neighbour baseline, on the metric its metrics.json names."""
    key = metrics["baseline_decided_by"]
    name, ours, theirs = METRIC_NAMES.get(key, key), percent(metrics[key]), percent(metrics["baseline"][key])
    if metrics["beats_baseline"] is None:
        return (f"No verdict against the nearest-neighbour baseline: {name} is {ours} for both, as it is when it "
                "cannot weigh n-grams (too few images, or identical references); evaluate on more images.")
    if metrics["beats_baseline"]:
        return f"The adapter beats the nearest-neighbour baseline on {name} ({ours} vs {theirs})."
    return (f"WARNING: the adapter does NOT beat the nearest-neighbour baseline on {name} ({ours} vs {theirs}): "
            "retrieving the nearest training image's caption does as well or better.")


def collapse_line(metrics: dict) -> str:
    """The collapse warning for an evaluation's metrics, or "" (also for metrics.json files older than
    the diversity counts)."""
    if "diversity" not in metrics:
        return ""
    usual = metrics["baseline"].get("diversity", {}).get("top_caption_share")
    return collapse_warning(metrics["diversity"], metrics["num_images"], usual)


def sweep_rows(sweep: dict) -> tuple[list[str], list[list[str]]]:
    """The decoding comparison as a header and rows of strings (x100)."""
    header = ["decoding", *(name for _, name in COCO_METRICS), "ROUGE-L (rouge-score)", "beats baseline"]
    verdict = {True: "yes", False: "NO", None: ""}
    rows = [[row["decoding"], *(percent(row[key]) for key, _ in COCO_METRICS), percent(row["rougeL"]),
             verdict[row["beats_baseline"]]] for row in sweep["rows"]]
    return header, rows


# Explicit bidi embeddings, overrides and isolates. One in a caption or file name reordered the report's
# own text after it, to the end of its block: "baseline: <RLO>a dog (CIDEr-D 12.00)" showed the score
# backwards, as "(00.21 D-rEDIC) god a".
BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")


def esc(value) -> str:
    """`value` as HTML text. A name whose bytes are not UTF-8 (a file or run folder from an old archive)
    holds lone surrogates, which report.html's UTF-8 cannot: writing it failed after the whole evaluation,
    and metrics.json was never written. They are shown as \\udcXX escapes, as inference.py prints them,
    and bidi controls as \\u202e and the like (right-to-left text itself needs none of them)."""
    text = BIDI_CONTROLS.sub(lambda control: f"\\u{ord(control.group()):04x}", escape_surrogates(str(value)))
    return html.escape(text, quote=True)


# ----------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------

def training_curves(train_log: Path | None, out_dir: Path) -> list[Path]:
    """Loss (training and validation) and validation metrics by optimizer step, as PNGs; none without a log."""
    if train_log is None or not train_log.is_file():
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    try:
        log = read_jsonl(train_log)
        train, evals = logged_curves(log)
    except UserError as error:  # the curves are an extra: a damaged log must not cost the evaluation
        print(f"note: no training curves in the report: {error}")
        return []
    except (KeyError, TypeError, ValueError) as error:  # a record train.py does not write: an edited log
        print(f"note: no training curves in the report: {train_log} holds a record train.py does not write "
              f"({type(error).__name__}: {error})")
        return []
    if not train and not evals:
        return []
    paths = []
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if train:
        axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", lw=1.2)
    if evals:
        axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss", ms=4)
    paths.append(_finish_curve(plt, figure, axes, out_dir / LOSS_CURVE, ylabel="cross-entropy per caption token",
                               title="Loss"))
    if evals:
        figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for key, label in (("val_rougeL", "ROUGE-L (rouge-score)"), ("val_bleu4", "BLEU-4 (NLTK)")):
            if all(key in r for r in evals):
                axes.plot([r["step"] for r in evals], [100 * r[key] for r in evals], "o-", label=label, ms=4)
        if (best := kept_step(train_log.parent)) is not None or (best := best_validation(evals)) is not None:
            axes.axvline(best, color="gray", ls="--", lw=1, label=f"best, saved (step {best})")
        if all("val_cider_d" in r for r in evals):  # CIDEr-D runs to 10 (x100: 1000): an axis of its own
            cider_axes = axes.twinx()
            cider_axes.plot([r["step"] for r in evals], [100 * r["val_cider_d"] for r in evals], "s:", ms=4,
                            color="tab:green")
            cider_axes.set_ylabel("CIDEr-D x100")
            axes.plot([], [], "s:", ms=4, color="tab:green", label="CIDEr-D (right axis)")  # in the one legend
        paths.append(_finish_curve(plt, figure, axes, out_dir / METRIC_CURVE, ylabel="score x100",
                                   title="Validation captions (greedy)"))
    return paths


CURVE_VALUES = ("loss", "val_loss", "val_rougeL", "val_bleu4", "val_cider_d")


def logged_curves(log: list) -> tuple[list[dict], list[dict]]:
    """The log's training and validation records, their plotted values made floats: the log spells a non-finite
    number "NaN" or "Infinity" (utils.finite_json), which float() reads. A record train.py does not write (not an
    object, a step that is not a whole number, a value that is not a number, no loss) raises KeyError, TypeError or
    ValueError: an edited log's "abc" or [1] was a traceback after the whole evaluation, with no metrics.json."""
    def number(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"{json_text(value)[:40]} is not a number")
        return float(value)

    def plotted(record: dict, loss: str) -> dict:
        for key in ("step", loss):
            if key not in record:
                raise KeyError(key)
        if not is_whole_number(record["step"]):
            raise TypeError(f"step {json_text(record['step'])[:40]} is not a whole number")
        return {key: number(value) if key in CURVE_VALUES else value for key, value in record.items()}

    if odd := next((record for record in log if not isinstance(record, dict)), None):
        raise TypeError(f"{json_text(odd)[:40]} is not a record")
    train = [record for record in log if record.get("type") == "train" and "loss" in record]
    evals = [record for record in log if record.get("type") == "eval"]
    return [plotted(record, "loss") for record in train], [plotted(record, "val_loss") for record in evals]


def kept_step(run_dir: Path) -> int | None:
    """The step of the adapter at the run's top, as its adapter_config.json records it: the truth
    where the log cannot say (a run resumed after its best was saved but before its next checkpoint
    has no record of that validation left), or as the copy inside its weights does where a crash left the file
    an older step's (model.adapter_training). None where it records none."""
    training = adapter_training(run_dir, json_value(run_dir / ADAPTER_CONFIG, "training"))
    best = training.get("best") if isinstance(training, dict) else None
    step = best.get("step") if isinstance(best, dict) else None
    return step if is_whole_number(step) else None


def best_validation(evals: list[dict]) -> int | None:
    """The step of the validation whose adapter train.py kept, from the log: the last one it marked
    "best" (runs since --select-by), else the first with the highest val ROUGE-L among those logged
    before marks existed (how those runs chose; an older run resumed since has both kinds)."""
    marked = [r for r in evals if r.get("best")]
    if marked:
        return marked[-1]["step"]
    older = [r for r in evals if "best" not in r]
    if older and all("val_rougeL" in r for r in older):
        return max(older, key=lambda r: (r["val_rougeL"], -r["step"]))["step"]
    return None


def _finish_curve(plt, figure, axes, path, ylabel: str, title: str):
    """Label, grid, legend and save one curve figure; returns its path."""
    axes.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # else matplotlib warns "No artists with labels" into the run's output
        axes.legend()
    figure.tight_layout()
    # Rendered in memory, then replaced atomically like the other outputs: savefig straight onto
    # the file would leave half a PNG there if the evaluation stopped mid-write.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    with removed_unless_renamed(not_a_link(path.with_name(path.name + ".tmp"))) as tmp:
        tmp.write_bytes(buffer.getvalue())
        replace_durably(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(image) -> str:
    """A JPEG thumbnail, at most THUMBNAIL_SIZE px on its longer side, as a data URI."""
    image = image.copy()
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg")


def worst_first(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["coco_cider_d"], r["coco_rougeL"], str(r["image_id"])))


def metrics_table(metrics: dict) -> str:
    baseline = metrics["baseline"]
    lines = ["<table><tr><th>metric (x100)</th><th>this run</th><th>NN baseline</th><th>difference</th>"
             "<th>variant</th></tr>"]
    rows = [(key, name, "COCO (pycocoevalcap), " + metrics["coco_tokenization"]) for key, name in COCO_METRICS]
    rows += [(key, name, metrics.get(f"{key}_variant", variant)) for key, name, variant in EXTRA_METRICS]
    for key, name, variant in rows:
        ours, theirs = metrics.get(key), baseline.get(key)
        # Of the figures as shown, so that the row adds up (252.74 - 658.66 is -405.92, not -405.91).
        difference = ("n/a" if ours is None or theirs is None
                      else f"{float(percent(ours)) - float(percent(theirs)):+.2f}")
        css = ' class="decides"' if key == metrics["baseline_decided_by"] else ""
        lines.append(f"<tr{css}><td>{esc(name)}</td><td class=num>{percent(ours)}</td>"
                     f"<td class=num>{percent(theirs)}</td><td class=num>{difference}</td>"
                     f"<td class=variant>{esc(variant)}</td></tr>")
    return "\n".join(lines) + "</table>"


def sweep_html(sweep: dict) -> str:
    header, rows = sweep_rows(sweep)
    lines = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        lines.append("<tr><td>" + esc(row[0]) + "</td>" + "".join(f"<td class=num>{esc(c)}</td>" for c in row[1:])
                     + "</tr>")
    return "\n".join(lines) + "</table>"


def gallery_card(rank: int, row: dict, image) -> str:
    scores = " · ".join(f"{esc(name)} {percent(row.get(key))}" for key, name in PER_IMAGE_SCORES)
    refs = "".join(f"<li>{esc(ref)}</li>" for ref in row["references"])
    picture = f'<img src="{thumbnail_uri(image)}" alt="{esc(row["image_id"])}">' if image is not None else \
        '<div class="noimage">image not readable</div>'  # (an <img> without src is not HTML)
    return (f'<div class="card">{picture}<div class="text"><div class="rank">#{rank} · {esc(row["image_id"])}</div>'
            f'<div class="pred">{esc(row["prediction"]) or "<i>(empty)</i>"}</div>'
            f'<div class="base">baseline: {esc(row["baseline"])} '
            f'(CIDEr-D {percent(row.get("baseline_coco_cider_d"))})</div>'
            f'<div class="scores">{scores}</div><ul class="refs">{refs}</ul></div></div>')


def open_quietly(record):
    """The record's image, or None: one unreadable image must not cost the whole report."""
    try:
        return record.open()
    except (UserError, OSError):
        return None


def render_report(metrics: dict, rows: list[dict], records, curves: list[Path], sweep: dict | None,
                  gallery_size: int = GALLERY_SIZE) -> str:
    """The page. `gallery_size`: the worst so many images get a card, 0 every image."""
    by_id = {record.image_id: record for record in records}
    ordered = worst_first(rows)
    if gallery_size > 0:
        ordered = ordered[:gallery_size]
    title = f"Evaluation: {metrics.get('checkpoint', '')}"
    meta = (f"{metrics.get('dataset', '?')} {metrics.get('split', '?')} split · {metrics['num_images']:,} images · "
            f"decoding: {metrics.get('decoding_name', '?')} · "
            f"LM quantization: {metrics.get('lm_quantization', '?')} · tokenisation: {metrics['coco_tokenization']} "
            f"({metrics.get('coco_tokenization_detail', '')}) · "
            f"{metrics['processes']['num_processes']} process(es) · "
            f"written {time.strftime('%Y-%m-%d %H:%M')}")
    verdict_class = {True: "good", False: "bad"}.get(metrics["beats_baseline"], "note")  # None: no verdict
    collapsed = collapse_line(metrics)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>", f'<div class="meta">{esc(meta)}</div>',
        *(f'<div class="note">note: {esc(note)}</div>' for note in metrics.get("notes", [])),
        f'<div class="verdict {verdict_class}">{esc(baseline_verdict(metrics))}</div>',
        *([f'<div class="verdict bad">{esc(collapsed)}</div>'] if collapsed else []),
        "<h2>Metrics</h2>", metrics_table(metrics),
        f'<p class="variant">Scale: {esc(metrics.get("coco_scale", ""))}. Baseline: '
        f'{esc(metrics["baseline"]["method"])}, over {metrics["baseline"]["train_images"]} training images. '
        f'Scorers: {esc(metrics.get("coco_variant", ""))}.</p>',
    ]
    if sweep is not None:
        parts += ["<h2>Decoding comparison</h2>", sweep_html(sweep)]
    parts.append("<h2>Training curves</h2>")
    if curves:
        parts.append('<div class="curves">' + "".join(
            f'<img src="{data_uri(path.read_bytes(), "image/png")}" alt="{esc(path.name)}">' for path in curves)
            + "</div>")
    else:
        parts.append("<p>No training curves: no readable train_log.jsonl next to this checkpoint.</p>")
    shown = f"all {len(rows):,}" if len(ordered) == len(rows) else f"the worst {len(ordered):,} of {len(rows):,}"
    parts += [f"<h2>Gallery: {shown} images</h2>", *gallery_cut_note(len(ordered), len(rows)),
              f'<p class="variant">Order: {esc(GALLERY_ORDER)}. '
              "Bold: this run's caption; then the baseline's; then the references.</p>", '<div class="gallery">']
    for rank, row in enumerate(ordered, 1):
        record = by_id.get(row["image_id"])
        parts.append(gallery_card(rank, row, open_quietly(record) if record is not None else None))
    parts += ["</div>", "</body></html>"]
    return "\n".join(parts) + "\n"


def gallery_cut_note(shown: int, scored: int) -> list[str]:
    """The line under the gallery's title where it shows fewer images than were scored (none where it shows all):
    which ones it leaves out, and where they are."""
    if shown == scored:
        return []
    return [f'<div class="note">The metrics above are of all {scored:,} images; the gallery shows the worst '
            f"{shown:,}, and predictions.jsonl holds every image's caption and scores. To show every image here, "
            "evaluate with eval.py --gallery-size 0.</div>"]


def write_report(out_dir: Path, metrics: dict, rows: list[dict], records, train_log: Path | None,
                 sweep: dict | None = None, gallery_size: int = GALLERY_SIZE) -> list[Path]:
    """report.html and the curve PNGs beside it; returns the paths written."""
    curves = training_curves(train_log, out_dir)
    path = out_dir / REPORT_FILE
    write_text(path, render_report(metrics, rows, records, curves, sweep, gallery_size))
    return [path, *curves]


if __name__ == "__main__":  # eval.py writes the report
    sys.exit(not_a_script(__file__))
