"""Loading is safe and says what is wrong: damaged or mismatched checkpoints, no unpickling, no
remote code unless asked; and the frozen LM can be quantised (8-bit, 4-bit) with the adapter
still learning through it."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_script
import inference
import model
import train
from conftest import other_values_in, said_by_the_processes, train_args, without_loading_note
from dataset import collate_captions, load_records, tokenize_caption
from model import AdapterConfig, build_captioner, load_captioner
from utils import UserError, library_versions, run_cli, write_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "run"))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The run's adapter tensors, read into memory: safetensors before 0.8 maps the file, and the tests below rewrite
    it in place under the tensors they read (a bus error)."""
    from safetensors.torch import load

    return load((folder / "adapter.safetensors").read_bytes())


def load_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_captioner(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------

def test_library_versions_are_read_without_importing_the_libraries(monkeypatch):
    # Every checkpoint records library versions. A machine that trains from a folder or benchmarks
    # may lack a working `datasets`; saving must not need to import it.
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    versions = library_versions()
    assert versions["datasets"] == importlib.metadata.version("datasets")
    assert versions["torch"] == torch.__version__ and versions["transformers"]


def test_missing_files(copy, tmp_path):
    assert "checkpoint folder not found" in load_error(tmp_path / "nowhere")
    (copy / "adapter.safetensors").unlink()
    assert "adapter.safetensors not found" in load_error(copy)
    (copy / "adapter_config.json").unlink()
    assert "adapter_config.json not found" in load_error(copy)


def test_moved_backbones_are_named_with_the_flag_that_finds_them(tiny, copy, tmp_path, capsys):
    moved = Path(shutil.copytree(tiny["lm_model"], tmp_path / "moved-lm"))
    edit_config(copy, lm_model=str(tmp_path / "gone-lm"))
    message = load_error(copy)
    assert message.startswith(f"language model folder not found: {tmp_path / 'gone-lm'}, as named by ")
    assert message.endswith("if it was moved, pass its new place with --lm-model"), message
    # The flag, as inference.py takes it, finds it.
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    assert run_cli(inference.main, ["--checkpoint", str(copy), "--lm-model", str(moved), image]) == 0
    assert "test_0000.png" in capsys.readouterr().out
    # A moved CLIP is named with its own flag; a place the caller gave is theirs, with no "as named by" the config.
    edit_config(copy, lm_model=tiny["lm_model"], clip_model=str(tmp_path / "gone-clip"))
    assert load_error(copy).endswith("if it was moved, pass its new place with --clip-model")
    elsewhere = tmp_path / "elsewhere"
    assert load_error(copy, clip_model=str(elsewhere)) == f"CLIP model folder not found: {elsewhere}"


def test_corrupt_and_truncated_weights(copy):
    weights = copy / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = load_error(copy)
    assert str(weights) in message and "not a readable safetensors file" in message
    weights.write_bytes(bytes(range(256)) * 4)
    assert "not a readable safetensors file" in load_error(copy)
    weights.write_bytes(b"")
    assert "not a readable safetensors file" in load_error(copy)


def test_weights_that_do_not_fit_the_config(copy, tmp_path):
    from safetensors.torch import save_file

    state = adapter_tensors(copy)
    original = dict(state)
    state["net.0.weight"] = state["net.0.weight"][:, :-1].contiguous()
    save_file(state, str(copy / "adapter.safetensors"))
    message = load_error(copy)
    assert "does not fit" in message and "net.0.weight" in message and "size mismatch" in message
    # A few values more than the adapter holds: still read, and named tensor by tensor (not "far more").
    save_file({**original, "extra": torch.zeros(10)}, str(copy / "adapter.safetensors"))
    message = load_error(copy)
    assert "does not fit" in message and "unexpected tensors (extra)" in message, message


def test_a_transformer_adapter_with_other_layers_is_named_briefly(tiny, tmp_path):
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"],
                                              adapter_kind="transformer", adapter_layers=2))
    model.save_adapter(tmp_path / "run", captioner.adapter, captioner.config)
    edit_config(tmp_path / "run", adapter_layers=3)  # one layer's dozen tensors are missing
    message = load_error(tmp_path / "run")
    assert "does not fit" in message and "12 tensors missing (net.layers.layers.2." in message and "9 more" in message
    assert "adapter_layers" in message and len(message) < 800, message


def test_an_edited_config_asking_for_a_huge_adapter_names_the_file(copy):
    edit_config(copy, adapter_hidden_dim=10**9)
    message = load_error(copy)
    assert "the adapter would have" in message and str(copy / "adapter_config.json") in message
    assert "--" not in message  # no train.py flag: inference.py and eval.py have none of them


def test_config_of_another_format_or_shape(copy):
    config = copy / "adapter_config.json"
    original = config.read_text()
    edit_config(copy, format_version=99)
    message = load_error(copy)
    assert str(config) in message and "format version 99" in message
    for broken, expected in (("{not json", "not valid JSON"), ("[1, 2]", "holds a list, not an adapter config"),
                             ("null", "holds null, not an adapter config object"),
                             (json.dumps({**json.loads(original), "max_caption_tokens": -1}),
                              "max_caption_tokens is -1, expected a whole number >= 2"),
                             (json.dumps({**json.loads(original), "prefix_length": "ten"}), "prefix_length is 'ten'"),
                             (json.dumps({**json.loads(original), "prefix_length": 0}), "prefix length must be >= 1"),
                             (json.dumps({**json.loads(original), "adapter_kind": "conv"}), "adapter kind 'conv'"),
                             (json.dumps({name: value for name, value in json.loads(original).items()
                                          if name != "format_version"}), "format version None"),
                             (json.dumps({**json.loads(original), "vocab_size": True}), "vocab_size is True"),
                             (json.dumps({**json.loads(original), "extra": 1}), "unknown fields ['extra']")):
        config.write_text(broken)
        message = load_error(copy)
        assert str(config) in message and expected in message, message
    data = json.loads(original)
    del data["lm_model"]
    config.write_text(json.dumps(data))
    assert "lacks the fields ['lm_model']" in load_error(copy)


def test_a_config_nested_too_deeply_or_too_large_to_read_is_one_line_unread(copy):
    """A run folder from elsewhere: 100,000 nested lists were a RecursionError traceback, and a 1 GB config was
    read whole (json.loads took 1.3 GB of memory for a 200 MB one) before anything said a word."""
    config = copy / "adapter_config.json"
    original = json.loads(config.read_text())
    config.write_text(json.dumps({**original, "training": {}})[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    message = load_error(copy)
    assert message == f"{config} is not valid JSON (nested too deeply)", message
    with open(config, "r+b") as handle:  # sparse: 65 MB on no disk space
        handle.truncate(65 * 2**20)
    message = load_error(copy)
    assert message.startswith(f"{config} is 65 MB, far more than this project writes there"), message
    (copy / "run_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"run config .* is not valid JSON \(nested too deeply\)"):
        eval_script.find_run_config(copy)


@pytest.mark.parametrize("value, said", [(float("nan"), "net.0.bias holds 3 NaN or infinite values (of "),
                                         (float("-inf"), "net.0.bias holds 3 NaN or infinite values (of "),
                                         (7, "net.0.bias holds int64 values, not floating-point weights")])
def test_weights_with_nonfinite_or_integer_values_are_refused(copy, value, said):
    """NaN weights loaded and every caption came out empty, with a note blaming the model; integers were cast into
    the weights without a word."""
    from safetensors.torch import save_file

    state = adapter_tensors(copy)
    bias = state["net.0.bias"]
    if isinstance(value, int):
        state["net.0.bias"] = torch.full_like(bias, value, dtype=torch.int64)
    else:
        state["net.0.bias"] = torch.cat([torch.full((3,), value), bias[3:]])
    save_file(state, str(copy / "adapter.safetensors"))
    message = load_error(copy)
    assert message.startswith(f"{copy / 'adapter.safetensors'} cannot be used: {said}"), message


def test_weights_promising_more_values_than_the_adapter_holds_are_refused_unread(copy, monkeypatch):
    """A header may promise a tensor of gigabytes over a sparse file (4 kB on the disk of a run folder from
    elsewhere): a 3 GB one took 10 GB of memory before it was found not to fit. Its size is read from the header
    and refused before a byte of the tensors is (here 128 MB, so that the test is harmless without the check)."""
    import struct

    values = 32 * 2**20
    header = json.dumps({"net.0.weight": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}})
    header += " " * (-len(header) % 8)
    weights = copy / "adapter.safetensors"
    with open(weights, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
        handle.truncate(8 + len(header) + 4 * values)
    import safetensors.torch

    loaded, load_file = [], safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *args, **kw: loaded.append(1) or load_file(*args, **kw))
    message = load_error(copy)
    adapter = model.Adapter(AdapterConfig.from_json(copy / "adapter_config.json"))
    expected = sum(tensor.numel() for tensor in adapter.state_dict().values())
    assert message == (f"{weights} holds 33,554,432 values, far more than the {expected:,} of the adapter "
                       f"{copy / 'adapter_config.json'} sizes: not its weights (a file edited, or from elsewhere); "
                       "re-train it or use another copy"), message
    assert not loaded


def test_weights_are_read_up_to_the_adapters_values_and_the_allowance_and_refused_past_it(copy, monkeypatch):
    """The allowance for values past the adapter's is a bound, not a rough scale: with it set to 10, a file of 10
    values more is read (and its extra tensor named), one of 11 more is refused unread."""
    from safetensors.torch import save_file

    monkeypatch.setattr(model, "EXTRA_VALUES_READ", 10)
    state = adapter_tensors(copy)
    save_file({**state, "extra": torch.zeros(10)}, str(copy / "adapter.safetensors"))
    assert "unexpected tensors (extra)" in load_error(copy)
    save_file({**state, "extra": torch.zeros(11)}, str(copy / "adapter.safetensors"))
    assert "far more than the" in load_error(copy)


def test_captions_hold_no_control_characters_whatever_the_tokenizer_decodes(checkpoint):
    """An LM a run folder names may come with a tokenizer whose tokens hold escape sequences: inference.py printed
    them raw (ESC[2J cleared the user's screen). Captions follow the references' rule: control characters are
    spaces."""
    captioner = load_captioner(checkpoint)
    captioner.tokenizer.batch_decode = lambda tokens, **kwargs: ["a \x1b[2Jred\x07 dog\r", "\x9b31m"]
    assert captioner.decode(torch.zeros(2, 3, dtype=torch.long)) == ["a [2Jred dog", "31m"]


# ----------------------------------------------------------------------------------------------
# Backbones that do not match the adapter
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_backbones(tiny, tmp_path_factory) -> dict:
    """Random-init backbones of other sizes, and the tiny LM with a tokenizer of another vocabulary."""
    from transformers import (AutoConfig, AutoTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              Qwen3ForCausalLM)

    root = tmp_path_factory.mktemp("other")
    clip_config = CLIPVisionConfig.from_pretrained(tiny["clip_model"])
    clip_config.projection_dim = clip_config.projection_dim // 2
    CLIPVisionModelWithProjection(clip_config).save_pretrained(root / "clip")
    shutil.copy(Path(tiny["clip_model"]) / "preprocessor_config.json", root / "clip")

    lm_config = AutoConfig.from_pretrained(tiny["lm_model"])
    lm_config.hidden_size, lm_config.head_dim = lm_config.hidden_size // 2, lm_config.head_dim // 2
    Qwen3ForCausalLM(lm_config).save_pretrained(root / "lm")
    AutoTokenizer.from_pretrained(tiny["lm_model"]).save_pretrained(root / "lm")

    shutil.copytree(tiny["lm_model"], root / "vocab")
    tokenizer = AutoTokenizer.from_pretrained(tiny["lm_model"])
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(root / "vocab")

    # Same size, same EOS, two tokens trading ids: another tokenizer all the same.
    shutil.copytree(tiny["lm_model"], root / "swapped")
    spec = json.loads((root / "swapped" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (root / "swapped" / "tokenizer.json").write_text(json.dumps(spec))
    return {"clip": str(root / "clip"), "lm": str(root / "lm"), "vocab": str(root / "vocab"),
            "swapped": str(root / "swapped")}


def test_config_naming_backbones_of_other_sizes(tiny, copy, other_backbones):
    edit_config(copy, lm_model=other_backbones["lm"])
    message = load_error(copy)
    assert str(copy / "adapter_config.json") in message and "64-d prefix" in message and "hidden size 32" in message
    edit_config(copy, lm_model=tiny["lm_model"], clip_model=other_backbones["clip"])
    message = load_error(copy)
    assert f"{clip_width(tiny['clip_model'])}-d image features" in message
    assert f"gives {clip_width(other_backbones['clip'])}-d" in message and other_backbones["clip"] in message
    # Sizes edited to match the other LM as well: then the weights do not fit the config.
    edit_config(copy, clip_model=tiny["clip_model"], lm_model=other_backbones["lm"], lm_hidden_dim=32,
                adapter_hidden_dim=160)
    assert "does not fit" in load_error(copy)


def test_backbone_overrides_of_other_sizes(checkpoint, other_backbones):
    assert "hidden size 32" in load_error(checkpoint, lm_model=other_backbones["lm"])
    assert f"gives {clip_width(other_backbones['clip'])}-d" in load_error(checkpoint, clip_model=other_backbones["clip"])


def clip_width(clip_model: str) -> int:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_pretrained(clip_model).projection_dim


def test_tokenizer_of_another_vocabulary(checkpoint, other_backbones, tmp_path):
    message = load_error(checkpoint, lm_model=other_backbones["vocab"])
    assert "tokenizer" in message and "differs" in message and str(checkpoint) in message
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert f"vocab {config['vocab_size'] + 1}" in message and f"trained with vocab {config['vocab_size']}" in message
    message = load_error(checkpoint, lm_model=other_backbones["swapped"])
    assert "another vocabulary" in message and str(checkpoint) in message
    # A checkpoint from before the digest can check size and EOS only, and still loads.
    old = Path(shutil.copytree(checkpoint, checkpoint.parent / "before-digest"))
    edit_config(old, vocabulary_digest=None)
    load_captioner(old, lm_model=other_backbones["swapped"])
    # The same vocabulary (and digest) with another EOS, its tokenizer_config.json edited: captions would end elsewhere.
    other_eos = Path(shutil.copytree(config["lm_model"], tmp_path / "other-eos"))
    settings = json.loads((other_eos / "tokenizer_config.json").read_text())
    (other_eos / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "a"}))
    message = load_error(checkpoint, lm_model=str(other_eos))
    trained = f"trained with vocab {config['vocab_size']}, EOS {config['eos_token_id']}"
    assert "differs" in message and trained in message and "EOS 0;" not in message, message


def test_backbone_of_other_weights_noted(checkpoint, tiny, tmp_path, capsys):
    """An LM folder whose weights were replaced by other values of the same shapes (another build of the demo's LM,
    another fine-tune) loads with a note naming it; the same weights, or an adapter from before the digests, not."""
    run = Path(shutil.copytree(checkpoint, tmp_path / "run"))
    lm = Path(shutil.copytree(tiny["lm_model"], tmp_path / "lm"))
    edit_config(run, lm_model=str(lm))
    load_captioner(run)
    assert "trained with" not in capsys.readouterr().err
    # One tensor past the file's first 64 KB (the embeddings), as a fine-tune that left those alone changes it.
    other_values_in(lm / "model.safetensors", "model.layers.1.mlp.gate_proj.weight")
    load_captioner(run)
    said = capsys.readouterr().err
    assert said.count("note:") == 1 and f"LM {lm}" in said and "CLIP" not in said and "train again" in said, said
    # An adapter_config.json written before the digests: loads without a word, as before.
    config = json.loads((run / "adapter_config.json").read_text())
    del config["clip_weights_digest"], config["lm_weights_digest"]
    (run / "adapter_config.json").write_text(json.dumps(config))
    load_captioner(run)
    assert "trained with" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Nothing is unpickled; no remote code unless asked
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load or pickle load fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("something was unpickled")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refuse)
    return calls


def test_inference_and_eval_never_unpickle(tiny, checkpoint, tmp_path, no_unpickling, capsys):
    run = Path(shutil.copytree(checkpoint, tmp_path / "run"))
    write_json(run / "run_config.json", {"dataset": "folder", "data_dir": tiny["data_dir"], "seed": 0})
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    assert inference.main(["--checkpoint", str(run), image]) == 0
    assert eval_script.main([str(run), "--limit", "2", "--no-progress", "--num-workers", "0"]) == 0
    assert no_unpickling == []


def test_pickled_backbone_weights_are_refused(tiny, checkpoint, tmp_path, no_unpickling):
    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(tiny["lm_model"], tmp_path / "lm"))
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    message = load_error(checkpoint, lm_model=str(pickled))
    assert "could not load language model" in message and str(pickled) in message and "never loaded" in message
    assert no_unpickling == []



def test_damaged_backbone_weights_are_one_line_naming_the_model(tiny, checkpoint, tmp_path):
    for kind, key in (("lm", "lm_model"), ("clip", "clip_model")):
        damaged = Path(shutil.copytree(tiny[key], tmp_path / kind))
        weights = damaged / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # a download or copy cut short
        message = load_error(checkpoint, **{key: str(damaged)})
        assert str(damaged) in message and "weights file is damaged" in message, message

def test_trust_remote_code_is_off_unless_asked(tiny, checkpoint, monkeypatch, capsys):
    calls = []
    real = model._from_pretrained

    def recording(loader, what, name, **kwargs):
        if loader is not model._ConfigFile:  # config.json read as JSON (check_backbone_kinds): no code, no weights
            calls.append((what, kwargs))
        return real(loader, what, name, **kwargs)

    monkeypatch.setattr(model, "_from_pretrained", recording)
    load_captioner(checkpoint)
    assert [what for what, _ in calls] == ["CLIP model", "CLIP image processor", "language model", "tokenizer"]
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)  # explicit, not left to a default
    assert all(kwargs["use_safetensors"] is True for what, kwargs in calls if "model" in what)

    calls.clear()
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    assert inference.main(["--checkpoint", str(checkpoint), "--trust-remote-code", image]) == 0
    assert calls and all(kwargs["trust_remote_code"] is True for _, kwargs in calls)
    calls.clear()
    assert train.parse_config(["--trust-remote-code"]).trust_remote_code is True
    assert train.parse_config([]).trust_remote_code is False


def test_resume_never_takes_trust_from_the_run_folder(tmp_path):
    saved = dataclasses.asdict(train.TrainConfig(run_name="r", output_dir=str(tmp_path), trust_remote_code=True))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run_config.json").write_text(json.dumps(saved))
    resumed = train.resolve_config(train.TrainConfig(run_name="r", output_dir=str(tmp_path), resume=True))
    assert resumed.resume and resumed.trust_remote_code is False
    asked = train.resolve_config(train.TrainConfig(run_name="r", output_dir=str(tmp_path), resume=True,
                                                   trust_remote_code=True))
    assert asked.trust_remote_code is True


def test_code_shipped_with_a_backbone_never_runs(tiny, checkpoint, tmp_path):
    lm = Path(shutil.copytree(tiny["lm_model"], tmp_path / "lm"))
    marker = tmp_path / "code-ran"
    (lm / "custom_qwen.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                       "from transformers import Qwen3Config as Config, Qwen3ForCausalLM as Model\n")
    config = json.loads((lm / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_qwen.Config", "AutoModelForCausalLM": "custom_qwen.Model"}
    (lm / "config.json").write_text(json.dumps(config))
    load_captioner(checkpoint, lm_model=str(lm))
    assert not marker.exists()


def test_a_feature_cache_a_run_folder_names_is_used_only_where_it_holds_features_here(tmp_path, capsys):
    """A run folder names the feature cache it trained with, a path on the machine it came from (or any path its
    maker chose): eval.py, app.py and train.py --resume created it and wrote features there. Here they use it only
    where it is a feature cache already, else the default one, and say so."""
    from dataset import default_feature_cache_dir

    elsewhere = str(tmp_path / "home" / ".ssh")
    settings = eval_script.feature_cache_settings({"feature_cache_dir": elsewhere})
    assert settings == {"cache_dir": None, "use_cache": True}
    assert capsys.readouterr().err.strip() == (f"note: the feature cache the run trained with, {elsewhere}, holds no "
                                               f"features on this machine: using {default_feature_cache_dir()}")
    assert not Path(elsewhere).exists()
    cache = tmp_path / "my-cache"
    (cache / "0123abcd").mkdir(parents=True)
    (cache / "0123abcd" / "part-1.json").write_text("{}")
    assert eval_script.feature_cache_settings({"feature_cache_dir": str(cache)})["cache_dir"] == str(cache)
    assert eval_script.feature_cache_settings({"feature_cache_dir": elsewhere, "feature_cache": False}) == \
        {"cache_dir": elsewhere, "use_cache": False}  # no cache at all: nothing is written anywhere

    for named, kept in ((elsewhere, ""), (str(cache), str(cache))):
        saved = dataclasses.asdict(train.TrainConfig(run_name="r", output_dir=str(tmp_path), feature_cache_dir=named))
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / "run_config.json").write_text(json.dumps(saved))
        resumed = train.resolve_config(train.TrainConfig(run_name="r", output_dir=str(tmp_path), resume=True))
        assert resumed.feature_cache_dir == kept
    config = train.parse_config(["--run-name", "r", "--output-dir", str(tmp_path), "--resume", "--feature-cache-dir",
                                 elsewhere])
    assert train.resolve_config(config).feature_cache_dir == elsewhere  # named on this command line: the user's


# ----------------------------------------------------------------------------------------------
# A quantised frozen LM
# ----------------------------------------------------------------------------------------------

def fixed_batch(captioner, data_dir: str, size: int = 8) -> dict:
    records = load_records("folder", "train", data_dir)[:size]
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(size, captioner.config.image_feature_dim), dim=-1)
    eos = captioner.config.eos_token_id
    return collate_captions([{"image_features": features[i],
                              "token_ids": tokenize_caption(captioner.tokenizer, r.captions[0], eos, 40)}
                             for i, r in enumerate(records)], captioner.config.pad_token_id)


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_adapter_learns_through_a_quantised_lm(tiny, quantization, layer):
    torch.manual_seed(0)
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]),
                                lm_quantization=quantization)
    assert any(type(module).__name__ == layer for module in captioner.lm.modules())
    assert not any(p.requires_grad for p in captioner.lm.parameters())
    batch = fixed_batch(captioner, tiny["data_dir"])
    optimizer = torch.optim.AdamW(captioner.adapter.parameters(), lr=3e-3)
    captioner.train()
    losses = []
    for step in range(8):
        loss = captioner(**batch)
        assert torch.isfinite(loss), loss
        loss.backward()
        if step == 0:
            grads = [p.grad for p in captioner.adapter.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
            assert all(p.grad is None for p in captioner.lm.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    captions = captioner.generate(batch["image_features"][:2])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def dequantized_weight(module) -> torch.Tensor:
    """The float weight a bitsandbytes layer computes with: NF4 blocks dequantised, or int8 rows times their scale."""
    import bitsandbytes.functional as bnb_functional

    if type(module).__name__ == "Linear4bit":
        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight.data.float() * module.weight.SCB.float()[:, None] / 127


@pytest.mark.parametrize("quantization, agreement", [("8bit", 0.99), ("4bit", 0.9999)])
def test_a_quantised_lm_gives_the_adapter_the_gradient_of_its_own_weights(tiny, quantization, agreement):
    """The adapter's gradient through a quantised LM is the one an unquantised LM holding the same (dequantised)
    weights gives, after a pass without gradients (a validation; the head probe). On a CPU with AVX-512 BF16 that
    pass made bitsandbytes repack the 4-bit weights for a kernel with no backward: every later gradient was
    silently wrong (cosine 0.001), while the loss matched. (On a CPU without AVX-512 BF16 the repacking never
    happens, and this test passes either way.) 8-bit also quantises activations, hence its looser bound."""
    config = AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"])
    torch.manual_seed(0)
    quantised = build_captioner(config, lm_quantization=quantization)
    plain = build_captioner(config)
    plain.adapter.load_state_dict(quantised.adapter.state_dict())
    layers = dict(quantised.lm.named_modules())
    for name, module in plain.lm.named_modules():
        if type(layers.get(name)).__name__ in ("Linear4bit", "Linear8bitLt"):
            module.weight.data.copy_(dequantized_weight(layers[name]))
    batch = fixed_batch(quantised, tiny["data_dir"])
    gradients = []
    for captioner in (quantised, plain):
        with torch.no_grad():
            captioner.eval()(**batch)  # as a validation does, before training goes on
        captioner.train()(**batch).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in captioner.adapter.parameters()]))
    assert torch.cosine_similarity(*gradients, dim=0) > agreement


def test_a_captioner_loaded_for_captioning_keeps_4bit_gradients_once_set_to_train(tiny):
    """load_captioner leaves bitsandbytes free to repack 4-bit weights for its faster CPU kernel (captioning
    needs no gradients); a captioner then set to train turns that off before any pass can repack them."""
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]),
                                lm_quantization="4bit")
    layers = [m for m in captioner.lm.modules() if type(m).__name__ == "Linear4bit"]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as load_captioner leaves them
    captioner.eval()
    assert all(layer.support_avx512bf16_for_cpu for layer in layers)
    captioner.train()
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)


def test_a_4bit_runs_final_evaluation_captions_with_the_lm_as_eval_py_loads_it(tiny, tmp_path, monkeypatch):
    """Training over a 4-bit LM keeps bitsandbytes from repacking its weights (keep_4bit_weights_differentiable);
    once trained, the final evaluation lets it repack them again, as eval.py's load_captioner does: the test split
    captioned as fast, and to the same captions, as `python eval.py RUN` (the repacked kernel rounds otherwise). On
    a CPU without AVX-512 BF16 nothing repacks, and this passes either way."""
    import bitsandbytes

    if not hasattr(bitsandbytes.nn.Linear4bit(1, 1), "support_avx512bf16_for_cpu"):
        pytest.skip(f"bitsandbytes {bitsandbytes.__version__} never repacks 4-bit weights: nothing to keep or allow")

    def repacking(captioner) -> list[bool]:
        return [module.support_avx512bf16_for_cpu for module in captioner.lm.modules()
                if hasattr(module, "support_avx512bf16_for_cpu")]

    seen, evaluate = [], eval_script.evaluate_captioner
    monkeypatch.setattr(eval_script, "evaluate_captioner",
                        lambda captioner, *args, **kwargs: seen.append(repacking(captioner)) or
                        evaluate(captioner, *args, **kwargs))
    assert train.main(train_args(tiny, tmp_path, "final", "--lm-quantization", "4bit", "--max-steps", "2",
                                 "--eval-every", "0", "--test-limit", "2")) == 0
    loaded = repacking(load_captioner(tmp_path / "final", lm_quantization="4bit"))
    assert loaded and seen == [loaded]


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_compile_is_left_out_over_an_8bit_lm_only(tiny, quantization, capsys):
    """--compile over an 8-bit LM hit dynamo's recompile limit inside bitsandbytes' int8 matmul (5 lines
    of warnings) and trained at half the eager speed; it now trains eagerly with one note. 4-bit compiles."""
    from model import TrainingLoss

    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]),
                                lm_quantization=quantization)
    loss_function = TrainingLoss(captioner, compile=True, backend="aot_eager")
    left_out = "note: --compile is left out with an 8-bit LM" in capsys.readouterr().err
    assert (loss_function.compiled is None, left_out) == ((True, True) if quantization == "8bit" else (False, False))


def test_quantisation_choice_is_checked(monkeypatch):
    with pytest.raises(UserError, match="choose one of none, 8bit, 4bit"):
        model.lm_quantization_config("3bit", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like to import
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        model.lm_quantization_config("4bit", torch.device("cpu"))
    assert model.lm_quantization_config("none", torch.device("cpu")) is None


def test_bitsandbytes_notice_of_an_optional_cpu_kernel_is_not_shown(caplog):
    # On CPUs with AVX-512 BF16 its import warned "Failed to load CPU gemm_4bit_forward ... pip install kernels"
    # (a package fetched from the Hub); its own fallback runs, so every 4-bit command printed noise.
    import logging

    model.lm_quantization_config("4bit", torch.device("cpu"))
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]


def test_a_bitsandbytes_that_is_installed_but_does_not_load_is_one_line(monkeypatch):
    # Its native library built for another CUDA raises at import (RuntimeError, OSError): that was a traceback.
    class BrokenNativeLibrary:
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes":
                raise RuntimeError("CUDA Setup failed despite GPU being available\nmore lines")

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenNativeLibrary(), *sys.meta_path])
    with pytest.raises(UserError, match=r"^--lm-quantization 8bit: bitsandbytes is installed but does not load "
                                        r"\(CUDA Setup failed despite GPU being available\); install a bitsandbytes"):
        model.lm_quantization_config("8bit", torch.device("cpu"))


def test_quantisation_is_recorded_and_reused(tiny, tmp_path, monkeypatch, capsys):
    assert train.main(train_args(tiny, tmp_path, "small", "--lm-quantization", "4bit", "--max-steps", "3",
                                 "--final-eval", "false")) == 0
    assert "frozen LM = 4bit (bitsandbytes)" in capsys.readouterr().out  # the banner says what it trains over
    run = tmp_path / "small"
    assert json.loads((run / "run_config.json").read_text())["lm_quantization"] == "4bit"
    assert json.loads((run / "adapter_config.json").read_text())["training"]["hyperparameters"][
        "lm_quantization"] == "4bit"
    used = []
    real = inference.load_captioner
    monkeypatch.setattr(inference, "load_captioner", lambda *a, **kw: used.append(kw["lm_quantization"]) or real(*a, **kw))
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    assert inference.main(["--checkpoint", str(run), image]) == 0
    assert inference.main(["--checkpoint", str(run / "last"), "--lm-quantization", "none", image]) == 0
    assert used == ["4bit", "none"]
    # On a machine without bitsandbytes: one line saying where the setting came from and the way round it.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    capsys.readouterr()
    assert run_cli(inference.main, ["--checkpoint", str(run), image]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {run} was trained over a 4bit LM, which needs bitsandbytes here (pip install "
                     "bitsandbytes); or load the LM unquantised with --lm-quantization none (captions may differ "
                     "a little)"), error
    assert inference.main(["--checkpoint", str(run), "--lm-quantization", "none", image]) == 0


def test_the_app_loads_the_lm_as_the_run_trained_it(tiny, checkpoint, tmp_path):
    """app.py once loaded every run's LM unquantised: another LM than the one its adapter learned to
    steer (other captions than inference.py's), and too big for the small GPU that made a 4-bit run."""
    import app

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    write_json(run / "run_config.json", {"lm_quantization": "4bit"})
    loaded = app.load_run(run, torch.device("cpu"), with_baseline=False, progress=False)
    assert any(type(module).__name__ == "Linear4bit" for module in loaded.captioner.lm.modules())
    # --lm-quantization none: where bitsandbytes cannot be installed, the run still serves, unquantised.
    loaded = app.load_run(run, torch.device("cpu"), with_baseline=False, progress=False, lm_quantization="none")
    assert not any(type(module).__name__ == "Linear4bit" for module in loaded.captioner.lm.modules())


# ----------------------------------------------------------------------------------------------
# inference.py with bad images among good ones
# ----------------------------------------------------------------------------------------------

def test_inference_reports_bad_images_and_captions_the_rest(tiny, checkpoint, tmp_path, capsys):
    good = [str(Path(tiny["data_dir"]) / "images" / f"test_000{i}.png") for i in range(2)]
    (tmp_path / "broken.png").write_bytes(Path(good[0]).read_bytes()[:100])
    bad = [str(tmp_path / "missing.jpg"), str(tmp_path / "broken.png")]
    assert inference.main(["--checkpoint", str(checkpoint), "--batch-size", "2", good[0], *bad, good[1]]) == 1
    out, err = capsys.readouterr()
    err = without_loading_note(err)
    assert [line.split("\t")[0] for line in out.splitlines()] == [good[0], good[1]]
    errors = err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert bad[0] in errors[0] and bad[1] in errors[1]

    assert inference.main(["--checkpoint", str(checkpoint), "--json", good[0], *bad]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(line) for line in lines] == [["caption", "image"], ["error", "image"], ["error", "image"]]
    assert [line["image"] for line in lines] == [good[0], *bad] and "not found" in lines[1]["error"]


def test_inference_says_when_the_model_wrote_no_words(tiny, checkpoint, monkeypatch, capsys):
    from model import Captioner

    images = [str(Path(tiny["data_dir"]) / "images" / f"test_000{i}.png") for i in range(2)]
    monkeypatch.setattr(Captioner, "caption_images", lambda self, batch, decoding=None: ["a red circle", ""][:len(batch)])
    assert inference.main(["--checkpoint", str(checkpoint), "--batch-size", "2", *images]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{images[0]}\ta red circle", f"{images[1]}\t"]
    assert without_loading_note(err).strip() == (f"note: the model wrote no words for {images[1]} (it ended the "
                                                 "caption at once)")


def test_inference_with_only_bad_images_loads_no_model(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inference, "load_captioner", lambda *a, **kw: pytest.fail("loaded a model for nothing"))
    (tmp_path / "notes.jpg").write_text("not a picture")
    assert run_cli(inference.main, ["--checkpoint", str(checkpoint), str(tmp_path / "notes.jpg")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.jpg" in err and "Traceback" not in err
    (tmp_path / "photos").mkdir()  # a folder with no image in it: said so, in one line
    assert run_cli(inference.main, ["--checkpoint", str(checkpoint), str(tmp_path / "photos")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}/photos is a folder with no image files in it "
                                               "(looked for .bmp .gif .jpeg .jpg .png .tif .tiff .webp, sub-folders "
                                               "included)")


def test_inference_on_a_folder_captions_the_images_under_it_in_order(tiny, checkpoint, tmp_path, capsys):
    images = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[:3]
    folder = tmp_path / "photos"
    (folder / "trip" / ".thumbnails").mkdir(parents=True)
    named = [folder / "b.PNG", folder / "a.png", folder / "trip" / "c.png"]
    for source, target in zip(images, named):
        shutil.copy(source, target)
    for other in ("notes.txt", ".DS_Store", "._a.png", "trip/.thumbnails/c.png"):  # not photos: left out
        shutil.copy(images[0], folder / other)
    single = tmp_path / "single.png"
    shutil.copy(images[0], single)
    assert inference.main(["--checkpoint", str(checkpoint), "--batch-size", "2", str(folder), str(single)]) == 0
    out, err = capsys.readouterr()
    listed = [line.split("\t")[0] for line in out.splitlines()]
    assert listed == [str(folder / "a.png"), str(folder / "b.PNG"), str(folder / "trip" / "c.png"), str(single)]
    assert without_loading_note(err).strip() == (f"note: {folder}: left out 3 files not named as images (.bmp .gif "
                                                 ".jpeg .jpg .png .tif .tiff .webp) or hidden")  # hidden folder unsearched
    # The same captions as naming the files one by one.
    assert inference.main(["--checkpoint", str(checkpoint), *listed]) == 0
    assert capsys.readouterr().out == out


def test_a_folder_lists_each_sub_folders_images_together_and_notes_even_one_file_left_out(tmp_path, capsys):
    """Sorted by path parts: trip/'s images, then trip-2.png (as text "trip-2.png" < "trip/a.png", which put a
    file between a folder's name and its images); one file left out gets its note too (not only several)."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for name in ("trip/a.png", "trip-2.png", "a.png", "notes.txt"):
        (folder / name).write_bytes(b"")
    paths, unreadable = inference.image_paths([str(folder)])
    assert paths == [str(folder / name) for name in ("a.png", "trip/a.png", "trip-2.png")] and unreadable == {}
    assert capsys.readouterr().err.startswith(f"note: {folder}: left out 1 file not named as images (")


def test_inference_reads_image_paths_from_standard_input(tiny, checkpoint, tmp_path, monkeypatch, capsys):
    """`find photos -name '*.jpg' | inference.py --checkpoint RUN -`: "-" used to be "image not found: -"."""
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    # Spaces are part of a name, leading or trailing; a line of only spaces is blank.
    named = [tmp_path / "sub dir" / "ph oto \u00e9.png", tmp_path / " lead.png", tmp_path / "trail.png "]
    named[0].parent.mkdir()
    for path in named:
        shutil.copy(image, path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{named[0]}\n\n{named[1]}\r\n  \t\n{named[2]}\n"))
    after = tmp_path / "after.png"  # an image named after "-" comes after the listed ones
    shutil.copy(image, after)
    assert inference.main(["--checkpoint", str(checkpoint), str(image), "-", str(after)]) == 0
    out = capsys.readouterr().out
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(image), *map(str, named), str(after)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stdin, argv, says in ((Terminal(), ["-"], "none is piped in"), (io.StringIO("\n"), ["-"], "listed no image"),
                              (io.StringIO(str(image)), ["-", "-"], "is given twice")):
        monkeypatch.setattr("sys.stdin", stdin)
        assert run_cli(inference.main, ["--checkpoint", str(checkpoint), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


def test_inference_samples_with_the_seed_given(tiny, checkpoint, capsys):
    """--strategy sample --seed S: the caption the captioner samples for the image after torch.manual_seed(S),
    whatever the random state before (the README's promise that the page's seeded caption is this one)."""
    from dataset import open_image
    from model import DecodingConfig

    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    decoding = DecodingConfig(strategy="sample", temperature=2.0, top_p=1.0, max_new_tokens=12)
    captioner = load_captioner(checkpoint, device="cpu")
    expected = {}
    for seed in (3, 4):
        torch.manual_seed(seed)
        expected[seed] = captioner.caption_images([open_image(image)], decoding)[0]
    assert expected[3] != expected[4]  # else the seed could not be told apart here
    for seed in (3, 4):
        torch.manual_seed(1000 + seed)  # a random state of its own: the seed must be set
        assert inference.main(["--checkpoint", str(checkpoint), "--strategy", "sample", "--temperature", "2",
                               "--top-p", "1", "--max-new-tokens", "12", "--seed", str(seed), str(image)]) == 0
        assert capsys.readouterr().out == f"{image}\t{expected[seed]}\n"


def caption_in_two_processes(argv: list[str], stdin: str = "", process_1_argv: list[str] | None = None
                             ) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 inference.py ARGV`, one thread each; with
    `process_1_argv`, process 1 is given those arguments instead (as a machine with other files or flags)."""
    script = [str(ROOT / "inference.py")]
    if process_1_argv is not None:  # a Python that swaps process 1's arguments, then runs inference.py as a script
        swap = (f"import os, runpy, sys\nif os.environ['RANK'] == '1': sys.argv[1:] = {process_1_argv!r}\n"
                f"runpy.run_path({script[0]!r}, run_name='__main__')")
        script = ["--no-python", sys.executable, "-c", swap]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script, *argv]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_inference_in_two_processes_captions_each_image_once_and_prints_what_one_process_prints(
        tiny, checkpoint, tmp_path, monkeypatch, capsys):
    """torchrun --nproc_per_node 2 inference.py: every process captioned every image and printed every caption. Now
    each captions its share of whole batches and process 0 prints them all, byte for byte what one process prints:
    --json with an unreadable image in process 1's share (its error line said once), and paths piped to "-" (read
    by process 0 alone) with sampled captions (each batch seeded by its index, whichever process samples it)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png")):
        shutil.copy(source, folder / source.name)
    (folder / "test_0004b.png").write_bytes(b"not an image")  # 5th of 7: batch 2 of 4, process 1's first
    (folder / "notes.txt").write_text("left out, in one note")
    flags = ["--checkpoint", str(checkpoint), "--batch-size", "2", "--no-progress"]
    two = caption_in_two_processes([*flags, "--json", str(folder)])
    assert two.returncode == 1, two.stderr[-3000:]
    assert inference.main([*flags, "--json", str(folder)]) == 1
    one = capsys.readouterr()
    assert two.stdout == one.out and len(one.out.splitlines()) == 7
    said = said_by_the_processes(two.stderr)
    assert said.count("error: cannot read image") == 1 and said.count("left out 1 file") == 1, said

    listed = "".join(f"{path}\n" for path in sorted(folder.glob("test_000?.png")))
    sampled = [*flags, "--strategy", "sample", "--temperature", "2", "--top-p", "1", "--seed", "3", "-"]
    two = caption_in_two_processes(sampled, stdin=listed)
    assert two.returncode == 0, two.stderr[-3000:]
    monkeypatch.setattr("sys.stdin", io.StringIO(listed))
    assert inference.main(sampled) == 0
    one = capsys.readouterr().out
    assert two.stdout == one and len(set(one.splitlines())) == 6
    assert len({line.split("\t")[1] for line in one.splitlines()}) > 1  # else the seeds could not be told apart


@pytest.mark.slow
def test_inference_with_a_bad_checkpoint_stops_two_processes_in_one_line(copy):
    """Every process reads the run folder: each printed the same error line."""
    (copy / "adapter_config.json").write_text("{")
    two = caption_in_two_processes(["--checkpoint", str(copy), str(copy)])
    said = said_by_the_processes(two.stderr)
    assert two.returncode != 0 and said.count("error: ") == 1 and "is not valid JSON" in said, said


@pytest.mark.slow
def test_inference_in_two_processes_stops_in_one_line_where_they_loaded_another_adapter_or_flags(tiny, checkpoint,
                                                                                                 copy):
    """Each machine reads its own copy of the run folder and the backbones: a process with another adapter (or
    another --max-new-tokens) captioned its share with it without a word. Now all stop before any caption."""
    captioner = load_captioner(copy, device="cpu")
    with torch.no_grad():
        next(captioner.adapter.parameters()).add_(1.0)
    model.save_adapter(copy, captioner.adapter, captioner.config)
    images = [str(path) for path in sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[:4]]
    flags = ["--batch-size", "2", "--no-progress", *images]
    for process_1_flags, differ in ((["--checkpoint", str(copy)], "the adapter's weights (a digest)"),
                                    (["--checkpoint", str(checkpoint), "--max-new-tokens", "5"],
                                     "--max-new-tokens: process 0 on ")):
        two = caption_in_two_processes(["--checkpoint", str(checkpoint), *flags],
                                       process_1_argv=[*process_1_flags, *flags])
        said = said_by_the_processes(two.stderr)
        assert two.returncode != 0 and two.stdout == "", (two.stdout, said)
        errors = [line for line in said.splitlines() if line.startswith("error: ")]
        assert errors == [line for line in errors if f"do not agree on {differ}" in line] and len(errors) == 1, said
        assert errors[0].endswith("and the same flags"), said


@pytest.mark.slow
def test_inference_with_the_run_folder_missing_on_one_machine_names_its_process(tiny, checkpoint, tmp_path):
    """As eval.py: the process (and its host) without the run folder is named, and every process stops."""
    gone, image = tmp_path / "not-copied", str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    two = caption_in_two_processes(["--checkpoint", str(checkpoint), image],
                                   process_1_argv=["--checkpoint", str(gone), image])
    said = said_by_the_processes(two.stderr)
    errors = [line for line in said.splitlines() if line.startswith("error: ")]
    assert two.returncode != 0 and two.stdout == "" and len(errors) == 1, said
    assert errors[0].startswith("error: process 1 (on ") and str(gone) in errors[0], said
    assert errors[0].endswith("every machine needs the run folder and the backbones at the same paths, the same "
                              "files (a shared disk, or copies made whole), and the same flags"), said


@pytest.mark.slow
def test_inference_in_two_processes_says_what_it_loads_where_process_0_captions_nothing(tiny, checkpoint, capsys):
    """One image is one batch, process 1's: process 0 loaded no model, so the note on the backbones the run folder
    names (and --compile's on CPU), said by the first process of each machine as it loads, was said by none."""
    image = str(sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0])
    flags = ["--checkpoint", str(checkpoint), "--compile", "--no-progress", image]
    assert inference.main(flags) == 0
    one = capsys.readouterr()
    two = caption_in_two_processes(flags)
    assert two.returncode == 0, two.stderr[-3000:]
    said = [line for line in said_by_the_processes(two.stderr).splitlines() if line.startswith("note: ")]
    assert two.stdout == one.out and said == one.err.splitlines() and len(said) == 2, (said, one.err)

def test_inference_says_compile_needs_a_cuda_device_and_captions_eagerly(tiny, checkpoint, capsys):
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    assert inference.main(["--checkpoint", str(checkpoint), str(image)]) == 0
    eager = capsys.readouterr().out
    assert inference.main(["--checkpoint", str(checkpoint), "--compile", "--device", "cpu", str(image)]) == 0
    out, err = capsys.readouterr()
    assert out == eager and without_loading_note(err) == "note: --compile needs a CUDA device; decoding eagerly\n"


def test_inference_counts_the_images_on_a_terminal_only_and_never_on_stdout(tiny, checkpoint, monkeypatch, capsys):
    images = [str(path) for path in sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[:3]]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("COLUMNS", "100")
    assert inference.main(["--checkpoint", str(checkpoint), "--json", "--batch-size", "2", *images]) == 0
    assert "3/3" in terminal.getvalue() and "image" in terminal.getvalue()
    assert [json.loads(line)["image"] for line in capsys.readouterr().out.splitlines()] == images
    first_run = len(terminal.getvalue())  # (its bar may be drawn at 3/3 more than once: a refresh, then the close)
    assert inference.main(["--checkpoint", str(checkpoint), "--no-progress", *images]) == 0
    assert "3/3" not in terminal.getvalue()[first_run:]  # --no-progress: no second bar


def test_inference_output_keeps_one_line_per_image_whatever_the_file_names(tiny, checkpoint, tmp_path, capsys,
                                                                          monkeypatch):
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    # Unicode's line and paragraph separators (U+2028, U+2029) split a line for str.splitlines() and editors.
    names = ["plain.png", "tab\there.png", "new\nline.png", '"quoted".png', "caf\u00e9.png", "line\u2028sep.png",
             "para\u2029sep.png"]
    for name in names:
        shutil.copy(image, tmp_path / name)
    monkeypatch.chdir(tmp_path)  # paths as given: relative, so one can start with a quote
    assert inference.main(["--checkpoint", str(checkpoint), *names]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names)
    fields = [line.split("\t") for line in lines]
    assert all(len(parts) == 2 and parts[1] for parts in fields)  # path, then the caption
    printed = [json.loads(path) if path.startswith('"') else path for path, _ in fields]
    assert printed == names
    quoted = [path.startswith('"') for path, _ in fields]
    assert quoted == [False, True, True, True, False, True, True]  # plain names stay plain


def test_inference_captions_a_file_named_twice_each_time_under_the_name_given(tiny, checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    """The rule for one file named more than once (the same path twice, a link and its target, ./a.png and
    a.png, a folder and a file in it): each is captioned where it stands, under the name as given, so the
    output has one line per image named, in order (as `paste` pairs it with the list), errors included."""
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    (tmp_path / "photos").mkdir()
    shutil.copy(image, tmp_path / "photos" / "a.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "photos" / "a.png")
    monkeypatch.chdir(tmp_path)
    named = ["photos/a.png", "./photos/a.png", "link.png", "gone.png", "photos/a.png", "photos", "gone.png"]
    expected = ["photos/a.png", "./photos/a.png", "link.png", "gone.png", "photos/a.png", "photos/a.png", "gone.png"]
    argv = ["--checkpoint", str(checkpoint), "--batch-size", "2", *named]
    assert inference.main(argv) == 1
    out, err = capsys.readouterr()
    fields = [line.split("\t") for line in out.splitlines()]
    assert [path for path, _ in fields] == [path for path in expected if path != "gone.png"]
    assert len({caption for _, caption in fields}) == 1  # one picture, one greedy caption, whatever its batch
    assert without_loading_note(err).splitlines() == ["error: image not found: gone.png"] * 2
    assert inference.main(["--json", *argv]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == expected
    assert ["error" in line for line in lines] == [path == "gone.png" for path in expected]


def test_inference_prints_a_file_name_that_is_not_utf8_on_a_strict_utf8_terminal(tiny, checkpoint, tmp_path,
                                                                                 monkeypatch):
    # Python holds the name's stray byte as a lone surrogate; a UTF-8 locale's stdout (not C.UTF-8's) refuses
    # one, and inference.py ended in a UnicodeEncodeError traceback at the first such image.
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old archive names them
    shutil.copy(image, tmp_path / name)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert inference.main(["--checkpoint", str(checkpoint), str(tmp_path / name)]) == 0
    printed, caption = stdout.buffer.getvalue().decode("utf-8").rstrip("\n").split("\t")
    assert os.fsencode(json.loads(printed)) == os.fsencode(tmp_path / name) and caption


def test_inference_on_a_folder_follows_links_once_and_reports_what_it_cannot_read(tiny, checkpoint, tmp_path,
                                                                                  monkeypatch, capsys):
    image = sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0]
    library, elsewhere = tmp_path / "library", tmp_path / "elsewhere"
    for folder in (library / "locked", elsewhere):
        folder.mkdir(parents=True)
    shutil.copy(image, elsewhere / "far.png")
    shutil.copy(image, library / "locked" / "inside.png")
    (library / "2023").symlink_to(elsewhere)  # a photo library on another disk
    (elsewhere / "back").symlink_to(library)  # a loop: followed once, not forever
    (library / "gone.png").symlink_to(tmp_path / "deleted.png")
    scandir = os.scandir

    def locked_scandir(path="."):  # tests run as root, which permission bits do not stop
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked_scandir)
    assert inference.main(["--checkpoint", str(checkpoint), str(library)]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(library / "2023" / "far.png")]
    assert without_loading_note(err).splitlines() == [f"error: image not found: {library / 'gone.png'}",
                                f"error: cannot read folder {library / 'locked'}: Permission denied"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_inference_says_why_it_cannot_look_at_a_path_and_captions_the_rest(tiny, checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    """A file in a folder this user may not enter, or a name too long for the file system, made Path.is_dir()
    raise: a traceback before any caption. A pipe (/dev/stdin, <(...)) was "image not found"."""
    image = str(sorted((Path(tiny["data_dir"]) / "images").glob("test_*.png"))[0])
    locked, too_long, pipe = tmp_path / "locked" / "a.png", tmp_path / ("a" * 300 + ".png"), tmp_path / "pipe.png"
    locked.parent.mkdir()
    shutil.copy(image, locked)
    os.mkfifo(pipe)
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # what a folder without search permission does (tests run as root)
        if isinstance(path, (str, os.PathLike)) and Path(path).parent == locked.parent:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    argv = ["--checkpoint", str(checkpoint), str(locked), str(too_long), str(pipe), image]
    assert run_cli(inference.main, argv) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [image]
    assert without_loading_note(err).splitlines() == [
        f"error: cannot read image {locked}: permission denied on a folder in its path",
        f"error: cannot read image {too_long}: file name too long",
        f"error: {pipe} is not a regular file (a pipe or device): save the image to a file and name that file"]


def test_eval_with_a_bad_image_is_one_line(tiny, checkpoint, tmp_path, capsys):
    data = Path(shutil.copytree(tiny["data_dir"], tmp_path / "data"))
    test_image = next(r.path for r in load_records("folder", "test", str(data)))
    test_image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    run = Path(shutil.copytree(checkpoint, tmp_path / "run"))
    for workers in ("0", "2"):
        args = [str(run), "--dataset", "folder", "--data-dir", str(data), "--no-progress", "--num-workers", workers]
        assert run_cli(eval_script.main, args) == 2
        err = without_loading_note(capsys.readouterr().err).strip()
        assert "\n" not in err and err.startswith("error: ") and str(test_image) in err, err


def hub_cache_holding(cache: Path, repo_id: str, folder: str) -> None:
    """`folder` laid out as huggingface_hub caches a download of `repo_id` (refs/main -> a snapshot)."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_without_the_hub_a_cached_hub_id_loads_at_once_and_an_uncached_one_fails_at_once(tiny, tmp_path):
    """Offline, huggingface_hub retried every file for about 30 s, a 'Retrying' line each time,
    before it looked in its cache. A fresh process, as the Hub's cache folder is read at import."""
    import os
    import subprocess

    cache = tmp_path / "hub"
    hub_cache_holding(cache, "someone/tiny-clip", tiny["clip_model"])
    hub_cache_holding(cache, "someone/tiny-lm", tiny["lm_model"])
    script = """
import time, model
from utils import UserError
model.hub_reachable = lambda: False  # as on a machine without network, whatever this one has
clip, processor, lm, tokenizer = model.load_backbones("someone/tiny-clip", "someone/tiny-lm")
print("loaded", type(lm).__name__)
start = time.perf_counter()
try:
    model.load_backbones("someone/not-cached", "someone/tiny-lm")
except UserError as error:
    print("error:", error)
print(f"failed in {time.perf_counter() - start:.1f} s")
print("weights", model.stored_weights_digest("someone/tiny-lm", None))  # found in the Hub cache's snapshot
config = model.AdapterConfig(clip_model="someone/tiny-clip", lm_model="someone/tiny-lm")
captioner = model.build_captioner(config)
print("revisions", config.clip_revision, config.lm_revision)  # the commit loaded, recorded in the run
model.save_adapter(RUN, captioner.adapter, config)
print("reloaded", model.load_captioner(RUN).config.lm_revision)  # that commit, from the cache, offline
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    script = script.replace("RUN", repr(str(tmp_path / "run")))
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "loaded Qwen3ForCausalLM", done.stdout
    assert lines[1] == ("error: could not load CLIP model 'someone/not-cached': the Hub cannot be reached from this "
                        "machine, and the Hub cache here does not hold it; give a local folder, or load it once where "
                        "the Hub is reachable"), done.stdout
    assert float(lines[2].split()[2]) < 5, done.stdout  # no back-off: it was about 23 s of it
    assert lines[3] == f"weights {model.stored_weights_digest(tiny['lm_model'], None)}", done.stdout
    assert lines[4] == f"revisions {'0' * 40} {'0' * 40}" and lines[5] == f"reloaded {'0' * 40}", done.stdout
    assert "Retrying" not in done.stderr, done.stderr


def test_hub_reachable_asks_the_endpoint_and_respects_offline_mode(monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as server:  # a port that answers, then one that refuses
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        model.hub_reachable.cache_clear()
        assert model.hub_reachable()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: never ask
        model.hub_reachable.cache_clear()
        assert not model.hub_reachable()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    model.hub_reachable.cache_clear()
    assert not model.hub_reachable()  # the port is closed now
    model.hub_reachable.cache_clear()


def test_hub_reachable_probes_the_endpoints_port_and_trusts_a_proxy(monkeypatch):
    import socket

    from huggingface_hub import constants

    asked = []

    class Closed:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: asked.append(address) or Closed())
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy", "NO_PROXY",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for endpoint, address in (("https://hub.example", ("hub.example", 443)), ("http://mirror.example",
                              ("mirror.example", 80)), ("http://mirror.example:8080", ("mirror.example", 8080))):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        model.hub_reachable.cache_clear()
        assert model.hub_reachable() and asked[-1] == address
    # Behind a proxy a direct connection says nothing: huggingface_hub's client goes through it.
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    model.hub_reachable.cache_clear()
    asked.clear()
    assert model.hub_reachable() and asked == []
    monkeypatch.setenv("no_proxy", "hub.example")  # ... unless the Hub is exempt from it
    model.hub_reachable.cache_clear()
    assert model.hub_reachable() and asked == [("hub.example", 443)]
    model.hub_reachable.cache_clear()


def test_a_resume_state_in_the_first_versions_pickled_format_is_named_as_such(tmp_path):
    """The first versions saved the resume state with accelerator.save_state (pickled optimizer.bin,
    random_states_0.pkl). This version reads none of it (it never unpickles), and --resume said the
    state was damaged, to resume from a copy, which would be just as old."""
    from types import SimpleNamespace

    resume = tmp_path / "run" / "resume"
    resume.mkdir(parents=True)
    write_json(resume / "trainer_state.json", {"step": 4, "epoch": 1, "best_rougeL": 0.5, "finished": True})
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (resume / name).write_bytes(b"as accelerate wrote it")
    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    with pytest.raises(UserError, match=r"resume is in the resume format of an older version of this project .* "
                                        r"start a new run \(another --run-name\) to train further"):
        train.load_resume_state(tmp_path / "run", accelerator, None, None, None)


def test_eval_outputs_on_a_full_disk_are_one_line_naming_the_file(tmp_path, monkeypatch):
    """ENOSPC while the outputs are written, after the whole split was captioned: one line naming the
    file and the cause (run_cli prints it), not the traceback of json's write."""
    import errno
    from types import SimpleNamespace

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr(eval_script, "write_jsonl", disk_full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^cannot write .*predictions\.jsonl\.tmp \(No space left on device\): "
                                        r"the evaluation's outputs in .*out are incomplete"):
        eval_script.write_eval_outputs(out, SimpleNamespace(rows=[], metrics={}), [])


def test_a_reader_that_stops_reading_the_captions_is_not_called_a_full_disk():
    """`inference.py ... | head -1`: BrokenPipeError is an OSError, which would be told as a write that failed
    ("free some space"); it goes on to run_cli, which ends the script quietly."""
    with pytest.raises(BrokenPipeError):
        with inference.captions_to_stdout():
            raise BrokenPipeError(32, "Broken pipe")


def test_captions_to_a_full_disk_are_one_line(tiny, checkpoint, monkeypatch, capsys):
    """`inference.py ... > captions.txt` on a full disk: one line saying so, not print's traceback."""
    import errno
    import io

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    image = next(r.path for r in load_records("folder", "test", tiny["data_dir"]))
    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert run_cli(inference.main, ["--checkpoint", str(checkpoint), str(image)]) == 2
    assert without_loading_note(capsys.readouterr().err).strip() == (
        "error: cannot write the captions to standard output (No space left on device); free some space where it is "
        "redirected and run again")


def test_inference_names_the_backbones_the_run_folder_makes_it_load(tiny, checkpoint, capsys):
    """A run folder from someone else can name a Hub id (gigabytes downloaded) or a folder elsewhere on this disk:
    which ones it names is said once, before they load, unless the flags name them; stdout stays the captions."""
    image = str(Path(tiny["data_dir"]) / "images" / "test_0000.png")
    named_by = checkpoint / "adapter_config.json"
    assert inference.main(["--checkpoint", str(checkpoint), "--batch-size", "1", image, image]) == 0
    out, err = capsys.readouterr()
    assert err == f"note: loading CLIP {tiny['clip_model']} and LM {tiny['lm_model']}, as {named_by} names them\n"
    assert inference.main(["--checkpoint", str(checkpoint), "--batch-size", "1", "--clip-model", tiny["clip_model"],
                           image, image]) == 0
    assert capsys.readouterr() == (out, f"note: loading LM {tiny['lm_model']}, as {named_by} names them\n")
    assert inference.main(["--checkpoint", str(checkpoint), "--batch-size", "1", "--clip-model", tiny["clip_model"],
                           "--lm-model", tiny["lm_model"], image, image]) == 0
    assert capsys.readouterr() == (out, "")


def test_eval_names_the_data_the_run_folder_makes_it_read(tiny, checkpoint, monkeypatch):
    from dataset import FLICKR30K_PARQUET

    run = {"dataset": "folder", "data_dir": tiny["data_dir"]}
    assert eval_script.data_the_run_names(run, None, None) == tiny["data_dir"]
    assert eval_script.data_the_run_names(run, tiny["data_dir"] + "/.", None) is None  # --data-dir names it
    assert eval_script.data_the_run_names({"dataset": "flickr30k"}, None, None) == FLICKR30K_PARQUET
    assert eval_script.data_the_run_names({"dataset": "flickr30k"}, None, FLICKR30K_PARQUET) is None
    assert eval_script.data_the_run_names({}, None, None) is None  # an adapter folder alone: the flags name it
    said = eval_script.loaded_as_the_run_names_note(checkpoint, None, tiny["lm_model"], tiny["data_dir"])
    assert said == (f"note: loading CLIP {tiny['clip_model']}, as {checkpoint / 'adapter_config.json'} names them; "
                    f"data {tiny['data_dir']}, as {checkpoint / 'run_config.json'} names it")
    # The demo's own assets, built here from seeds, go unnamed: every demo command would print them.
    import demo

    monkeypatch.setattr(demo, "demo_root", lambda: Path(tiny["data_dir"]).parent)
    assert eval_script.loaded_as_the_run_names_note(checkpoint, data=tiny["data_dir"]) == ""


def test_a_tokenizer_with_added_tokens_loads_the_adapter_it_trained(tiny, tmp_path):
    """Qwen3's tokenizer holds 151,643 tokens of its model and 26 added ones (<|im_start|>, ...): a checkpoint keeps
    the whole count, len(tokenizer). Kept as tokenizer.vocab_size (the model's alone), every Qwen3 checkpoint would
    refuse to load against the very tokenizer it trained with. The tiny tokenizer has no added token but EOS."""
    from transformers import AutoTokenizer

    lm = tmp_path / "lm"
    shutil.copytree(tiny["lm_model"], lm)
    tokenizer = AutoTokenizer.from_pretrained(lm)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(lm)
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=str(lm)))
    assert captioner.config.vocab_size == len(tokenizer) > tokenizer.vocab_size
    model.save_adapter(tmp_path / "run", captioner.adapter, captioner.config)
    loaded = load_captioner(tmp_path / "run")  # refused, were the count the model's alone
    assert torch.equal(loaded.adapter.state_dict()["net.0.weight"], captioner.adapter.state_dict()["net.0.weight"])


def test_a_reader_of_last_during_a_save_reads_it_again_when_the_save_is_done(tiny, tmp_path, monkeypatch):
    """train.swap_in replaces last/ whole: last/ renamed to last.old/, last.tmp/ to last/, last.old/ deleted. Read
    in between (inference.py, eval.py or app.py on RUN/last while the run trains), its weights were gone: a
    safetensors traceback or a wrong "not found" line (12 of 3,535 reads while saves ran 25 ms apart)."""
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    run = tmp_path / "run"
    model.save_adapter(run / "last", captioner.adapter, captioner.config)
    shutil.copytree(run / "last", run / "last.tmp")
    real, read = model.load_adapter_state, []

    def saved_meanwhile(path, *args):
        read.append(path)
        if len(read) > 1:
            return real(path, *args)
        (run / "last").rename(run / "last.old")  # the save's first rename, after the reader took the config
        try:
            return real(path, *args)
        finally:
            (run / "last.tmp").rename(run / "last")
            shutil.rmtree(run / "last.old")

    monkeypatch.setattr(model, "load_adapter_state", saved_meanwhile)
    loaded = load_captioner(run / "last")
    assert read == [run / "last" / "adapter.safetensors"] * 2
    assert all(torch.equal(loaded.adapter.state_dict()[name], tensor)
               for name, tensor in captioner.adapter.state_dict().items())


def test_a_reader_of_last_after_a_crash_between_a_saves_renames_is_told_it_reads_last_old(tiny, tmp_path, capsys):
    """read_checkpoint reads quietly (it may try again): the note naming last.old/ is still said, once."""
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    run = tmp_path / "run"
    model.save_adapter(run / "last.old", captioner.adapter, captioner.config)
    capsys.readouterr()
    assert model.read_checkpoint(run / "last")[0] == run / "last.old"
    assert capsys.readouterr().err.count(f"note: {run / 'last'} is missing (a save stopped between") == 1


def test_the_hub_commit_of_a_backbone_and_no_digest_without_weights_files(tmp_path, monkeypatch):
    """backbone_revision: the Hub cache's snapshot folder `main` points to names the commit loaded.
    stored_weights_digest: no safetensors files (a .bin only), no digest to compare against later."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--clip"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "snapshots" / commit / "pytorch_model.bin").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert model.backbone_revision("someone/clip") == commit
    assert model.stored_weights_digest("someone/clip", None) is None


def test_weights_files_of_the_same_size_and_data_but_other_headers_have_other_digests(tmp_path):
    """The header says what the bytes are (names, shapes, dtypes): the same bytes read as other tensors differ."""
    from safetensors.torch import save_file

    for name, shape in (("a", (2, 8)), ("b", (8, 2))):
        (tmp_path / name).mkdir()
        save_file({"weight": torch.zeros(shape)}, str(tmp_path / name / "model.safetensors"))
    sizes = {(tmp_path / name / "model.safetensors").stat().st_size for name in "ab"}
    assert len(sizes) == 1
    assert model.stored_weights_digest(str(tmp_path / "a"), None) != model.stored_weights_digest(str(tmp_path / "b"),
                                                                                                 None)
