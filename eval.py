"""Caption a split with a trained run and score it against all references.

    python eval.py saved_models/demo                     # test split of the data the run trained on
    python eval.py saved_models/demo --split val --limit 100 --strategy beam --num-beams 5
    python eval.py saved_models/demo/last                # the last adapter instead of the best

Prints a table and writes metrics.json (rougeL, bleu4, ...) and predictions.jsonl (image id,
prediction, references) into the run folder (or --out). ROUGE-L is the rouge-score package's
F1 with the best reference per image; BLEU-4 is NLTK's corpus BLEU: the variants are named in
metrics.json. (These are not the COCO-toolkit numbers papers report.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dataset import DATASETS, FLICKR30K_PARQUET, extract_features, limit_records, load_records
from model import ADAPTER_CONFIG, LM_QUANTIZATIONS, DecodingConfig, load_captioner
from utils import (BLEU_VARIANT, ROUGE_L_VARIANT, UserError, caption_metrics, format_table,
                   read_json, run_cli, write_json, write_jsonl)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="greedy", help="decoding strategy")
    group.add_argument("--num-beams", type=int, default=3, help="beam width for --strategy beam")
    group.add_argument("--temperature", type=float, default=0.7, help="temperature for --strategy sample")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --strategy sample")
    group.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in tokens")
    group.add_argument("--seed", type=int, default=0, help="random seed (matters for --strategy sample)")


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading")
    group.add_argument("--lm-quantization", choices=LM_QUANTIZATIONS, default=None,
                       help="load the frozen LM in 8-bit or 4-bit NF4 through bitsandbytes, for small GPUs "
                            "(default: what the run trained with, from its run_config.json; else none)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow backbones whose checkpoints ship their own Python code to run it; off unless "
                            "given here (a checkpoint can never turn it on)")


def loading_from_args(args, checkpoint: Path) -> dict:
    """load_captioner's options: quantisation from the flag, else the run's own; trust only from the flag."""
    lm_quantization = args.lm_quantization or find_run_config(checkpoint).get("lm_quantization") or "none"
    return {"lm_quantization": lm_quantization, "trust_remote_code": args.trust_remote_code}


def decoding_from_args(args) -> DecodingConfig:
    return DecodingConfig(strategy=args.strategy, num_beams=args.num_beams, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


@torch.no_grad()
def evaluate_captioner(captioner, records, decoding: DecodingConfig, batch_size: int = 64,
                       feature_batch_size: int = 64, num_workers: int = 0, progress: bool = True):
    """Caption every record in batches; score each against all its references."""
    from tqdm.auto import tqdm

    captioner.eval()
    features = extract_features(captioner, records, feature_batch_size, num_workers, progress)
    predictions = []
    for start in tqdm(range(0, len(records), batch_size), desc="captioning", unit="batch", disable=not progress):
        predictions += captioner.generate(features[start : start + batch_size], decoding)
    references = [r.captions for r in records]
    metrics = caption_metrics(predictions, references)
    per_image = metrics.pop("rougeL_per_image")
    metrics.update({"rougeL_variant": ROUGE_L_VARIANT, "bleu4_variant": BLEU_VARIANT,
                    "decoding": vars(decoding)})
    rows = [{"image_id": r.image_id, "prediction": p, "references": r.captions, "rougeL": s}
            for r, p, s in zip(records, predictions, per_image)]
    return metrics, rows


def write_eval_outputs(out_dir: Path, metrics: dict, predictions: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / METRICS_FILE, metrics)
    write_jsonl(out_dir / PREDICTIONS_FILE, predictions)


def print_metrics(metrics: dict, title: str) -> None:
    rows = [("ROUGE-L", f"{metrics['rougeL']:.4f}", metrics["rougeL_variant"]),
            ("BLEU-4", f"{metrics['bleu4']:.4f}", metrics["bleu4_variant"])]
    print(f"\n{title}\n" + format_table(rows, ("metric", "score", "variant")) + "\n")


def find_run_config(checkpoint: Path) -> dict:
    """run_config.json sits in the run folder; last/ is one level below it."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / "run_config.json").is_file():
            return read_json(folder / "run_config.json", "run config")
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder (best adapter) or its last/ sub-folder")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to caption")
    parser.add_argument("--limit", type=int, default=0, help="caption at most this many images (seeded); 0 = all")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="data source (default: the run's own)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: the run's own)")
    parser.add_argument("--hub-data-files", default=None, help="parquet files for --dataset flickr30k")
    parser.add_argument("--out", default=None, help="folder for metrics.json and predictions.jsonl (default: checkpoint)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generation batch")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers that decode images")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_loading_flags(parser)
    add_decoding_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        raise UserError(f"{checkpoint} is not a run folder: it has no {ADAPTER_CONFIG}")
    run = find_run_config(checkpoint)
    dataset = args.dataset or run.get("dataset")
    if dataset is None:
        raise UserError(f"{checkpoint} does not say which data it was trained on; pass --dataset and --data-dir")
    data_dir = args.data_dir or (run.get("data_dir") if dataset == run.get("dataset") else None)
    hub_files = args.hub_data_files or run.get("hub_data_files") or FLICKR30K_PARQUET
    seed = run.get("seed", 0)
    decoding = decoding_from_args(args)
    torch.manual_seed(args.seed)

    records = limit_records(load_records(dataset, args.split, data_dir, hub_files, seed), args.limit, seed)
    if not records:
        raise UserError(f"the {args.split} split of {dataset} {data_dir or ''} has no images with captions")
    device = pick_device(args.device)
    captioner = load_captioner(checkpoint, device=device, dtype=default_dtype(device),
                               **loading_from_args(args, checkpoint))
    metrics, predictions = evaluate_captioner(captioner, records, decoding, args.batch_size, args.batch_size,
                                              args.num_workers, not args.no_progress)
    metrics.update({"split": args.split, "checkpoint": str(checkpoint), "dataset": dataset})
    out_dir = Path(args.out) if args.out else checkpoint
    write_eval_outputs(out_dir, metrics, predictions)
    print_metrics(metrics, title=f"{checkpoint} on {dataset} {args.split} ({len(records)} images, {decoding.strategy})")
    print(f"wrote {out_dir / METRICS_FILE} and {out_dir / PREDICTIONS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
