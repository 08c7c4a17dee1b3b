"""The COCO caption metrics, computed exactly as the reference implementation (pycocoevalcap) does.

    from metrics import coco_metrics
    scores = coco_metrics({"adapter": predictions, "baseline": other}, references)
    scores["adapter"].metrics["coco_cider_d"], scores["adapter"].per_image["coco_cider_d"]

BLEU-1..4, METEOR, ROUGE-L (beta 1.2, max precision and max recall over the references) and
CIDEr-D are pycocoevalcap's own scorers, fed what its COCOEvalCap feeds them: captions
tokenised by Stanford's PTBTokenizer (CoreNLP 3.4.1, `-lowerCase`, punctuation tokens removed).
Published numbers (ClipCap, BLIP, ...) are computed this way; scores on raw text are not comparable.

Corpus statistics need the whole evaluated split: BLEU is a corpus statistic, and CIDEr-D's IDF
comes from the references of every image scored together, so the scores of one split must come
from one call. A per-image CIDEr-D here is that image's share of the whole-split computation.

The PTB tokenizer and METEOR need Java. Without it, captions are tokenised by `ptb_tokenize_python`
(a documented imitation, equal to the Java tokenizer on ordinary captions: tests/test_metrics.py),
METEOR is left out (None), and one line says so. Every result names its tokenisation.
SPICE is not computed: it downloads Stanford CoreNLP models on first use and fails offline.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TOKENIZATION_JAVA = "ptb-java"
TOKENIZATION_PYTHON = "ptb-python"
TOKENIZATION_DETAILS = {
    TOKENIZATION_JAVA: "Stanford PTBTokenizer (CoreNLP 3.4.1 via pycocoevalcap), lower-cased, punctuation removed: "
                       "as published COCO numbers",
    TOKENIZATION_PYTHON: "Python imitation of the PTB tokenizer (metrics.ptb_tokenize_python), lower-cased, "
                         "punctuation removed: Java was not available",
}
COCO_VARIANT = ("pycocoevalcap 1.2 scorers (BLEU 'closest' ref length, METEOR 1.5 -l en -norm, ROUGE-L beta 1.2, "
                "CIDEr-D sigma 6 with IDF over the whole split)")
# (metrics.json key, printed name), in the order papers print them.
COCO_METRICS = (("coco_bleu1", "BLEU-1"), ("coco_bleu2", "BLEU-2"), ("coco_bleu3", "BLEU-3"), ("coco_bleu4", "BLEU-4"),
                ("coco_meteor", "METEOR"), ("coco_rougeL", "ROUGE-L"), ("coco_cider_d", "CIDEr-D"))

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, kept here so the Python path needs no import of it.
# The list is matched after lower-casing, so "-LRB-" (which Java lower-cases to "-lrb-") is kept, as in the reference.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])


@dataclass
class CaptionScores:
    """Corpus scores of one set of predictions, and each image's own scores (same order as the input)."""

    metrics: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------

def java_available() -> bool:
    return shutil.which("java") is not None


_NON_BMP = re.compile("[\U00010000-\U0010FFFF]")  # emoji and the like: the Java lexer drops them
_PTB_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "etc", "vs", "inc", "ltd", "co", "corp", "mt",
                      "ave", "jan", "feb", "aug", "sept", "oct", "nov", "dec"}
_PTB_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_PTB_SPLITS = [  # (pattern, replacement), applied in order; the Penn Treebank sed script's rules, as NLTK has them
    (re.compile(r'^"'), " `` "),
    (re.compile(r'([ (\[{<])"'), r"\1 `` "),
    (re.compile(r"(^|[ (\[{<])'(?![nN]' |[tT](is|was)\b)(?=\S)"), r"\1 ` "),  # an opening single quote
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # 1,000 and 5:30 stay whole
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.\.\."), " ... "),
    (re.compile(r"[;$%]"), r" \g<0> "),
    (re.compile(r"(^|\s)&(\s|$)"), " & "),  # AT&T stays whole
    (re.compile(r"(\w)=(\w)"), r"\1 = \2"),
    (re.compile(r"[?!]+"), r" \g<0> "),
    (re.compile(r"[\]\[(){}]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"(?<! ')([^' ])('[sSmMdD]|') "), r"\1 \2 "),  # dog's, I'm, dogs' (but 'n' stays)
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    (re.compile(r"(?i)\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(gon|wan|got)(na|ta)\b"), r"\1 \2"),
    (re.compile(r"(?i)(^| )('t)(is|was)\b"), r"\1\2 \3"),
]


def ptb_tokenize_python(caption: str) -> str:
    """Tokenise one caption like pycocoevalcap's Java PTB tokenizer, without Java.

    Penn Treebank rules: punctuation, brackets and quotes split off, contractions split
    (can't -> ca n't, dog's -> dog 's, cannot -> can not), a word's final period split off unless
    the word is an abbreviation (p.m., u.s., mr., st.); then lower-cased, and the reference's
    punctuation tokens dropped. Equal to the Java tokenizer on ordinary captions; rare constructs
    (unusual abbreviations, HTML-like text) may differ.
    """
    text = " " + _NON_BMP.sub("", caption.replace("\n", " ")) + " "
    for pattern, replacement in _PTB_SPLITS:
        text = pattern.sub(replacement, text)
    tokens = []
    for word in text.split():
        stem = word[:-1]
        if len(word) > 1 and word.endswith(".") and word != "..." and "." not in stem \
                and stem.lower() not in _PTB_ABBREVIATIONS:
            tokens += [stem, "."]
        else:
            tokens.append(word)
    # Lower-cased before the punctuation filter, as Java's -lowerCase output is: "-lrb-" is kept.
    tokens = [_PTB_BRACKETS.get(token, token).lower() for token in tokens]
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


@contextlib.contextmanager
def _stderr_to_file():
    """Collect what a child process writes to stderr (the Java tokenizer's progress line) instead of printing it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _ptb_tokenize_java(captions: Sequence[str]) -> list[str]:
    """All captions through pycocoevalcap's PTBTokenizer in one Java call (it works line by line)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _stderr_to_file() as sink:
        try:
            tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
        except Exception as error:  # a broken JVM, a read-only site-packages (it writes a temp file there)
            raise RuntimeError(f"{type(error).__name__}: {error}") from None
        finally:
            sink.seek(0)
            errors = sink.read().decode(errors="replace").strip().splitlines()
    if sorted(tokenized) != list(range(len(captions))) or any(len(v) != 1 for v in tokenized.values()):
        detail = next((line for line in errors if "Exception" in line or "Error" in line), errors[-1] if errors else "")
        raise RuntimeError(f"the Java PTB tokenizer returned {len(tokenized)} of {len(captions)} captions ({detail})")
    return [tokenized[i][0] for i in range(len(captions))]


def tokenize_captions(captions: Sequence[str], use_java: bool | None = None) -> tuple[list[str], str, list[str]]:
    """PTB-tokenised, lower-cased captions, the tokenisation used, and notes (one line each) on any fallback."""
    if use_java is None:
        use_java = java_available()
    if not captions:
        return [], TOKENIZATION_JAVA if use_java else TOKENIZATION_PYTHON, []
    if use_java:
        try:
            return _ptb_tokenize_java(captions), TOKENIZATION_JAVA, []
        except RuntimeError as error:
            note = f"the Java PTB tokenizer failed ({error}); used the Python imitation (ptb-python)"
            return [ptb_tokenize_python(c) for c in captions], TOKENIZATION_PYTHON, [note]
    note = "java not found: captions tokenised by the Python PTB imitation (ptb-python); METEOR skipped"
    return [ptb_tokenize_python(c) for c in captions], TOKENIZATION_PYTHON, [note]


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR process per Python process: the jar takes ~7 s to load its paraphrase tables."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def start_meteor() -> None:
    """Start METEOR's JVM now, so it loads its tables while the captions are being generated."""
    if java_available():
        try:
            _meteor()
        except OSError:  # reported when the scores are computed
            _meteor.cache_clear()


def _meteor_scores(gts: dict, res: dict) -> tuple[float, list[float]]:
    try:
        try:
            score, scores = _meteor().compute_score(gts, res)
        except Exception:  # a dead JVM, or a reply out of step: start a fresh one once
            _stop_meteor()  # ends it and frees its lock: the old Meteor's __del__ would wait on it for good
            score, scores = _meteor().compute_score(gts, res)
    except BaseException:  # Ctrl-C or SIGTERM while scoring
        _stop_meteor()
        raise
    return float(score), [float(s) for s in scores]


def _stop_meteor() -> None:
    """End the METEOR process after an interrupt. pycocoevalcap's Meteor holds a lock while it scores
    and takes it again in __del__, so an interrupt in between left the lock held and Python hung for
    good at exit. Here the JVM is ended and __del__ gets a free lock and a closed pipe."""
    if not _meteor.cache_info().currsize:
        return
    meteor = _meteor()
    _meteor.cache_clear()
    meteor.meteor_p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        meteor.meteor_p.wait(timeout=10)
    with contextlib.suppress(OSError):  # a pipe to a dead process: unflushed bytes cannot go anywhere
        meteor.meteor_p.stdin.close()
    meteor.lock = threading.Lock()


def _score_tokenized(gts: dict, res: dict, with_meteor: bool) -> CaptionScores:
    """pycocoevalcap's scorers on already tokenised {index: [caption]} dicts, as COCOEvalCap calls them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    result = CaptionScores()
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        result.metrics[f"coco_bleu{n + 1}"] = float(bleu[n])
    result.per_image["coco_bleu4"] = [float(s) for s in bleu_per_image[3]]
    result.metrics["coco_meteor"], result.per_image["coco_meteor"] = (
        _meteor_scores(gts, res) if with_meteor else (None, [None] * len(res)))
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    result.metrics["coco_rougeL"], result.per_image["coco_rougeL"] = float(rouge), [float(s) for s in rouge_per_image]
    cider, cider_per_image = Cider().compute_score(gts, res)
    result.metrics["coco_cider_d"], result.per_image["coco_cider_d"] = float(cider), [float(s) for s in cider_per_image]
    return result


def validation_cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap's CIDEr-D of one split (its IDF over that split's references) with the Python PTB
    tokenisation: validation during training needs no JVM and gives the same score on every machine."""
    from pycocoevalcap.cider.cider import Cider

    if not references or len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} images")
    gts = {i: [ptb_tokenize_python(ref) for ref in refs] for i, refs in enumerate(references)}
    res = {i: [ptb_tokenize_python(prediction)] for i, prediction in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def coco_metrics(prediction_sets: Mapping[str, Sequence[str]], references: Sequence[Sequence[str]],
                 use_java: bool | None = None, notes: list[str] | None = None,
                 progress: bool = False) -> dict[str, CaptionScores]:
    """COCO metrics of each named set of predictions (one caption per image) against the same references.

    Every set is scored on the whole split at once (CIDEr-D's IDF is the split's). All captions go
    through one tokenizer call, and one METEOR process serves every set. Each result's metrics also
    name the tokenisation ("coco_tokenization"). Notes on fallbacks are appended to `notes` and
    printed to stderr, one line each. `progress`: a bar, a step per set (seconds each for 1,000 images, the
    first also waiting for METEOR's start-up: on the demo's 900 training images eval.py was silent for 20-40 s
    after its last bar).
    """
    from tqdm.auto import tqdm

    for name, predictions in prediction_sets.items():
        if len(predictions) != len(references):
            raise ValueError(f"{name}: {len(predictions)} predictions for {len(references)} images")
    if not references:
        raise ValueError("no images to score")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    if use_java is None:
        use_java = java_available()
    flat_refs = [ref for refs in references for ref in refs]
    flat_preds = [pred for predictions in prediction_sets.values() for pred in predictions]
    tokenized, tokenization, new_notes = tokenize_captions(flat_refs + flat_preds, use_java)
    with_meteor = use_java and java_available()
    if use_java and not with_meteor:
        new_notes.append("java not found: METEOR skipped")
    gts, position = {}, 0
    for index, refs in enumerate(references):
        gts[index] = tokenized[position : position + len(refs)]
        position += len(refs)
    results = {}
    for name, predictions in tqdm(prediction_sets.items(), desc="scoring (BLEU, METEOR, ROUGE-L, CIDEr-D)",
                                  unit="caption set", disable=not progress):
        res = {index: [tokenized[position + index]] for index in range(len(predictions))}
        position += len(predictions)
        try:
            results[name] = _score_tokenized(gts, res, with_meteor)
        except (OSError, ValueError) as error:  # METEOR's JVM would not start or answer
            if not with_meteor:
                raise
            with_meteor = False
            new_notes.append(f"METEOR failed ({type(error).__name__}: {error}); METEOR skipped")
            results[name] = _score_tokenized(gts, res, with_meteor)
        results[name].metrics["coco_tokenization"] = tokenization
    if not with_meteor:
        for result in results.values():  # a set scored before METEOR failed must not keep a METEOR the others lack
            result.metrics["coco_meteor"], result.per_image["coco_meteor"] = None, [None] * len(references)
    for note in new_notes:
        print(f"note: {note}", file=sys.stderr)
    if notes is not None:
        notes.extend(new_notes)
    return results


if __name__ == "__main__":
    from utils import not_a_script

    sys.exit(not_a_script(__file__))
