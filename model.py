"""The captioner: frozen CLIP vision tower -> trainable adapter -> frozen causal LM.

    from model import load_captioner
    captioner = load_captioner("saved_models/demo")
    captioner.caption_images([pil_image])

Only the adapter is trained and saved (adapter.safetensors + adapter_config.json); the backbones
are re-loaded with from_pretrained from the ids recorded in the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import (UserError, first_line, gpu_computes_in_bf16, is_whole_number, json_error, json_file_text,
                   not_a_link, note, removed_unless_renamed, replace_durably, save_safetensors, with_usual_mode,
                   write_json)

FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_KINDS = ("linear", "mlp", "transformer")
LM_QUANTIZATIONS = ("none", "8bit", "4bit")  # the frozen LM through bitsandbytes (--lm-quantization)
IGNORE_INDEX = -100  # label value the loss skips; never a real token id


@dataclass
class AdapterConfig:
    """Everything needed to rebuild a trained captioner from its run folder alone."""

    clip_model: str
    lm_model: str
    clip_revision: str | None = None
    lm_revision: str | None = None
    adapter_kind: str = "mlp"
    prefix_length: int = 10
    image_feature_dim: int = 0  # from the CLIP projection, filled in from the loaded backbone
    lm_hidden_dim: int = 0  # from the LM's embeddings, filled in from the loaded backbone
    adapter_hidden_dim: int = 0  # 0: ClipCap's rule, prefix_length * lm_hidden_dim // 2
    adapter_layers: int = 8  # transformer adapter only: its self-attention layers (ClipCap's 8)
    normalize_image_features: bool = True  # same at training and inference (ClipCap #33)
    # The adapter z-scores each feature dimension by the training set's mean and std, kept with its
    # weights (see Adapter). False in checkpoints written before it existed, and where turned off.
    standardize_image_features: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    vocab_size: int | None = None
    vocabulary_digest: str | None = None  # of the tokenizer's token -> id map: same size and EOS is not the same tokenizer
    # Of each backbone's weights files as stored (stored_weights_digest); None where unknown and before they existed.
    clip_weights_digest: str | None = None
    lm_weights_digest: str | None = None
    max_caption_tokens: int = 40
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict)  # hyperparameters, history, best scores, versions

    def __post_init__(self):
        if self.adapter_kind not in ADAPTER_KINDS:
            raise UserError(f"adapter kind {self.adapter_kind!r} is unknown; choose one of {', '.join(ADAPTER_KINDS)}")
        if self.adapter_kind == "linear":
            self.prefix_length = 1  # the original student project: one Linear, one prefix token
        if self.prefix_length < 1:
            raise UserError(f"prefix length must be >= 1, got {self.prefix_length}")
        if self.adapter_layers < 1:
            raise UserError(f"adapter layers must be >= 1, got {self.adapter_layers}")
        if self.adapter_kind == "mlp" and self.adapter_hidden_dim == 0 and self.lm_hidden_dim:
            self.adapter_hidden_dim = self.prefix_length * self.lm_hidden_dim // 2

    def to_json(self, path: str | Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def from_json(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        if path.parent.is_file():  # --checkpoint named a file, such as the run's adapter.safetensors
            raise UserError(f"{path.parent} is a file: --checkpoint names the run folder (here {path.parent.parent})")
        if not path.parent.exists():
            raise UserError(not_a_run_folder(path.parent))
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a JSON file: point --checkpoint at a run folder whose "
                            f"{ADAPTER_CONFIG} is a file")
        if not path.is_file() and (evaluation := evaluation_folder_problem(path.parent)):
            raise UserError(evaluation)
        if not path.is_file():
            advice = only_last_hint(path.parent) or f"point --checkpoint at a run folder holding {ADAPTER_CONFIG}"
            raise UserError(f"{path} not found: {advice}")
        try:
            data = json.loads(json_file_text(path, str(path)))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise UserError(f"{path} is not valid JSON ({json_error(error)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} holds {json_kind(data)}, not an adapter config object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path} has checkpoint format version {version!r}; this code reads version {FORMAT_VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UserError(f"{path} has unknown fields {unknown}; was it written by a newer version?")
        missing = sorted(name for name, f in fields.items() if name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise UserError(f"{path} lacks the fields {missing}")
        for name, value in data.items():
            if not _json_value_fits(value, fields[name].type):
                raise UserError(f"{path}: {name} is {value!r}, expected {fields[name].type}")
        for name, least in (("max_caption_tokens", 2), ("image_feature_dim", 0), ("lm_hidden_dim", 0),
                            ("adapter_hidden_dim", 0), ("adapter_layers", 1)):
            if data.get(name, least) < least:
                raise UserError(f"{path}: {name} is {data[name]}, expected a whole number >= {least}")
        try:
            config = cls(**data)
        except UserError as error:  # a value __post_init__ refuses (prefix_length 0): say which file holds it
            raise UserError(f"{path}: {error}") from None
        check_adapter_size(config, config.prefix_length * config.lm_hidden_dim, source=path)
        return config


def checkpoint_folder(path: str | Path, quiet: bool = False) -> Path:
    """The folder to load for a checkpoint given as `path`: `path`, or RUN/last.old where `path` is a run's
    last/ and a crash between the two renames of a save (train.swap_in) left last.old/ its only whole copy
    until the next save (as train.resume_state_dir falls back to resume.old/); a note names the one used.
    Every reader of a run's last/ resolves it here: "last/ not found" was all they said."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if path.name != "last" or path.exists() or not (old / ADAPTER_CONFIG).is_file():
        return path
    if not quiet:
        note(f"note: {path} is missing (a save stopped between its two renames); using {old}, its last whole copy",
             file=sys.stderr)
    return old


def only_last_hint(folder: Path) -> str:
    """Advice for a run folder with no best adapter but a last/ one (a run stopped before any validation
    saved its best), else "": the bare "not a run folder" sent its owner looking for a lost checkpoint."""
    if not (checkpoint_folder(folder / "last", quiet=True) / ADAPTER_CONFIG).is_file():
        return ""
    return (f"no validation has saved a best adapter in {folder} yet, but its last/ holds the last step's: "
            f"give {folder / 'last'}")


def not_a_run_folder(folder: Path) -> str:
    """The error for a --checkpoint folder without an adapter_config.json (eval.py, app.py, inference.py)."""
    if not folder.exists():  # "not a run folder" or "adapter_config.json not found" sent people looking inside it
        return f"{folder} does not exist: give a run folder (saved_models/RUN)"
    hint = only_last_hint(folder)
    if hint:
        return f"{folder} has no {ADAPTER_CONFIG}: {hint}"
    if evaluation := evaluation_folder_problem(folder):
        return evaluation
    return f"{folder} is not a run folder: it has no {ADAPTER_CONFIG}"


def evaluation_folder_problem(folder: Path) -> str:
    """The error for a run's RUN/eval-val/ (eval.py --split val writes there), or an --out folder inside a run,
    given as the run: "not a run folder" did not say whose it is. "" for other folders."""
    if (folder / "metrics.json").is_file() and (folder.parent / ADAPTER_CONFIG).is_file():
        return f"{folder} holds an evaluation's outputs, not a run: give its run folder, {folder.parent}"
    return ""


def _json_value_fits(value, annotation: str) -> bool:
    """Whether a JSON value matches a field's annotation ("int", "str | None", ...); bool is no int."""
    kinds = {"str": str, "int": int, "bool": bool, "dict": dict, "None": type(None)}
    allowed = tuple(kinds[name.strip()] for name in annotation.split("|"))
    return isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)


# The default (10 prefix tokens, Qwen3-0.6B's 1024 wide, ClipCap's hidden rule) has 55M parameters. A size
# flag off by a few zeros would instead ask the allocator for terabytes and fail with its traceback.
MAX_ADAPTER_PARAMETERS = 2_000_000_000


def check_adapter_size(config: AdapterConfig, out_dim: int, source: Path | None = None) -> None:
    """Refuse an adapter too large to allocate, naming what sized it: train.py's flags, or the
    adapter_config.json (`source`) a checkpoint was loaded from."""
    width = config.lm_hidden_dim
    if config.adapter_kind == "linear":
        parameters = (config.image_feature_dim + 1) * out_dim
        shape, fix = "", "pick a smaller LM"
    elif config.adapter_kind == "transformer":  # projection, constants, then per layer attention + 2x FFN + norms
        parameters = ((config.image_feature_dim + 1) * out_dim + out_dim
                      + config.adapter_layers * (8 * width * width + 11 * width))
        shape, fix = f", {config.adapter_layers} layers", "lower --prefix-length or --adapter-layers"
    else:
        hidden = config.adapter_hidden_dim
        parameters = (config.image_feature_dim + 1) * hidden + (hidden + 1) * out_dim
        shape, fix = f", hidden {hidden}", "lower --prefix-length or --adapter-hidden-dim"
    if source is not None:
        fix = f"{source} asks for it: restore that file's sizes as training wrote them"
    if parameters > MAX_ADAPTER_PARAMETERS:
        raise UserError(f"the adapter would have {parameters:,} parameters ({config.adapter_kind}, prefix_length "
                        f"{config.prefix_length} x LM width {width}{shape}), over {MAX_ADAPTER_PARAMETERS:,}; {fix}")


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words (null, not NoneType)."""
    kinds = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


class Adapter(nn.Module):
    """Maps one image feature (B, F) to prefix_length LM input embeddings (B, k, D)."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.prefix_length = config.prefix_length
        self.lm_hidden_dim = config.lm_hidden_dim
        out_dim = config.prefix_length * config.lm_hidden_dim
        check_adapter_size(config, out_dim)
        if config.adapter_kind == "linear":
            self.net = nn.Linear(config.image_feature_dim, out_dim)
        elif config.adapter_kind == "transformer":
            self.net = TransformerMapper(config)
        else:  # ClipCap's MLP, GELU as in LLaVA's mlp2x_gelu
            self.net = nn.Sequential(
                nn.Linear(config.image_feature_dim, config.adapter_hidden_dim),
                nn.GELU(),
                nn.Linear(config.adapter_hidden_dim, out_dim),
            )

        if config.standardize_image_features:  # buffers: saved with the weights, never trained
            self.register_buffer("feature_mean", torch.zeros(config.image_feature_dim))
            self.register_buffer("feature_std", torch.ones(config.image_feature_dim))

    def set_feature_statistics(self, image_features: torch.Tensor) -> None:
        """The training set's per-dimension mean and std (N, F) -> (F,), for standardize_image_features.

        Why: CLIP embeddings share a large common component (they sit in a narrow cone), so what
        tells images apart is a small variation on top of it. Centred and scaled, that variation
        reaches the adapter's first layer at the scale its initialisation expects. The transform is affine, so the
        functions the adapter can learn are the same; only how fast it finds them changes.
        """
        features = image_features.detach().float()
        std = features.std(dim=0, correction=0)
        # A dimension that barely varies in training is not scaled up more than 10x past a typical
        # one: its noise on new images would otherwise swamp the rest.
        floor = 0.1 * std.median().item()
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(std.clamp_min(floor) if floor > 0 else torch.ones_like(std))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "feature_mean"):
            image_features = (image_features - self.feature_mean) / self.feature_std  # (B, F)
        prefix = self.net(image_features)  # (B, k * D)
        return prefix.view(image_features.shape[0], self.prefix_length, self.lm_hidden_dim)  # (B, k, D)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper (its best frozen-LM variant): the image feature is projected to
    k tokens, k learned constant tokens sit beside them, and self-attention layers over all 2k
    let the constants gather what they need; their outputs are the prefix. (B, F) -> (B, k * D).
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.prefix_length, width = config.prefix_length, config.lm_hidden_dim
        self.project = nn.Linear(config.image_feature_dim, config.prefix_length * width)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, width))
        heads = next(h for h in (8, 4, 2, 1) if width % h == 0)  # ClipCap's 8 where the width allows
        # Pre-norm, no dropout, FFN twice the width: ClipCap's choices, on torch's own layer.
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.adapter_layers, enable_nested_tensor=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        batch = image_features.shape[0]
        tokens = self.project(image_features).view(batch, self.prefix_length, -1)  # (B, k, D)
        constants = self.prefix_const.expand(batch, -1, -1)  # (B, k, D)
        mapped = self.layers(torch.cat([tokens, constants], dim=1))  # (B, 2k, D)
        return mapped[:, self.prefix_length :].reshape(batch, -1)  # (B, k * D)


MIN_TEMPERATURE = 1e-6  # logits / 1e-6 stays finite in fp32 for any logit under 3e32
# Wider beams do not caption better (scores fall past ~10) and cost beams x batch KV caches: a width
# of 100,000 sat for minutes allocating before anything failed. 64 leaves room for experiments.
MAX_NUM_BEAMS = 64


@dataclass
class DecodingConfig:
    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 30

    def __post_init__(self):
        if self.strategy not in ("greedy", "beam", "sample"):
            raise UserError(f"decoding strategy {self.strategy!r} is unknown; choose greedy, beam or sample")
        if self.max_new_tokens < 1:
            raise UserError(f"max new tokens (--max-new-tokens) must be >= 1, got {self.max_new_tokens}")
        if self.strategy == "beam" and not 2 <= self.num_beams <= MAX_NUM_BEAMS:
            raise UserError(f"beam search needs --num-beams from 2 to {MAX_NUM_BEAMS}, got {self.num_beams}")
        if self.strategy == "sample" and not (0 < self.temperature < float("inf") and 0 < self.top_p <= 1):
            raise UserError(f"sampling needs a finite temperature > 0 and 0 < top-p <= 1, got {self.temperature}, "
                            f"{self.top_p}")
        if self.strategy == "sample" and self.temperature < MIN_TEMPERATURE:
            # generate divides the logits by it: below this they can overflow to inf, and the softmax
            # of inf - inf is NaN, which sampling meets as a RuntimeError traceback.
            raise UserError(f"sampling temperature {self.temperature:g} is too small to compute; use at least "
                            f"{MIN_TEMPERATURE:g}, or --strategy greedy (the limit of a falling temperature)")


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------

def resolve_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub's address answers at all, asked once per process. Offline, huggingface_hub
    retries each file with back-off (about 30 s, a 'Retrying' line each time) before it looks in
    its cache; knowing up front, a Hub id loads from the cache at once, or fails at once."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    if endpoint.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        return True  # reached through a proxy: only huggingface_hub's own client can tell
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:  # no DNS, no route, refused, timed out
        return False


def missing_local_folder(name: str) -> bool:
    """Whether a backbone name is a local path (not a Hub id) that names nothing."""
    return name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists()


def _from_pretrained(loader, what: str, name: str, **kwargs):
    if missing_local_folder(name):
        raise UserError(f"{what} folder not found: {name}")
    from safetensors import SafetensorError

    offline = not Path(name).expanduser().exists() and not hub_reachable()
    try:
        return loader.from_pretrained(name, **kwargs, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first = first_line(error)
        if "trust_remote_code" in str(error):
            hint = "; pass --trust-remote-code only if you trust that code"
        elif isinstance(error, SafetensorError):  # a truncated or overwritten weights file
            hint = "; its weights file is damaged: download or copy that model again"
        elif "safetensors" in first:
            hint = "; weights are read from safetensors files only, pickled ones (.bin, .pt) are never loaded"
        elif offline:
            raise UserError(f"could not load {what} {name!r}: the Hub cannot be reached from this machine, and the "
                            "Hub cache here does not hold it; give a local folder, or load it once where the Hub "
                            "is reachable") from None
        else:
            hint = "; give a local folder or a Hub id this machine can reach"
        raise UserError(f"could not load {what} {name!r} ({first}){hint}") from None


# What CLIPVisionModelWithProjection loads: a whole CLIP (openai/clip-vit-*) or its vision tower alone.
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


class _ConfigFile:
    """A checkpoint's config.json as a dict, read as from_pretrained reads it (a Hub id or a folder): what kind of
    model it is, known before a loader meant for another kind fails on it in transformers' words."""

    @staticmethod
    def from_pretrained(name: str, **kwargs) -> dict | None:
        from transformers import PretrainedConfig

        try:
            return PretrainedConfig.get_config_dict(name, **kwargs)[0]
        except TypeError:  # transformers' own look into a config.json of null ("argument of type 'NoneType' ...")
            return None


def backbone_config(what: str, name: str, revision=None) -> dict:
    """A backbone's config.json (_ConfigFile). One of null, a list or a string (a file overwritten, or saved by
    hand) ended in a traceback, here or in transformers (AttributeError, TypeError)."""
    config = _from_pretrained(_ConfigFile, what, name, revision=revision)
    if not isinstance(config, dict):
        raise UserError(f"{what} {name!r}: its config.json holds no JSON object of settings; copy that file again "
                        "from the checkpoint it came with")
    return config


def check_backbone_kinds(clip_model: str, lm_model: str, clip_revision=None, lm_revision=None) -> None:
    """Refuse a vision model that is not CLIP and an encoder-decoder LM, by their config.json, in one line each: a
    SigLIP failed in "ignore_mismatched_sizes ... look at the above report" (a report nobody sees), a T5 in
    "Unrecognized configuration class", each then advising to give a Hub id this machine can reach."""
    clip_kind = backbone_config("CLIP model", clip_model, clip_revision).get("model_type")
    if clip_kind not in CLIP_MODEL_TYPES:
        kind = f"a {clip_kind} model" if clip_kind else "a model whose config.json names no model_type"
        raise UserError(f"CLIP model {clip_model!r} is {kind}, not CLIP: give a CLIP checkpoint (a whole CLIPModel "
                        "such as openai/clip-vit-base-patch32, or a CLIPVisionModelWithProjection)")
    lm_config = backbone_config("language model", lm_model, lm_revision)
    if lm_config.get("is_encoder_decoder"):
        raise UserError(f"language model {lm_model!r} is a {lm_config.get('model_type')} model, an encoder-decoder: "
                        "the captioner feeds its prefix to a decoder-only (causal) LM; give one, such as GPT-2, OPT, "
                        "Llama, Qwen or Gemma")


def without_missing_weights(loaded, what: str, name: str):
    """The model of from_pretrained(..., output_loading_info=True), refused where the checkpoint lacked weights the
    class needs: transformers starts those at random with a warning our quiet loading hides, and a CLIP vision
    tower saved as CLIPVisionModel (no visual_projection) trained an adapter on a random projection unsaid."""
    model, info = loaded
    if missing := sorted(info.get("missing_keys") or ()):
        few = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{what} {name!r} lacks weights that {type(model).__name__} needs ({few}), which would start "
                        f"at random: {why_weights_are_missing(what, missing)}; give the whole checkpoint")
    return model


def why_weights_are_missing(what: str, missing: list[str]) -> str:
    """The likely reason for a load report's missing weights: a CLIP tower or a base LM saved without its
    projection or head, else a partial copy (its layers' weights missing too were said to be "no LM head")."""
    head, like = (("visual_projection.", "a CLIPVisionModel saves no visual_projection") if what == "CLIP model"
                  else ("lm_head.", "a base model saves no LM head"))
    if all(key.startswith(head) for key in missing):
        return f"it was saved without them ({like})"
    return "its weights files hold only part of the model (a copy cut short, or a file of another model)"


def check_tokenizer_fits(tokenizer, lm, lm_model: str) -> None:
    """Refuse a tokenizer that cannot serve the LM. A folder holding the LM's weights but no tokenizer files loads,
    in transformers 5, a tokenizer of one token that turns every caption into nothing: training then taught the
    adapter EOS alone. One of another, larger vocabulary fails deep in the embedding lookup."""
    if not tokenizer("a photo of a dog", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer loaded for language model {lm_model!r} turns text into no tokens (it holds "
                        f"{len(tokenizer)}): that checkpoint has no tokenizer files of its own (tokenizer.json, "
                        "tokenizer_config.json, ...); save its tokenizer there with tokenizer.save_pretrained")
    # The ids a caption can hold: special tokens are split as text (tokenize_caption), save EOS and PAD. Some
    # tokenizers carry a special token past the LM's embeddings that no caption ever uses.
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id, tokenizer.pad_token_id}
    rows = lm.get_input_embeddings().weight.shape[0]
    if (largest := largest_caption_id(tokenizer, special)) >= rows:
        raise UserError(f"the tokenizer of language model {lm_model!r} has token ids up to {largest}, but the LM "
                        f"embeds only {rows} tokens: the tokenizer belongs to another model; give the LM's own")


def largest_caption_id(tokenizer, special: set[int]) -> int:
    """The largest token id outside `special`. A fast tokenizer's model numbers its tokens 0..n-1, the added ones
    come after: read so, not from get_vocab(), which builds the whole map (0.08-0.09 s for Qwen3's 151,643 tokens
    on this CPU, at every load, where vocabulary_digest builds it once already)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return max(i for i in tokenizer.get_vocab().values() if i not in special)
    added = (i for i in tokenizer.added_tokens_decoder if i not in special)
    return max([backend.get_vocab_size(with_added_tokens=False) - 1, *added])


def check_processor_file(error: UserError, clip_model: str) -> UserError:
    """`error`, or where a CLIP folder has no preprocessor_config.json, one saying so (the loader's own advice was to
    give a Hub id this machine can reach)."""
    folder = Path(clip_model).expanduser()
    if not folder.is_dir() or (folder / "preprocessor_config.json").is_file():
        return error
    return UserError(f"CLIP folder {clip_model} has no preprocessor_config.json (how images are resized, cropped and "
                     "normalised); copy it from the CLIP checkpoint these weights were saved from")


def _drop_optional_kernel_notice(record: logging.LogRecord) -> bool:
    return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast from" not in record.getMessage()


def lm_quantization_config(lm_quantization: str, device: torch.device):
    """bitsandbytes settings for the frozen LM, or None: 8-bit (LLM.int8) or 4-bit NF4, whose matmuls
    run in bf16 on a GPU that computes in it (fp16 on older ones) and fp32 on a CPU."""
    if lm_quantization not in LM_QUANTIZATIONS:
        raise UserError(f"LM quantization {lm_quantization!r} is unknown; choose one of {', '.join(LM_QUANTIZATIONS)}")
    if lm_quantization == "none":
        return None
    # On CPUs with AVX-512 BF16, importing bitsandbytes warns that an optional kernel (the `kernels` package,
    # fetched from the Hub) is absent; its own fallback then runs. Noise our users cannot act on offline.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_optional_kernel_notice)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"--lm-quantization {lm_quantization} needs bitsandbytes: pip install bitsandbytes") from None
    except Exception as error:  # installed but broken: its native library does not load (RuntimeError, OSError)
        first = first_line(error)
        raise UserError(f"--lm-quantization {lm_quantization}: bitsandbytes is installed but does not load ({first}); "
                        "install a bitsandbytes built for this machine's CUDA, or use --lm-quantization none") from None
    from transformers import BitsAndBytesConfig

    if lm_quantization == "8bit":
        # LLM.int8 casts bf16/fp32 activations to fp16 and logs a warning on every single matmul.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
        return BitsAndBytesConfig(load_in_8bit=True)
    if device.type == "cuda":
        compute_dtype = torch.bfloat16 if gpu_computes_in_bf16() else torch.float16
    else:
        compute_dtype = torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def lm_quantization_of(lm) -> str:
    """How a loaded LM is quantised, as --lm-quantization names it: what metrics.json records, since
    the same adapter scores differently over an 8-bit, a 4-bit and an unquantised LM."""
    if getattr(lm, "is_loaded_in_8bit", False):
        return "8bit"
    if getattr(lm, "is_loaded_in_4bit", False):
        return "4bit"
    return "none"


def clip_image_processor(**settings):
    """CLIPImageProcessor(**settings). Without torchvision, importing that name falls back to the PIL
    backend (the same preprocessing) with a warning: noise for our users, so it is imported quietly."""
    with transformers_errors_only():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**settings)


@contextlib.contextmanager
def transformers_errors_only():
    """Transformers' warnings off for a block: notes meant for a library's developers, not our users."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_backbones(clip_model: str, lm_model: str, clip_revision=None, lm_revision=None, dtype=torch.float32,
                   device="cpu", lm_quantization: str = "none", trust_remote_code: bool = False):
    """Load the frozen backbones with from_pretrained onto `device`: the same path for the real and the tiny ones.

    Weights are read from safetensors only (never unpickled), and code shipped with a checkpoint
    runs only when the caller passes trust_remote_code=True (a flag, never a checkpoint field).
    A quantised LM is placed by device_map while loading: bitsandbytes weights cannot be moved later.
    """
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModelWithProjection

    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    quantization_config = lm_quantization_config(lm_quantization, device)
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars: noise in every log
    trust = {"trust_remote_code": trust_remote_code}
    check_backbone_kinds(clip_model, lm_model, clip_revision, lm_revision)
    # A full CLIP checkpoint (like openai/clip-vit-base-patch32) also holds the text tower, which
    # the vision-only class leaves out by design: silence the report that lists those keys.
    with transformers_errors_only():
        clip = without_missing_weights(_from_pretrained(
            CLIPVisionModelWithProjection, "CLIP model", clip_model, revision=clip_revision, dtype=dtype,
            use_safetensors=True, output_loading_info=True, **trust), "CLIP model", clip_model)
        try:
            processor = _from_pretrained(AutoImageProcessor, "CLIP image processor", clip_model,
                                         revision=clip_revision, **trust)
        except UserError as error:
            raise check_processor_file(error, clip_model) from None
    if quantization_config is None:
        placement = {}
    else:  # a quantised LM is placed while loading: bitsandbytes weights cannot be moved later
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        placement = {"quantization_config": quantization_config, "device_map": {"": device}}
    with transformers_errors_only():  # its load report of missing weights: said in one line instead
        lm = without_missing_weights(_from_pretrained(
            AutoModelForCausalLM, "language model", lm_model, revision=lm_revision, dtype=dtype, use_safetensors=True,
            output_loading_info=True, **placement, **trust), "language model", lm_model)
    if quantization_config is None:
        lm = lm.to(device)
    tokenizer = _from_pretrained(AutoTokenizer, "tokenizer", lm_model, revision=lm_revision, **trust)
    return clip.to(device), processor, lm, tokenizer


def keep_4bit_weights_differentiable(lm) -> None:
    """Keep bitsandbytes from repacking a 4-bit LM's weights for its CPU kernel, where gradients must pass. On a
    CPU with AVX-512 BF16 the first forward pass of a layer in eval mode without gradients (the frozen LM's head
    probe, a validation) repacks its weight for good, and every later pass, training's included, runs a kernel
    with no backward: the adapter's gradients came out silently wrong (cosine 0.001 with the unquantised LM's
    over the same weights), the loss looking fine. Captioning alone keeps the repacking: it decodes 1.5-2.6x
    faster (Qwen3-0.6B shapes, 4-bit, 2 CPU threads)."""
    for module in lm.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # not a bitsandbytes.nn.Linear4bit
            continue
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("this 4-bit LM was already repacked for captioning on the CPU, and gradients cannot "
                               "pass through it: to train it, load it again and set it to train before it captions")
        module.support_avx512bf16_for_cpu = False


def let_4bit_weights_repack(lm) -> None:
    """Undo keep_4bit_weights_differentiable where the LM will not be trained again (train.py's final evaluation):
    bitsandbytes repacks the weights, as in a captioner load_captioner loaded, so that the test split is captioned
    as fast as eval.py captions it, and to its captions (the kernels round apart: the demo LM's logits by 0.04)."""
    for module in lm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # a bitsandbytes.nn.Linear4bit
            from bitsandbytes.functional import has_avx512bf16

            module.support_avx512bf16_for_cpu = has_avx512bf16()


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def backbone_revision(name: str) -> str | None:
    """The Hub commit a backbone named `name` was just loaded from (of `main`), when it came from the Hub: its
    snapshot's folder in the Hub cache is named by it. transformers 5 dropped config._commit_hash, which this read:
    every run since recorded no revision, and loaded whatever `main` had become."""
    if Path(name).expanduser().is_dir():
        return None  # a local folder has no commit (and --*-revision is refused for one)
    folder = backbone_folder(name, None)
    return folder.name if folder is not None and folder.parent.name == "snapshots" else None


# ----------------------------------------------------------------------------------------------
# The captioner
# ----------------------------------------------------------------------------------------------

LOGITS_CHUNK_BYTES = 2**30  # fp32 logits held at once by the loss: ~1 GiB, whatever the batch


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` over rows with a label, for a frozen `weight`,
    computed a chunk of rows at a time: never the whole (N, vocab) logits, in fp32 or bf16.

    The gradient with respect to `hidden` is computed in the forward pass, chunk by chunk
    ((softmax - onehot) @ weight), and only that (N, D) tensor is kept for backward, so the
    logits are neither stored nor recomputed. Same FLOPs as the plain path; far less memory.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int):
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        targets = labels.clamp(min=0)[:, None]  # ignored rows point at token 0 and are masked out
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.t()).float()  # (n, V)
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            mask = valid[rows, None].float()
            loss_sum = loss_sum + ((log_norm - logits.gather(1, targets[rows])) * mask).sum()
            probs = logits.sub_(log_norm).exp_()  # softmax, in place of the logits: one (n, V) buffer
            probs.scatter_add_(1, targets[rows], -torch.ones_like(mask))  # d loss / d logits = softmax - onehot
            grad[rows] = probs.mul_(mask).to(weight.dtype) @ weight
        ctx.save_for_backward(grad, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_output):
        grad, count = ctx.saved_tensors
        # Divided and scaled in fp32 at least, then cast once: under --mixed-precision fp16, grad_output is the
        # loss scale (65,536 at first), inf in fp16, and a per-token gradient divided by the count underflows it.
        # (In fp32 these are the same operations as before, in the same order: the same bits.)
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32))
        return ((wide / count.to(wide.dtype)) * grad_output.to(wide.dtype)).to(grad.dtype), None, None, None


def frozen_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the LM head's logits at rows whose label is not IGNORE_INDEX.

    hidden (N, D), weight (V, D) (the frozen output embedding), labels (N,). Eager code first drops
    unlabelled rows (padding); compiled code keeps the shapes static and masks them instead,
    since a boolean index is a data-dependent shape that would split the graph.
    """
    if weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy is for a frozen LM head; this one requires grad")
    if not torch.compiler.is_compiling():
        keep = labels != IGNORE_INDEX
        hidden, labels = hidden[keep], labels[keep]
    chunk_rows = chunk_rows or max(1, LOGITS_CHUNK_BYTES // (4 * weight.shape[0]))
    if not (torch.is_grad_enabled() and hidden.requires_grad):  # evaluation: the loss only
        losses = [F.cross_entropy((hidden[s : s + chunk_rows] @ weight.t()).float(), labels[s : s + chunk_rows],
                                  reduction="sum") for s in range(0, hidden.shape[0], chunk_rows)]
        return sum(losses, torch.zeros((), device=hidden.device)) / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return _FrozenHeadCrossEntropy.apply(hidden, weight, labels, chunk_rows)


def compiled_decode_rows(rows: int) -> int:
    """The batch a compiled decoding step runs for `rows` captions: the next power of two.

    Each batch size is its own graph (and CUDA-graph capture and static cache); after 8 of them
    torch.compile quietly runs eager. Captioning N images in batches, minus unreadable ones,
    brings any number of sizes; powers of two bring log2 of the largest, for at most 2x the rows.
    """
    return 1 << (rows - 1).bit_length()


def kv_cache_argument(lm) -> str:
    """The name under which the LM's forward takes a KV cache: transformers renamed `past_key_values`
    to `cache` (5.24 warns on the old name, 5.40 drops it), and a dropped name would not fail loudly:
    forward's **kwargs would swallow it and decoding would silently run without its cache."""
    parameters = inspect.signature(type(lm).forward).parameters  # follows the deprecation wrapper
    return "cache" if "cache" in parameters else "past_key_values"


def neutral_generation_config():
    """An empty GenerationConfig, to stand as the LM's own. `generate` fills every setting that
    hf_generate_tokens leaves unset from the LM's generation_config.json, so an instruct LM's
    repetition_penalty or min_p (or a min_new_tokens, a length_penalty) would silently bend beam
    search and sampling, never the greedy loop; with this one, transformers' neutral defaults fill them."""
    from transformers import GenerationConfig

    return GenerationConfig()


def default_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def dense_head_input(head: nn.Module, args: tuple):
    """Forward pre-hook on the LM head: its input as a dense tensor. Asked for the last position's logits
    (`logits_to_keep=1`: the greedy loop's first step, and `generate`'s), transformers hands the head a slice
    of the prefix's hidden states, (B, 1, H) with the strides of (B, k, H). F.linear cannot fold that into one
    matrix product, and multiplies by the (V, H) weight expanded to every row, which on a CPU is copied first
    (B x 151,936 x 1,024 numbers). Measured on this workplace's CPU for 16 rows: 38 s instead of 43 ms in bf16,
    314 ms instead of 81 ms in fp32. (`.contiguous()` is not enough: with B = 1 the slice counts as contiguous.)"""
    hidden = args[0]
    if hidden.dim() > 2 and hidden.stride() != default_strides(hidden.shape):
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def densify_head_input(lm) -> None:
    """Put dense_head_input on the LM's head, once however many captioners share the LM."""
    head = lm.get_output_embeddings()
    if head is not None and not getattr(head, "_dense_input", False):
        head.register_forward_pre_hook(dense_head_input)
        head._dense_input = True


def head_logit_changes(lm) -> list[str]:
    """What the LM does to its head's output before the softmax, beyond the matrix product, as the config
    settings that say so ([] for Qwen3, Llama, GPT-2): Granite divides the logits by `logits_scaling`, Cohere
    multiplies them by `logit_scale`, Gemma 2 and later cap them (`final_logit_softcapping`). The chunked loss
    takes the head's weight alone and would train against other logits than the ones the LM captions with."""
    config = lm.config
    changes = []
    for name, neutral in (("logits_scaling", 1), ("logit_scale", 1), ("output_multiplier", 1),
                          ("final_logit_softcapping", None)):
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            changes.append(f"{name} {value:g}" if isinstance(value, (int, float)) else name)
    return changes


@torch.no_grad()
def logits_differ_from_head(lm) -> bool:
    """Whether the LM's own logits differ from its head's output on a few tokens: what head_logit_changes cannot
    name (a setting of another name, a scale in a subclass's forward, remote code) still shows in the numbers.
    Both sides run the same base model and head, so they match to the last bit unless something comes between."""
    head = lm.get_output_embeddings()
    if head is None:
        return False
    ids = torch.arange(1, 5, device=lm.get_input_embeddings().weight.device).clamp(max=lm.config.vocab_size - 1)[None]
    own = lm(input_ids=ids, use_cache=False).logits.float()  # (1, 4, V)
    ours = head(lm.base_model(input_ids=ids, use_cache=False).last_hidden_state).float()  # (1, 4, V)
    return not torch.allclose(own, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item())


def lm_context(lm) -> int | None:
    """How many positions the LM was built for (prefix and caption together), or None where its config does not say."""
    for name in ("max_position_embeddings", "n_positions"):  # Llama/Qwen-style configs, GPT-2's
        if isinstance(context := getattr(lm.config, name, None), int):
            return context
    return None


class Captioner(nn.Module):
    """Frozen CLIP + trainable adapter + frozen LM. Only `self.adapter` has trainable parameters."""

    def __init__(self, config: AdapterConfig, clip, processor, lm, tokenizer, adapter: Adapter | None = None):
        super().__init__()
        self.config = config
        self.clip = freeze(clip)
        self.lm = freeze(lm)
        self.lm.generation_config = neutral_generation_config()
        densify_head_input(self.lm)
        self.head_logit_changes = head_logit_changes(self.lm)
        self.head_probed = False  # see follow_the_lms_logits: probed before the first loss, not for captioning
        self.told_of_own_logits = False
        self.processor = processor
        self.tokenizer = tokenizer
        self.adapter = adapter if adapter is not None else Adapter(config)
        self.decode_step = None  # a compiled one-token LM step, see enable_compiled_decoding
        self._cache_kwarg = kv_cache_argument(lm)
        self._static_caches = {}  # (batch, length) -> StaticCache, for decode_step

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def train(self, mode: bool = True):
        # Frozen backbones stay in eval mode whatever the trainer asks (no dropout in them, ever).
        if mode:
            keep_4bit_weights_differentiable(self.lm)
        self.training = mode
        self.adapter.train(mode)
        return self

    # -- images -> features -> prefix ---------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def clip_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embeddings (B, F) in fp32, as the feature cache stores them."""
        clip_dtype = next(self.clip.parameters()).dtype
        return self.clip(pixel_values=pixel_values.to(self.device, clip_dtype)).image_embeds.float()  # (B, F)

    def finish_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """What the adapter sees: L2-normalised when the config says so, at training and inference alike."""
        embeddings = embeddings.float()
        return F.normalize(embeddings, dim=-1) if self.config.normalize_image_features else embeddings

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.finish_features(self.clip_embeddings(pixel_values))

    def prefix_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        prefix = self.adapter(image_features)  # (B, k, D)
        return prefix.to(self.lm.get_input_embeddings().weight.dtype)

    # -- training loss ------------------------------------------------------------------------
    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over caption tokens (EOS included); labels are -100 at padding.

        Input sequence: [prefix_1..prefix_k, caption_0..caption_{T-2}]. The hidden state at
        position k-1+t predicts caption token t, so the last caption token is never an input.
        Logits are computed only at positions with a real label: never B x L x vocab.
        """
        k = self.config.prefix_length
        prefix = self.prefix_embeds(image_features)  # (B, k, D)
        tokens = self.lm.get_input_embeddings()(input_ids[:, :-1])  # (B, T-1, D)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, k+T-1, D)
        if not self.head_probed and not torch.compiler.is_compiling():  # TrainingLoss probes before compiling
            self.follow_the_lms_logits()
        if self.head_logit_changes:
            return self.own_logits_loss(embeds, labels)
        # Right padding + causal attention: real positions never see padding, so no mask is needed
        # and the attention kernel can take its causal fast path.
        hidden = self.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        hidden = hidden[:, k - 1 :]  # (B, T, D): position k-1+t predicts caption token t
        hidden, labels, head = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), self.lm.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:  # a head the chunked loss can't take apart
            keep = labels != IGNORE_INDEX  # (a quantised or biased one): its own forward, labelled rows only
            if not keep.any():  # padding rows only (train.make_train_loader): a loss of 0, not the NaN of an empty mean
                return hidden[keep].float().sum()
            return F.cross_entropy(head(hidden[keep]).float(), labels[keep])
        return frozen_head_cross_entropy(hidden, head.weight, labels)

    def follow_the_lms_logits(self) -> None:
        """Once, before the first loss: an LM whose logits are not its head's output alone takes the loss through
        its own forward, whether or not head_logit_changes knows the setting that says so. A probe of two short
        forwards, left out of captioning (which never computes a loss) so that inference starts no slower."""
        self.head_probed = True
        if not self.head_logit_changes and logits_differ_from_head(self.lm):
            self.head_logit_changes = ["its forward's logits differ from its head's output"]

    def own_logits_loss(self, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss on the logits of the LM's own forward, B x L x vocab of them at once: for an LM that changes its
        head's output (head_logit_changes), which the chunked loss cannot follow. Slower, and heavier in memory."""
        if not self.told_of_own_logits:  # told at the first loss: captioning alone never computes one
            note(f"note: the LM changes its head's logits ({', '.join(self.head_logit_changes)}): the loss computes "
                 "them through its own forward, at every position at once (slower, more memory)", file=sys.stderr)
            self.told_of_own_logits = True
        logits = self.lm(inputs_embeds=embeds, use_cache=False).logits[:, self.config.prefix_length - 1 :]  # (B, T, V)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)  # padding rows only: 0, not an empty mean's NaN

    # -- generation ---------------------------------------------------------------------------
    def check_fits_context(self, caption_tokens: int, flag: str) -> None:
        """Refuse a caption budget (`flag`: train.py's --max-caption-tokens, the decoders' --max-new-tokens) that,
        after the prefix, runs past the LM's context. Past it a rotary LM (Qwen3) computes on at positions it never
        learned, garbage without an error, and one with learned positions (GPT-2) fails deep in an index."""
        context = lm_context(self.lm)
        k = self.config.prefix_length
        if context is None or k + caption_tokens <= context:
            return
        if k >= context:  # nothing a caption flag could fix: the prefix alone fills the context
            raise UserError(f"the {k} prefix tokens fill the language model's {context}-token context, leaving no "
                            f"room for {flag} {caption_tokens}; lower --prefix-length (train.py) or use a longer LM")
        raise UserError(f"{flag} {caption_tokens} and the {k} prefix tokens exceed the language model's "
                        f"{context}-token context; use at most {context - k}")

    @torch.no_grad()
    def generate(self, image_features: torch.Tensor, decoding: DecodingConfig | None = None) -> list[str]:
        """Captions (B,) for image features (B, F). By default greedy, as long as the captions the adapter was
        trained on (max_caption_tokens, EOS included), as validation decoded them."""
        decoding = decoding or DecodingConfig(max_new_tokens=self.config.max_caption_tokens)
        self.check_fits_context(decoding.max_new_tokens, "--max-new-tokens")
        prefix = self.prefix_embeds(image_features.to(self.device))  # (B, k, D)
        if decoding.strategy == "greedy":
            new_tokens = self.greedy_tokens(prefix, decoding.max_new_tokens)
        else:
            new_tokens = self.hf_generate_tokens(prefix, decoding)
        return self.decode(new_tokens)

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Captions by the rule the references follow (dataset.normalize_caption): single-spaced, and a control
        character a tokenizer holds (an LM a run folder names, made by anyone) is a space, not an ESC[2J that
        inference.py's output passed to the terminal."""
        from dataset import normalize_caption  # here: dataset.py imports this module

        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [normalize_caption(text) for text in texts]

    @torch.no_grad()
    def greedy_tokens(self, prefix: torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True) -> torch.Tensor:
        """Greedy decoding in a plain loop over the LM's forward with a KV cache: the same tokens as
        `generate(do_sample=False)` (a test checks), without its per-token bookkeeping.

        With `self.decode_step` set (see `enable_compiled_decoding`) the cache is static and each
        one-token step runs as a compiled graph; where that cannot compile, decoding says so in one
        line and goes on eagerly. Rows that have ended are filled with PAD.
        """
        if self.decode_step is not None:
            try:
                return self._greedy_loop(prefix, max_new_tokens, stop_at_eos)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # torch.compile fails in many ways (backend, compiler, CUDA graphs)
                warn_compile_failed(error, "decoding")
                self.decode_step, self._static_caches = None, {}
        return self._greedy_loop(prefix, max_new_tokens, stop_at_eos)

    def _greedy_loop(self, prefix: torch.Tensor, max_new_tokens: int, stop_at_eos: bool) -> torch.Tensor:
        rows, k, _ = prefix.shape
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        step = self.decode_step if self.decode_step is not None else self.lm  # (a compiled module has no truth value)
        if self.decode_step is not None:  # a graph and a static cache per batch size: only powers of two
            prefix = torch.cat([prefix, prefix.new_zeros(compiled_decode_rows(rows) - rows, *prefix.shape[1:])])
        cache = self._kv_cache(prefix.shape[0], k + max_new_tokens)
        output = self.lm(inputs_embeds=prefix, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(k, device=prefix.device))
        token = output.logits[:, -1].argmax(-1)  # (B,)
        finished = token == eos
        finished[rows:] = True  # padding rows: never wait for them
        tokens = [token]
        for position in range(k, k + max_new_tokens - 1):
            if stop_at_eos and bool(finished.all()):
                break
            output = step(input_ids=token[:, None], **{self._cache_kwarg: cache}, use_cache=True,
                          cache_position=torch.tensor([position], device=prefix.device))
            token = output.logits[:, -1].argmax(-1)
            if stop_at_eos:
                token = token.masked_fill(finished, pad)
                finished = finished | (token == eos)
            tokens.append(token)
        return torch.stack(tokens, dim=1)[:rows]  # (B, new)

    def _kv_cache(self, batch: int, length: int):
        """A fresh dynamic cache for eager decoding; for the compiled step one static cache per
        shape, reset and reused, so each captured graph always sees the same buffers."""
        from transformers import DynamicCache, StaticCache

        if self.decode_step is None:
            return DynamicCache(config=self.lm.config)
        cache = self._static_caches.get((batch, length))
        if cache is None:
            cache = self._static_caches[batch, length] = StaticCache(config=self.lm.config, max_cache_len=length)
        else:
            cache.reset()
        return cache

    def enable_compiled_decoding(self, backend: str = "inductor", mode: str | None = "reduce-overhead",
                                 cuda_only: bool = True) -> bool:
        """Static KV cache + a compiled one-token step with CUDA graphs (reduce-overhead): on a GPU
        this takes greedy decoding from per-token Python overhead to per-token kernel time.
        Only on CUDA by default; elsewhere the eager loop stays (returns whether it was enabled).
        Tests pass another backend to check the static-cache loop on a CPU."""
        if cuda_only and self.device.type != "cuda":
            return False
        self.decode_step = torch.compile(self.lm, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        return True

    @torch.no_grad()
    def hf_generate_tokens(self, prefix: torch.Tensor, decoding: DecodingConfig) -> torch.Tensor:
        """Beam search and sampling through the LM's own `generate` (KV cache, batched)."""
        from transformers import GenerationConfig

        attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
        generation_config = GenerationConfig(
            max_new_tokens=decoding.max_new_tokens,
            do_sample=decoding.strategy == "sample",
            num_beams=decoding.num_beams if decoding.strategy == "beam" else 1,
            temperature=decoding.temperature if decoding.strategy == "sample" else None,
            top_p=decoding.top_p if decoding.strategy == "sample" else None,
            # Pure nucleus sampling, as documented: None would mean "unset", which generate fills with
            # transformers' default top-k of 50 (0 turns top-k off; set only when sampling, as greedy
            # and beam search warn about a top-k they ignore).
            top_k=0 if decoding.strategy == "sample" else None,
            eos_token_id=self.config.eos_token_id,
            pad_token_id=self.config.pad_token_id,
            use_cache=True,
        )
        # With inputs_embeds a decoder-only model returns only the new tokens.
        return self.lm.generate(inputs_embeds=prefix, attention_mask=attention_mask,
                                generation_config=generation_config)

    def caption_images(self, images, decoding: DecodingConfig | None = None) -> list[str]:
        return self.generate(self.image_features(self.preprocess(images)), decoding)


class TrainingLoss:
    """The captioner's loss, eager or through torch.compile (`--compile`).

    Compilation happens on the first call; where it cannot run (no C++ compiler, an unsupported
    op or platform) training says so in one line and continues eagerly with the same loss.
    """

    def __init__(self, captioner: Captioner, compile: bool = False, backend: str = "inductor", mode: str | None = None):
        self.captioner = captioner
        captioner.follow_the_lms_logits()  # here, not in the compiled forward: the probe is a plain eager check
        if compile and lm_quantization_of(captioner.lm) == "8bit":
            # bitsandbytes' LLM.int8() matmul breaks the graph (its outlier split depends on the data) and
            # guards on each layer's int8 weight shape: dynamo hit its recompile limit, printed 5 lines of
            # warnings and trained at half the eager speed (demo, 6 steps, CPU: 133 s vs 71 s). 4-bit compiles.
            print("note: --compile is left out with an 8-bit LM (bitsandbytes' int8 matmul recompiles at every "
                  "layer shape, slower than eager); training eagerly", file=sys.stderr)
            compile = False
        # Static shapes: the trainer feeds a few bucketed shapes (train.make_train_loader), each worth its
        # own specialised graph; a dynamic graph would be specialised anyway by the loss's loop over rows.
        self.compiled = torch.compile(captioner, backend=backend, mode=mode, dynamic=False) if compile else None

    def __call__(self, **batch) -> torch.Tensor:
        if self.compiled is not None:
            try:
                with backward_compiled_with_forward():
                    return self.compiled(**batch)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # torch.compile fails in many ways (backend, compiler, graph)
                warn_compile_failed(error, "training")
                self.compiled = None
        return self.captioner(**batch)


def warn_compile_failed(error: Exception, what: str) -> None:
    first = first_line(error)
    print(f"warning: torch.compile could not run ({type(error).__name__}: {first[:200]}); continuing {what} "
          "without --compile", file=sys.stderr)


def backward_compiled_with_forward():
    """Make torch.compile build a graph's backward while it builds the forward. By default it waits
    for the first backward call, so a backward that cannot compile would fail in loss.backward(),
    outside TrainingLoss's fallback. The switch is private to torch: where it is missing, the default."""
    import contextlib

    import torch._functorch.config as config

    if not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


# ----------------------------------------------------------------------------------------------
# Building, saving and loading
# ----------------------------------------------------------------------------------------------

def build_captioner(config: AdapterConfig, dtype=torch.float32, device="cpu", lm_quantization: str = "none",
                    trust_remote_code: bool = False) -> Captioner:
    """Load the backbones named in config, fill in the sizes they define, and add a fresh adapter."""
    clip, processor, lm, tokenizer = load_backbones(
        config.clip_model, config.lm_model, config.clip_revision, config.lm_revision, dtype, device, lm_quantization,
        trust_remote_code,
    )
    check_tokenizer_fits(tokenizer, lm, config.lm_model)
    config.image_feature_dim = clip.visual_projection.out_features
    config.lm_hidden_dim = lm.get_input_embeddings().weight.shape[1]
    config.clip_revision = config.clip_revision or backbone_revision(config.clip_model)
    config.lm_revision = config.lm_revision or backbone_revision(config.lm_model)
    config.eos_token_id, config.pad_token_id = special_token_ids(tokenizer, lm)
    config.vocab_size = len(tokenizer)
    config.vocabulary_digest = vocabulary_digest(tokenizer)
    config.clip_weights_digest = stored_weights_digest(config.clip_model, config.clip_revision)
    config.lm_weights_digest = stored_weights_digest(config.lm_model, config.lm_revision)
    config.__post_init__()  # derive the adapter's hidden size now that the LM's is known
    keep_4bit_weights_differentiable(lm)  # a fresh adapter is built to be trained
    captioner = Captioner(config, clip, processor, lm, tokenizer)
    captioner.adapter.to(captioner.device)  # the backbones are placed while loading: a quantised LM cannot move
    return captioner


def vocabulary_digest(tokenizer) -> str:
    """A short digest of the tokenizer's token -> id map (added tokens included)."""
    import hashlib

    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()[:16]


# Spots of each weights file stored_weights_digest reads: spread over the file, so that a fine-tune that left the
# first tensors as they were (a merged LoRA leaves the embeddings) still differs in some.
WEIGHTS_SAMPLES, WEIGHTS_SAMPLE_BYTES = 32, 4096


def stored_weights_digest(name: str, revision: str | None) -> str | None:
    """A short digest of the safetensors files a backbone loads from, as stored on disk: each file's name, size and
    header, and WEIGHTS_SAMPLES spots of its data. The same whatever dtype, quantisation or device it is loaded in;
    another build of the demo's backbones, a Hub `main` that moved, or a folder holding another fine-tune differs.
    None where the files cannot be found or read: no run fails for it."""
    import hashlib

    folder = backbone_folder(name, revision)
    files = sorted(folder.glob("*.safetensors")) if folder else []
    digest = hashlib.blake2b(digest_size=8)
    try:
        for path in files:
            with open(path, "rb") as stored:
                size = os.fstat(stored.fileno()).st_size
                header_end = 8 + int.from_bytes(stored.read(8), "little")
                digest.update(f"{path.name}|{size}|".encode() + stored.read(min(header_end, size) - 8))
                for spot in range(WEIGHTS_SAMPLES):  # the data region's start, then evenly spaced
                    stored.seek(header_end + max(0, size - header_end) * spot // WEIGHTS_SAMPLES)
                    digest.update(stored.read(WEIGHTS_SAMPLE_BYTES))
    except (OSError, ValueError):
        return None
    return digest.hexdigest() if files else None


def backbone_folder(name: str, revision: str | None) -> Path | None:
    """The folder from_pretrained read a backbone's files from: the local folder, or the Hub cache's snapshot of
    `revision` (None: of `main`, which from_pretrained has just brought up to date where the Hub is reachable;
    transformers 5 keeps no config._commit_hash to name the commit loaded); None where unknown."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a repo id huggingface_hub accepts
        return None
    return Path(found).parent if isinstance(found, str) else None


def note_other_backbone_weights(config: AdapterConfig, source: Path, clip_model: str, lm_model: str,
                                clip_revision=None, lm_revision=None) -> None:
    """A note where a backbone's weights files differ from those the adapter was trained with (by their digests).
    Same sizes and vocabulary load without an error, and the captions are poor: another build of the demo's LM
    (another CPU kind), a Hub `main` that moved, a folder replaced by another fine-tune. A note, not an error: a
    run trained with weights since reformatted on disk (another shard size) still captions as well."""
    differ = [f"{backbone} {name}" for backbone, name, revision, trained in (
        ("CLIP", clip_model, clip_revision, config.clip_weights_digest),
        ("LM", lm_model, lm_revision, config.lm_weights_digest))
        if trained and (now := stored_weights_digest(name, revision)) and now != trained]
    if differ:
        note(f"note: the weights of {' and '.join(differ)} are not those {source} was trained with: captions may "
             "be poor: load the weights it trained with, or train again", file=sys.stderr)


def special_token_ids(tokenizer, lm) -> tuple[int, int]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else lm.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise UserError(f"the tokenizer of language model {lm.name_or_path!r} names no EOS token, nor does its "
                        "config.json (eos_token_id): captions could never end; set eos_token in its "
                        "tokenizer_config.json")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


def save_adapter(directory: str | Path, adapter: nn.Module, config: AdapterConfig) -> None:
    """Write adapter.safetensors + adapter_config.json: the adapter's weights only, never a frozen one."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Each file is replaced atomically, the two not together: the weights carry a copy of their
    # config, from which repair_torn_export restores it after a crash between the two renames.
    save_adapter_weights(directory / ADAPTER_WEIGHTS, adapter, described_by=config)
    config.to_json(directory / ADAPTER_CONFIG)


def save_adapter_weights(path: Path, adapter: nn.Module, described_by: AdapterConfig | None = None) -> None:
    """The adapter's tensors as safetensors, written aside and renamed (atomic and durable); with `described_by`,
    that config's JSON in the file's metadata too."""
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in adapter.state_dict().items()}
    metadata = {"format_version": str(FORMAT_VERSION)}
    if described_by is not None:
        metadata[ADAPTER_CONFIG] = json.dumps(dataclasses.asdict(described_by), default=str)
    with removed_unless_renamed(not_a_link(path.with_name(path.name + ".tmp"))) as tmp:
        save_safetensors(state, tmp, metadata=metadata)
        with_usual_mode(tmp)
        replace_durably(tmp, path)


def torn_export_config(directory: Path) -> dict | None:
    """The config inside the weights of `directory` where adapter_config.json beside them is older (a crash
    between the two renames of save_adapter: the copy in the weights' metadata was saved at a later training
    step), else None. A config edited by hand (a backbone moved) is the same step's: not torn."""
    from safetensors import SafetensorError, safe_open

    weights, config_path = Path(directory) / ADAPTER_WEIGHTS, Path(directory) / ADAPTER_CONFIG
    try:
        with safe_open(str(weights), framework="pt") as opened:
            carried = json.loads((opened.metadata() or {})[ADAPTER_CONFIG])
        described = json.loads(json_file_text(config_path, str(config_path))) if config_path.is_file() else None
    except (SafetensorError, OSError, ValueError, KeyError, RecursionError, UserError):
        return None  # none to compare (before the copy existed, no weights) or a damaged file: loading says so
    return carried if _training_step(carried) > _training_step(described) else None


def no_adapter_weights(path: Path) -> str:
    """The error for a run folder whose adapter.safetensors (`path`) is not there."""
    return f"{path} not found: the run folder has no trained adapter (did training save one?)"


def repair_torn_export(directory: Path) -> bool:
    """Rewrite a torn adapter_config.json (torn_export_config) from the copy inside the weights; True if it did."""
    carried = torn_export_config(directory)
    if carried is None:
        return False
    write_json(Path(directory) / ADAPTER_CONFIG, carried)
    return True


def adapter_training(directory: Path, described: dict | None) -> dict | None:
    """The training record (step, best score, settings) of the weights in `directory`: `described`, their
    adapter_config.json's, or the copy inside the weights where that file is torn from them (torn_export_config).
    Readers (eval.py, the report) take it so and leave the file as it is: the weights' step and best
    are the truth, and train.py --resume rewrites the file (repair_torn_export)."""
    carried = torn_export_config(directory)
    return carried["training"] if carried is not None else described


def _training_step(config) -> int:
    """The training step an adapter config JSON says it was saved at; -1 where it says none."""
    training = config.get("training") if isinstance(config, dict) else None
    step = training.get("step") if isinstance(training, dict) else None
    return step if is_whole_number(step) else -1


# Values an adapter.safetensors may hold past those of its adapter before it is refused unread (64 MB of float32):
# room for weights of other sizes than the config's, which load_captioner reports tensor by tensor once loaded.
EXTRA_VALUES_READ = 2**24


def load_adapter_state(path: Path, adapter_values: int | None = None,
                       sized_by: str | Path = "") -> dict[str, torch.Tensor]:
    """The tensors of an adapter.safetensors file. Given how many values the adapter it is for holds (as the config
    `sized_by` sizes it), a file whose header promises far more is refused before any is read: a 3 GB sparse file
    (4 kB on the disk of a run folder from elsewhere) took 10 GB of memory and 40 s to be found not to fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(no_adapter_weights(path))
    try:
        if adapter_values is not None and (stored := stored_values(path)) > adapter_values + EXTRA_VALUES_READ:
            raise UserError(f"{path} holds {stored:,} values, far more than the {adapter_values:,} of the adapter "
                            f"{sized_by} sizes: not its weights (a file edited, or from elsewhere); re-train it or use "
                            "another copy")
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); re-save or re-train it") from None
    if problem := unusable_weights(state):
        raise UserError(f"{path} cannot be used: {problem}; train.py never saves such weights (a file edited, or "
                        "from elsewhere): re-train it or use another copy")
    return state


def stored_values(path: Path) -> int:
    """How many values a safetensors file holds, by its header alone (read, never its tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as opened:
        return sum(math.prod(opened.get_slice(name).get_shape()) for name in opened.keys())


def value_count(module: nn.Module) -> int:
    """How many values (weights and buffers) a module's state dict holds: what its safetensors file should."""
    return sum(tensor.numel() for tensor in module.state_dict().values())


def adapter_value_count(config: AdapterConfig) -> int:
    """value_count of the adapter `config` describes, built on torch's meta device, which allocates nothing (nor
    initialises: its note on a config of zero sizes is not for our users)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return value_count(Adapter(config))


def unusable_weights(state: dict[str, torch.Tensor]) -> str:
    """What makes adapter weights unusable, or "": a NaN or infinite value (every caption came out empty, with a
    note blaming the model), or a tensor of integers or booleans (cast silently into the weights)."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            return f"{name} holds {str(tensor.dtype).removeprefix('torch.')} values, not floating-point weights"
        if bad := int((~torch.isfinite(tensor)).sum()):
            return f"{name} holds {bad:,} NaN or infinite values (of {tensor.numel():,})"
    return ""


def check_backbones_match(config: AdapterConfig, captioner: Captioner, source: Path, clip_model: str,
                          lm_model: str) -> None:
    """The loaded backbones and tokenizer are the ones the adapter was trained against (by size and ids)."""
    clip_dim = captioner.clip.visual_projection.out_features
    lm_dim = captioner.lm.get_input_embeddings().weight.shape[1]
    if config.image_feature_dim != clip_dim:
        raise UserError(f"{source}: the adapter takes {config.image_feature_dim}-d image features, but CLIP "
                        f"{clip_model!r} gives {clip_dim}-d ones; use the CLIP it was trained with")
    if config.lm_hidden_dim != lm_dim:
        raise UserError(f"{source}: the adapter makes {config.lm_hidden_dim}-d prefix embeddings, but LM "
                        f"{lm_model!r} has hidden size {lm_dim}; use the LM it was trained with")
    eos, _ = special_token_ids(captioner.tokenizer, captioner.lm)
    if config.vocab_size is not None and (len(captioner.tokenizer) != config.vocab_size or eos != config.eos_token_id):
        raise UserError(
            f"{source}: the tokenizer of {lm_model!r} differs from the one the adapter was trained with "
            f"(vocab {len(captioner.tokenizer)}, EOS {eos}; trained with vocab {config.vocab_size}, "
            f"EOS {config.eos_token_id})"
        )
    # Checkpoints written before the digest existed have none: size and EOS are all they can check.
    if config.vocabulary_digest is not None and vocabulary_digest(captioner.tokenizer) != config.vocabulary_digest:
        raise UserError(f"{source}: the tokenizer of {lm_model!r} has the size and EOS of the one the adapter was "
                        "trained with but another vocabulary (tokens map to other ids); use the LM it was trained with")


def weights_mismatch(adapter: nn.Module, state: dict, error: RuntimeError) -> str:
    """What a strict load_state_dict refused, briefly: a transformer adapter has dozens of tensors
    per layer, and torch's message names every one."""
    expected, given = set(adapter.state_dict()), set(state)

    def few(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = [f"{len(keys)} {what} ({few(keys)})" for what, keys in
             (("tensors missing", expected - given), ("unexpected tensors", given - expected)) if keys]
    if not parts:  # same names, other shapes: torch's first lines say which ("size mismatch for ...")
        parts = [line.strip() for line in str(error).splitlines()[1:3] if line.strip()]
    return "; ".join(parts)[:600]


def adapter_to_load(config: AdapterConfig) -> Adapter:
    """An Adapter of the config's shape with its tensors left unset, for a checkpoint's to be copied in: drawing
    random weights only to overwrite them took 0.2-0.4 s of every load of an adapter for the real backbones (55M
    parameters). Every tensor of an Adapter is in its state dict, so a strict load_state_dict sets them all or
    refuses the file."""
    with torch.device("meta"):  # shapes only, no memory and no random numbers
        adapter = Adapter(config)
    return adapter.to_empty(device="cpu")


# Pauses before a reader of a run's last/ tries again: a save replaces it whole in well under a second.
SAVE_IN_PROGRESS_RETRY_S = (0.05, 0.5)


def read_checkpoint(path: Path) -> tuple[Path, AdapterConfig, dict[str, torch.Tensor]]:
    """The folder `path` resolves to (checkpoint_folder), its config and its weights. A run's last/ is replaced
    whole at each save (train.swap_in renames it to last.old/, last.tmp/ to last/, then deletes last.old/): read
    while training saved, a file was gone for a moment and loading stopped with a safetensors traceback or a wrong
    "not found" line (12 of 3,535 reads, saves 25 ms apart). Such a read is tried again when the save is done."""
    for pause in (*SAVE_IN_PROGRESS_RETRY_S, None):
        checkpoint = checkpoint_folder(path, quiet=True)
        try:
            if not checkpoint.is_dir():
                raise UserError(f"checkpoint folder not found: {checkpoint}")
            config = AdapterConfig.from_json(checkpoint / ADAPTER_CONFIG)
            state = load_adapter_state(checkpoint / ADAPTER_WEIGHTS, adapter_value_count(config),
                                       checkpoint / ADAPTER_CONFIG)
            break
        except (UserError, OSError, RuntimeError):  # safetensors: RuntimeError "unable to open file"
            if pause is None or path.name not in ("last", "last.old"):
                raise
            time.sleep(pause)
    checkpoint_folder(path)  # its note, where a crash between a save's two renames left last.old/ alone
    return checkpoint, config, state


def load_captioner(checkpoint: str | Path, device="cpu", dtype=torch.float32, clip_model=None, lm_model=None,
                   lm_quantization: str = "none", trust_remote_code: bool = False) -> Captioner:
    """Rebuild a trained captioner from a run folder (or its last/ sub-folder) alone.

    Reads only JSON and safetensors: nothing in a checkpoint is ever unpickled. Whether to run
    code shipped with a backbone, and how to quantise the LM, are the caller's choices, not the
    checkpoint's.
    """
    checkpoint, config, state = read_checkpoint(Path(checkpoint))
    named = {"CLIP": clip_model is None, "LM": lm_model is None}  # by the checkpoint, not by the caller
    clip_model, lm_model = clip_model or config.clip_model, lm_model or config.lm_model
    from demo import rebuild_cleared_demo

    rebuild_cleared_demo(clip_model, lm_model)
    try:
        clip, processor, lm, tokenizer = load_backbones(
            clip_model, lm_model, config.clip_revision, config.lm_revision, dtype, device, lm_quantization,
            trust_remote_code
        )
    except UserError as error:  # a backbone folder moved since training: say where the path came from
        backbone = "CLIP" if str(error).startswith("CLIP") else "LM"
        if "folder not found" not in str(error) or not named[backbone]:
            raise
        flag = "--clip-model" if backbone == "CLIP" else "--lm-model"
        raise UserError(f"{error}, as named by {checkpoint / ADAPTER_CONFIG}; if it was moved, pass its new place "
                        f"with {flag}") from None
    captioner = Captioner(config, clip, processor, lm, tokenizer, adapter=adapter_to_load(config))
    check_backbones_match(config, captioner, checkpoint / ADAPTER_CONFIG, clip_model, lm_model)
    note_other_backbone_weights(config, checkpoint / ADAPTER_CONFIG, clip_model, lm_model, config.clip_revision,
                                config.lm_revision)
    check_tokenizer_fits(tokenizer, lm, lm_model)  # after: "not the tokenizer it was trained with" says more
    try:
        captioner.adapter.load_state_dict(state, strict=True)
    except RuntimeError as error:  # "Error(s) in loading state_dict ...", then one line per mismatch
        raise UserError(f"{checkpoint / ADAPTER_WEIGHTS} does not fit {checkpoint / ADAPTER_CONFIG}: "
                        f"{weights_mismatch(captioner.adapter, state, error)}; the config's sizes (prefix_length, "
                        "adapter_hidden_dim, adapter_layers, standardize_image_features) must be those the weights "
                        "were trained with") from None
    # The file's copy goes now, not with this frame: a module first imported while the backbones load calls
    # torch.fx.wrap, whose frame keeps itself in a local, a reference cycle that holds every frame above it (this
    # one too) until the cyclic collector's next pass, which inference.py holds off until its first batch is
    # captioned (see resume_gc). Meanwhile the file's copy was the adapter's size again at the peak memory.
    del state
    captioner.adapter.to(captioner.device).eval()
    return captioner


if __name__ == "__main__":
    from utils import not_a_script

    sys.exit(not_a_script(__file__))
