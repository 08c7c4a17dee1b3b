"""Backbones other than the defaults (ClipCap issues #53, #56): tiny random-init checkpoints of the families users
pick, built once for the module with the tiny fixture's tokenizer, train with the caption's EOS last and no BOS
inside, or are refused in one line naming the checkpoint and what to do."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from conftest import train_args
from dataset import collate_captions, tokenize_caption
from model import IGNORE_INDEX, AdapterConfig, build_captioner
from utils import UserError, run_cli

LM = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
          max_position_embeddings=64)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16)


def tokenizer_of(tiny, specials=(), bos=None, **tokens):
    """The tiny LM's byte-level BPE with `specials` added; with `bos`, one that puts it before every text (as
    Llama's, OPT's and Gemma's tokenizers do)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_file(str(Path(tiny["lm_model"]) / "tokenizer.json"))
    core.add_special_tokens(list(specials))
    if bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
            (bos, core.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, **tokens)


def save(folder: Path, model, tokenizer=None, processor=None) -> str:
    model.save_pretrained(folder)
    for part in (tokenizer, processor):
        if part is not None:
            part.save_pretrained(folder)
    return str(folder)


def build_families(tiny, root: Path) -> dict[str, str]:
    import transformers as hf

    from model import clip_image_processor

    torch.manual_seed(0)
    gpt2_tok = tokenizer_of(tiny, eos_token="<|endoftext|>")  # no pad: GPT-2 has none
    llama_tok = tokenizer_of(tiny, ["<unk>", "<s>", "</s>"], bos="<s>", eos_token="</s>", unk_token="<unk>")
    opt_tok = tokenizer_of(tiny, ["<pad>", "</s>"], bos="</s>", eos_token="</s>", pad_token="<pad>")
    vocab = len(llama_tok) + 2
    processor = clip_image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vision = hf.CLIPVisionConfig(**VISION, projection_dim=16)
    return {
        "gpt2": save(root / "gpt2", hf.GPT2LMHeadModel(hf.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)),
            gpt2_tok),
        "llama": save(root / "llama", hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=vocab, hidden_size=32, tie_word_embeddings=False, **LM)), llama_tok),
        # opt-350m's shape: embeddings narrower than the layers, projected in and out
        "opt": save(root / "opt", hf.OPTForCausalLM(hf.OPTConfig(
            vocab_size=vocab, hidden_size=48, word_embed_proj_dim=32, num_hidden_layers=1, num_attention_heads=2,
            ffn_dim=64, max_position_embeddings=64, do_layer_norm_before=False)), opt_tok),
        "t5": save(root / "t5", hf.T5ForConditionalGeneration(hf.T5Config(
            vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)), gpt2_tok),
        # a base model saved without its LM head, and an LM beside no tokenizer files, or another model's
        "llama_base": save(root / "llama_base", hf.LlamaModel(hf.LlamaConfig(
            vocab_size=vocab, hidden_size=32, tie_word_embeddings=False, **LM)), llama_tok),
        "no_tokenizer": save(root / "no_tokenizer", hf.Qwen2ForCausalLM(hf.Qwen2Config(
            vocab_size=vocab, hidden_size=32, **LM))),
        "small_vocab": save(root / "small_vocab", hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=len(llama_tok) - 2, hidden_size=32, **LM)), llama_tok),
        "no_eos": save(root / "no_eos", hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=vocab, hidden_size=32, bos_token_id=None, eos_token_id=None, pad_token_id=None, **LM)),
            tokenizer_of(tiny)),
        "siglip": save(root / "siglip", hf.SiglipModel(hf.SiglipConfig(
            text_config=TEXT, vision_config=dict(VISION))), processor=processor),
        "clip_no_projection": save(root / "clip_no_projection", hf.CLIPVisionModel(vision), processor=processor),
        "clip_no_processor": save(root / "clip_no_processor", hf.CLIPVisionModelWithProjection(vision)),
    }


@pytest.fixture(scope="module")
def families(tiny, tmp_path_factory) -> dict[str, str]:
    return build_families(tiny, tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_an_lm_of_another_family_trains_on_the_caption_and_its_eos_never_a_bos(tiny, families, family):
    """GPT-2 (EOS = BOS, no pad), Llama (its tokenizer adds <s>), OPT (adds </s> as BOS, projects its embeddings):
    the caption's tokens as the tokenizer makes them less its BOS, then the LM's EOS; padding never learned."""
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=families[family],
                                              prefix_length=2))
    tok, eos, pad = captioner.tokenizer, captioner.config.eos_token_id, captioner.config.pad_token_id
    caption = "a red circle on white"
    plain = tok(caption)["input_ids"]
    words = plain[1:] if tok.bos_token_id is not None and plain[0] == tok.bos_token_id else plain
    if family in ("llama", "opt"):
        assert plain[0] == tok.bos_token_id != words[0]  # the tokenizer does add one: the case is covered
    ids = tokenize_caption(tok, caption, eos, 40)
    assert ids == words + [tok.eos_token_id]
    batch = collate_captions([{"image_features": torch.randn(captioner.config.image_feature_dim), "token_ids": ids},
                              {"image_features": torch.randn(captioner.config.image_feature_dim),
                               "token_ids": ids[:2]}], pad_token_id=pad)
    assert batch["labels"][1].tolist() == ids[:2] + [IGNORE_INDEX] * (len(ids) - 2)
    loss = captioner(**batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in captioner.adapter.parameters())
    assert isinstance(captioner.generate(batch["image_features"][:1])[0], str)


@pytest.mark.parametrize("clip, lm, said", [
    (None, "t5", "language model '{lm}' is a t5 model, an encoder-decoder: the captioner feeds its prefix to a "
                 "decoder-only (causal) LM; give one, such as GPT-2, OPT, Llama, Qwen or Gemma"),
    ("siglip", None, "CLIP model '{clip}' is a siglip model, not CLIP: give a CLIP checkpoint (a whole CLIPModel "
                     "such as openai/clip-vit-base-patch32, or a CLIPVisionModelWithProjection)"),
    ("clip_no_projection", None, "CLIP model '{clip}' lacks weights that CLIPVisionModelWithProjection needs "
                                 "(visual_projection.weight), which would start at random: it was saved without "
                                 "them (a CLIPVisionModel saves no visual_projection)"),
    (None, "llama_base", "language model '{lm}' lacks weights that LlamaForCausalLM needs (lm_head.weight), which "
                         "would start at random: it was saved without them (a base model saves no LM head); give "
                         "the whole checkpoint"),
    ("clip_no_processor", None, "CLIP folder {clip} has no preprocessor_config.json (how images are resized, "
                                "cropped and normalised); copy it from the CLIP checkpoint"),
    (None, "no_tokenizer", "the tokenizer loaded for language model '{lm}' turns text into no tokens (it holds 1): "
                           "that checkpoint has no tokenizer files of its own"),
    (None, "small_vocab", "the tokenizer of language model '{lm}' has token ids up to "),
    (None, "no_eos", "the tokenizer of language model '{lm}' names no EOS token, nor does its config.json "
                     "(eos_token_id): captions could never end; set eos_token in its tokenizer_config.json"),
], ids=["encoder-decoder", "siglip", "clip-without-projection", "lm-without-head", "no-preprocessor-config",
        "no-tokenizer-files", "tokenizer-past-the-embeddings", "no-eos"])
def test_a_backbone_the_captioner_cannot_use_is_refused_in_one_line_naming_it(tiny, families, clip, lm, said):
    """Each used to fail in transformers' words with advice to give a Hub id this machine can reach (an
    encoder-decoder, SigLIP, a folder without preprocessor_config.json), deep in an embedding lookup (a tokenizer
    of more tokens than the LM embeds), or not at all: weights missing from the checkpoint started at random, and a
    folder without tokenizer files got a one-token tokenizer that made every caption EOS alone."""
    clip, lm = families.get(clip, tiny["clip_model"]), families.get(lm, tiny["lm_model"])
    with pytest.raises(UserError) as raised:
        build_captioner(AdapterConfig(clip_model=clip, lm_model=lm))
    assert str(raised.value).startswith(said.format(clip=clip, lm=lm)), raised.value
    assert "\n" not in str(raised.value)


def test_train_py_refuses_an_encoder_decoder_lm_in_one_line(tiny, families, tmp_path, capsys):
    assert run_cli(train.main, train_args(tiny, tmp_path, "t5", "--lm-model", families["t5"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: language model '{families['t5']}' is a t5 model, an encoder-decoder"), err
    assert "\n" not in err and "Traceback" not in err, err


def test_an_lm_copy_missing_layer_weights_is_not_said_to_lack_only_its_head(tiny, tmp_path):
    """Every missing-weights refusal of an LM said "a base model saves no LM head", a copy cut short too, whose
    missing weights were its layers'."""
    import shutil

    from safetensors.torch import load_file, save_file

    lm = tmp_path / "lm"
    shutil.copytree(tiny["lm_model"], lm)
    weights = load_file(lm / "model.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if ".layers.0." not in name},
              lm / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"needs \(model\.layers\.0\..*which would start at random: its weights files "
                                        r"hold only part of the model") as raised:
        build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=str(lm)))
    assert "LM head" not in str(raised.value)


@pytest.mark.parametrize("backbone", ["clip_model", "lm_model"])
@pytest.mark.parametrize("content", ["null", "[]", '"x"'])
def test_a_config_json_that_holds_no_object_is_refused_in_one_line(tiny, tmp_path, backbone, content):
    """A config.json of null, a list or a string (overwritten, or saved by hand) ended in a traceback: TypeError in
    transformers, AttributeError in the check of what kind of model it is."""
    import shutil

    folder = tmp_path / backbone
    shutil.copytree(tiny[backbone], folder)
    (folder / "config.json").write_text(content + "\n")
    what = "CLIP model" if backbone == "clip_model" else "language model"
    with pytest.raises(UserError, match=f"^{what} '{folder}': its config.json holds no JSON object of settings; "):
        build_captioner(AdapterConfig(**{**{name: tiny[name] for name in ("clip_model", "lm_model")},
                                         backbone: str(folder)}))


def test_a_tokenizer_whose_largest_id_is_one_past_the_embeddings_is_refused(tiny):
    """The boundary: ids 0..rows-1 fit an LM that embeds `rows` tokens; one id more failed deep in the lookup."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from model import check_tokenizer_fits

    tokenizer = AutoTokenizer.from_pretrained(tiny["lm_model"])

    def lm_embedding(rows):
        return SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(weight=torch.empty(rows, 1)))

    check_tokenizer_fits(tokenizer, lm_embedding(len(tokenizer)), "fits")
    with pytest.raises(UserError, match=f"token ids up to {len(tokenizer) - 1}, but the LM embeds only"):
        check_tokenizer_fits(tokenizer, lm_embedding(len(tokenizer) - 1), "one short")
