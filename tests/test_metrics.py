"""The COCO metrics equal the reference implementation's, the Python tokenisation equals Java's on
ordinary captions, a missing Java degrades with a note, and the nearest-neighbour rule."""
from __future__ import annotations

import shutil

import pytest
import torch

import metrics
from eval import nearest_neighbour_captions, nearest_training_images
from metrics import COCO_METRICS, coco_metrics, ptb_tokenize_python

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the reference PTB tokenizer and METEOR need Java")

# Capitals, punctuation, contractions and brackets, so that tokenisation changes the scores;
# enough images that CIDEr-D's IDF differs from one image to the whole split.
PREDICTIONS = [
    "A man riding a brown horse on the beach.",
    "Two dogs (one brown, one white) play in the grass!",
    "A woman's red umbrella in the rain",
    "A CAT sitting on a couch.",
    "a group of people standing around a table",
    "A child can't reach the cookie jar...",
    "a dog",
    "",
]
REFERENCES = [
    ["A man rides a horse along the beach.", "Someone riding a brown horse by the sea.", "A horse and rider on sand."],
    ["Two dogs playing in the grass.", "A brown dog and a white dog play outside.", "Dogs run on a lawn!"],
    ["A woman holds a red umbrella.", "A red umbrella in the rain.", "Someone walks in the rain with an umbrella."],
    ["A cat sits on the couch.", "A grey cat lying on a sofa.", "The cat is sitting on a couch."],
    ["People stand around a table.", "A group of people gathered at a table.", "Several people near a table."],
    ["A child reaching for a cookie jar.", "A kid can't reach the jar.", "A little boy tries to reach cookies."],
    ["A dog runs in a field.", "A black dog running.", "A dog outside."],
    ["A bowl of fruit.", "Apples and bananas in a bowl.", "Fruit in a bowl on a table."],
]
# Ordinary captions and punctuation the Python imitation must tokenise exactly like the Java tokenizer.
TOKENIZER_CASES = [
    "A man's colour (grey) dog, running!", 'She said "hello" -- and left...', "can't won't I'm",
    "black-and-white photo of 1,000 people & a cat; yes: no?", "", "...", "A [red] {circle} on a white background.",
    "U.S. flag at 3.5 p.m.", "an  emoji \U0001F600 café naïve", "don't 'quote' this", "Mr. Smith's 90's car",
    "rock 'n' roll", "e-mail @home #tag $5 50% a/b", "Two dogs play in the grass .", "A dog. It runs.",
    "I cannot go, gonna wanna gotta", "AT&T store", "He's 5' tall", "the 'best' dog", "dogs' toys",
    "Two young guys with shaggy hair look at their hands while hanging out in the yard.", "The St. Louis arch.",
    "Is it? Yes! No.", "x-ray of a 10-year-old", "The boys' team won!!", "Kids at 5:30 play", "a man - on a bike",
    'A sign reads "STOP".', "She's got a 'nice' car, doesn't she?", "A bird (maybe a hawk) flies", "a 1990's car",
    "A    spaced   caption  ", *PREDICTIONS, *(ref for refs in REFERENCES for ref in refs),
]


def reference_scores(predictions, references, tokenize=True) -> dict:
    """pycocoevalcap called directly, as its COCOEvalCap.evaluate does (minus SPICE, which needs a download)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": ref} for ref in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": pred}] for i, pred in enumerate(predictions)}
    if tokenize:
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        gts = {i: [c["caption"] for c in v] for i, v in gts.items()}
        res = {i: [c["caption"] for c in v] for i, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    scores = {f"coco_bleu{n + 1}": bleu[n] for n in range(4)}
    scores["coco_rougeL"] = Rouge().compute_score(gts, res)[0]
    scores["coco_cider_d"], scores["cider_per_image"] = cider, list(cider_per_image)
    if tokenize:
        scores["coco_meteor"] = Meteor().compute_score(gts, res)[0]
    scores["gts"], scores["res"] = gts, res
    return scores


@needs_java
def test_coco_metrics_equal_the_reference_implementation():
    ours = coco_metrics({"run": PREDICTIONS}, REFERENCES)["run"]
    reference = reference_scores(PREDICTIONS, REFERENCES)
    assert ours.metrics["coco_tokenization"] == "ptb-java"
    for key, name in COCO_METRICS:
        assert ours.metrics[key] == pytest.approx(reference[key], rel=1e-12, abs=1e-15), name
    assert ours.per_image["coco_cider_d"] == pytest.approx(reference["cider_per_image"], rel=1e-12)

    # The fixture is sensitive to what must not break: on raw (untokenised, mixed-case) text the
    # reference gives other numbers, so equality above means tokenisation and lower-casing happened.
    raw = reference_scores(PREDICTIONS, REFERENCES, tokenize=False)
    assert raw["coco_cider_d"] != pytest.approx(reference["coco_cider_d"])
    assert raw["coco_bleu4"] != pytest.approx(reference["coco_bleu4"])
    # ... and CIDEr-D is a whole-split statistic: image by image (IDF of one image) it is another number.
    from pycocoevalcap.cider.cider import Cider

    one_by_one = [Cider().compute_score({0: reference["gts"][i]}, {0: reference["res"][i]})[0]
                  for i in range(len(PREDICTIONS))]
    assert sum(one_by_one) / len(one_by_one) != pytest.approx(ours.metrics["coco_cider_d"])
    half = coco_metrics({"run": PREDICTIONS[:4]}, REFERENCES[:4], use_java=True)["run"]
    assert half.per_image["coco_cider_d"][0] != pytest.approx(ours.per_image["coco_cider_d"][0])


@needs_java
def test_python_tokenisation_equals_the_java_tokenizer_on_ordinary_captions():
    java, tokenization, notes = metrics.tokenize_captions(TOKENIZER_CASES, use_java=True)
    assert tokenization == "ptb-java" and not notes
    assert [ptb_tokenize_python(caption) for caption in TOKENIZER_CASES] == java


def test_without_java_the_metrics_degrade_with_one_note(monkeypatch, capsys):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))
    notes = []
    ours = coco_metrics({"run": PREDICTIONS}, REFERENCES, notes=notes)["run"]
    assert ours.metrics["coco_tokenization"] == "ptb-python"
    assert ours.metrics["coco_meteor"] is None and ours.per_image["coco_meteor"] == [None] * len(PREDICTIONS)
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and "java not found" in printed[0] and "METEOR" in printed[0] and notes
    # The same scorers on the Python tokens, called directly.
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [ptb_tokenize_python(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [ptb_tokenize_python(p)] for i, p in enumerate(PREDICTIONS)}
    assert ours.metrics["coco_cider_d"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert ours.metrics["coco_bleu1"] > 0 and ours.metrics["coco_rougeL"] > 0


def test_each_set_of_predictions_in_one_call_gets_the_scores_of_its_own_captions():
    """eval.py scores the adapter and the baseline (and each decoding of a sweep) in one call, their captions
    tokenised together: each set must score as it does alone, not with another set's captions."""
    others = PREDICTIONS[::-1]
    together = coco_metrics({"run": PREDICTIONS, "baseline": others}, REFERENCES, use_java=False)
    for name, predictions in (("run", PREDICTIONS), ("baseline", others)):
        alone = coco_metrics({name: predictions}, REFERENCES, use_java=False)[name]
        assert together[name].metrics == alone.metrics and together[name].per_image == alone.per_image, name
    assert together["run"].metrics != together["baseline"].metrics


def test_validation_cider_d_is_the_splits_cider_d_with_python_tokens():
    scores = coco_metrics({"run": PREDICTIONS}, REFERENCES, use_java=False)["run"]
    assert metrics.validation_cider_d(PREDICTIONS, REFERENCES) == pytest.approx(scores.metrics["coco_cider_d"],
                                                                                 rel=1e-12)
    assert scores.metrics["coco_cider_d"] > 0
    # A whole-split statistic: the IDF of half the split gives the first image another score.
    half = metrics.validation_cider_d(PREDICTIONS[:4], REFERENCES[:4])
    assert half != pytest.approx(sum(scores.per_image["coco_cider_d"][:4]) / 4)
    with pytest.raises(ValueError, match="3 predictions for 4 images"):
        metrics.validation_cider_d(PREDICTIONS[:3], REFERENCES[:4])


def test_nearest_neighbour_captions_rule():
    train_features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0], [0.0, 2.0]])
    train_captions = [["a first", "a second"], "b", ["c"], ["d"]]
    queries = torch.tensor([[2.0, 0.1], [0.0, 5.0], [1.0, 1.0]])
    # Cosine, not distance: [1, 1] is nearest to [10, 10] in angle. [0, 5] ties between [0, 1] and
    # [0, 2]: the earliest training image wins. Always the first caption of the image.
    assert nearest_neighbour_captions(train_features, train_captions, queries) == ["a first", "b", "c"]
    assert nearest_neighbour_captions(train_features, train_captions, queries, chunk_size=1) == ["a first", "b", "c"]
    with pytest.raises(ValueError):
        nearest_neighbour_captions(train_features, train_captions[:2], queries)
    # The same search gives each nearest image's cosine too (eval.py's note on copies of training images).
    nearest = nearest_training_images(train_features, queries, chunk_size=2)
    assert nearest.index == [0, 1, 2]
    assert nearest.similarity == pytest.approx([2 / 4.01**0.5, 1.0, 1.0])


def test_an_interrupt_while_meteor_scores_ends_the_process_instead_of_hanging_it():
    """pycocoevalcap's Meteor keeps its lock when scoring is interrupted and waits for it again at
    exit: the process hung for good after printing "interrupted". A stand-in JVM that never answers
    (no Java needed) is interrupted the way Ctrl-C would; the script must end, with 130."""
    import subprocess
    import sys
    from pathlib import Path

    # SIG_DFL first, as eval.py sets it at its start: a test run started in the background by a
    # non-interactive shell inherits an ignored SIGINT, and the stand-in would then wait for good.
    script = """
import os, signal, subprocess, sys, threading
signal.signal(signal.SIGINT, signal.SIG_DFL)
from pycocoevalcap.meteor.meteor import Meteor
import metrics
from utils import run_cli

def silent_jvm(self):
    self.meteor_p = subprocess.Popen(["sleep", "600"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self.lock = threading.Lock()

Meteor.__init__ = silent_jvm
def main(argv):
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    metrics._meteor_scores({0: ["a dog"]}, {0: ["a dog"]})
sys.exit(run_cli(main))
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (130, "interrupted (Ctrl-C)"), done.stderr[-2000:]


def test_a_meteor_that_failed_is_retried_without_hanging_on_its_lock(monkeypatch):
    """pycocoevalcap's Meteor keeps its lock when compute_score raises (a dead JVM: float(b"")), and its
    __del__ takes that lock again: dropped for a fresh one, the old instance hung the process for good
    once the garbage collector reached it (seen as a test run asleep in Meteor.__del__ for 15 minutes)."""
    import gc
    import threading

    import metrics

    hung = []

    class Process:
        stdin = type("Pipe", (), {"close": lambda self: None})()

        def kill(self):
            pass

        def wait(self, timeout=None):
            return 0

    class FlakyMeteor:  # pycocoevalcap's locking, with a JVM that dies on the first use
        made = 0

        def __init__(self):
            self.lock, self.meteor_p, self.number = threading.Lock(), Process(), FlakyMeteor.made
            FlakyMeteor.made += 1

        def compute_score(self, gts, res):
            self.lock.acquire()
            if self.number == 0:
                raise ValueError("could not convert string to float: ''")
            self.lock.release()
            return 0.5, [0.5]

        def __del__(self):
            if not self.lock.acquire(timeout=2):  # the real one waits forever
                hung.append(self.number)
                return
            self.lock.release()

    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", FlakyMeteor)
    metrics._meteor.cache_clear()
    try:
        assert metrics._meteor_scores({0: ["a dog"]}, {0: ["a dog"]}) == (0.5, [0.5])
    finally:
        metrics._meteor.cache_clear()
    gc.collect()
    assert FlakyMeteor.made == 2 and hung == []


def test_a_meteor_that_fails_after_scoring_some_sets_is_left_out_of_every_set(monkeypatch):
    """METEOR dying for the baseline after it scored the adapter (no Java needed: a stand-in) must leave METEOR out of
    both, or the report compares a METEOR with a missing one."""
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(metrics, "_ptb_tokenize_java", lambda captions: [ptb_tokenize_python(c) for c in captions])
    answers = iter([(0.5, [0.5] * len(PREDICTIONS))])

    def meteor_once(gts, res):
        try:
            return next(answers)
        except StopIteration:
            raise OSError("METEOR's JVM ended") from None

    monkeypatch.setattr(metrics, "_meteor_scores", meteor_once)
    notes = []
    scored = coco_metrics({"run": PREDICTIONS, "baseline": PREDICTIONS[::-1]}, REFERENCES, notes=notes)
    for result in scored.values():
        assert result.metrics["coco_meteor"] is None and result.per_image["coco_meteor"] == [None] * len(PREDICTIONS)
    assert any("METEOR failed" in note for note in notes)


def test_each_image_keeps_its_own_scores_under_every_name():
    """predictions.jsonl and the report's gallery (worst first) show each image's own BLEU-4, ROUGE-L and CIDEr-D:
    pycocoevalcap's per-image lists, called directly here on the same (Python) tokens, each under its own key."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ours = coco_metrics({"run": PREDICTIONS}, REFERENCES, use_java=False)["run"]
    gts = {i: [ptb_tokenize_python(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [ptb_tokenize_python(p)] for i, p in enumerate(PREDICTIONS)}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours.metrics[f"coco_bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12)
    assert ours.per_image["coco_bleu4"] == pytest.approx(bleu_per_image[3], rel=1e-12)
    assert ours.per_image["coco_bleu4"] != pytest.approx(bleu_per_image[0])  # the fixture tells BLEU-4 from BLEU-1
    assert ours.per_image["coco_rougeL"] == pytest.approx(Rouge().compute_score(gts, res)[1], rel=1e-12)
    assert ours.per_image["coco_cider_d"] == pytest.approx(Cider().compute_score(gts, res)[1], rel=1e-12)


def test_predictions_that_do_not_match_the_images_are_refused_in_one_line():
    """Not pycocoevalcap's bare AssertionError from deep inside BLEU."""
    with pytest.raises(ValueError, match="^baseline: 3 predictions for 4 images$"):
        coco_metrics({"run": PREDICTIONS[:4], "baseline": PREDICTIONS[:3]}, REFERENCES[:4], use_java=False)
    with pytest.raises(ValueError, match="^run: 5 predictions for 4 images$"):
        coco_metrics({"run": PREDICTIONS[:5]}, REFERENCES[:4], use_java=False)
    with pytest.raises(ValueError, match="every image needs at least one reference caption"):
        coco_metrics({"run": PREDICTIONS[:2]}, [REFERENCES[0], []], use_java=False)
    with pytest.raises(ValueError, match="no images to score"):
        coco_metrics({"run": []}, [], use_java=False)


def test_a_java_tokenizer_that_fails_or_loses_captions_gives_way_to_the_python_one_and_says_so(monkeypatch):
    """The scores must then name ptb-python, not ptb-java: they are not the published tokenisation's. (No Java
    needed: stand-ins for pycocoevalcap's PTBTokenizer.)"""
    captions = ["A dog.", "Two cats!"]

    class LosingTokenizer:  # a caption lost on the way (one line short)
        def tokenize(self, captions_for_image):
            return {0: ["a dog"]}

    class BrokenTokenizer:  # a read-only site-packages: it writes a temp file there
        def tokenize(self, captions_for_image):
            raise OSError("Read-only file system")

    for tokenizer, said in ((LosingTokenizer, "returned 1 of 2 captions"), (BrokenTokenizer, "OSError: Read-only")):
        monkeypatch.setattr("pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer", tokenizer)
        with pytest.raises(RuntimeError, match=said):
            metrics._ptb_tokenize_java(captions)
        tokens, tokenization, notes = metrics.tokenize_captions(captions, use_java=True)
        assert (tokens, tokenization) == ([ptb_tokenize_python(c) for c in captions], "ptb-python")
        assert len(notes) == 1 and said in notes[0] and "used the Python imitation (ptb-python)" in notes[0], notes


def test_a_meteor_that_cannot_start_early_leaves_the_evaluation_going(monkeypatch):
    """eval.py starts METEOR's JVM before captioning; a JVM that will not start (OSError) must not end the evaluation
    there: the scoring meets it again, and leaves METEOR out with a note. (No Java needed: a stand-in.)"""
    def no_jvm():
        raise OSError("java: cannot allocate the heap")

    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", no_jvm)
    metrics._meteor.cache_clear()
    metrics.start_meteor()
    assert metrics._meteor.cache_info().currsize == 0
