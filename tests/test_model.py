"""The model's contract: batches, loss positions, freezing, saving and reloading."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import collate_captions, tokenize_caption
from model import (IGNORE_INDEX, AdapterConfig, DecodingConfig, build_captioner, load_captioner, save_adapter,
                   special_token_ids)
from train import TrainConfig, make_optimizer
from utils import UserError


def make_captioner(tiny, **kwargs):
    config = AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"], **kwargs)
    return build_captioner(config)


def test_collated_batch_token_by_token(tiny):
    captioner = make_captioner(tiny)
    tok, eos, pad = captioner.tokenizer, captioner.config.eos_token_id, captioner.config.pad_token_id
    short, long = "a red circle on white", "a picture of a blue square on a gray background"
    short_ids, long_ids = (tok(c, add_special_tokens=False)["input_ids"] for c in (short, long))
    features = torch.randn(2, captioner.config.image_feature_dim)
    batch = collate_captions([
        {"image_features": features[0], "token_ids": tokenize_caption(tok, short, eos, 40)},
        {"image_features": features[1], "token_ids": tokenize_caption(tok, long, eos, 40)},
    ], pad_token_id=pad)

    length = len(long_ids) + 1
    assert batch["input_ids"].shape == batch["labels"].shape == (2, length)
    # Row 0: caption tokens, EOS, then padding that the loss ignores.
    assert batch["labels"][0].tolist() == short_ids + [eos] + [IGNORE_INDEX] * (length - len(short_ids) - 1)
    assert batch["input_ids"][0].tolist() == short_ids + [eos] + [pad] * (length - len(short_ids) - 1)
    # Row 1: the longest caption, EOS last, no padding.
    assert batch["labels"][1].tolist() == long_ids + [eos]
    assert (batch["labels"] != IGNORE_INDEX).sum() == len(short_ids) + len(long_ids) + 2
    assert torch.equal(batch["image_features"], features)

    # The loss sees the prefix at positions 0..k-1 and caption token t predicted at k-1+t:
    # compare with a plain full-sequence forward and an explicit shift.
    k = captioner.config.prefix_length
    loss = captioner(**batch)
    prefix = captioner.prefix_embeds(batch["image_features"])
    embeds = torch.cat([prefix, captioner.lm.get_input_embeddings()(batch["input_ids"])], dim=1)
    logits = captioner.lm(inputs_embeds=embeds).logits  # (B, k+T, V)
    expected = F.cross_entropy(logits[:, k - 1 : -1].reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_caption_truncation_keeps_eos(tiny):
    captioner = make_captioner(tiny)
    ids = tokenize_caption(captioner.tokenizer, "a red circle on a white background " * 10, 0, max_tokens=6)
    assert len(ids) == 6 and ids[-1] == 0


def test_an_lm_whose_tokenizer_names_no_pad_token_pads_with_its_eos():
    """GPT-2 names no pad token, and its id 0 is "!": padded with a real token, a caption that ended before the others
    of its batch would read "... a beach!!!!" (ended rows are filled with PAD; decoding drops only special tokens)."""
    tokenizer = SimpleNamespace(eos_token_id=50256, pad_token_id=None)
    lm = SimpleNamespace(config=SimpleNamespace(eos_token_id=50256), name_or_path="gpt2")
    assert special_token_ids(tokenizer, lm) == (50256, 50256)
    # Gemma's pad token has id 0, a real one: not "no pad token".
    assert special_token_ids(SimpleNamespace(eos_token_id=1, pad_token_id=0), lm) == (1, 0)
    # An LM config may list several EOS ids: the first, always (a checkpoint records it, and loading compares).
    listing = SimpleNamespace(config=SimpleNamespace(eos_token_id=[7, 8]), name_or_path="listing")
    assert special_token_ids(SimpleNamespace(eos_token_id=None, pad_token_id=None), listing) == (7, 7)


def test_only_the_adapter_trains(tiny):
    captioner = make_captioner(tiny)
    adapter_params = {id(p) for p in captioner.adapter.parameters()}
    for name, param in captioner.named_parameters():
        assert param.requires_grad == (id(param) in adapter_params), name
    captioner.train()
    assert captioner.adapter.training and not captioner.clip.training and not captioner.lm.training
    captioner.eval()  # validation's: the adapter too (a dropout added to it would otherwise stay on)
    assert not captioner.adapter.training and not captioner.training
    optimizer = make_optimizer(captioner, TrainConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == adapter_params


def test_image_features_are_l2_normalised_exactly_where_the_config_says(tiny):
    """The adapter sees features as it was trained on them: a run trained on normalised CLIP features (the default)
    given raw ones would caption from inputs of a scale it never saw."""
    captioner = make_captioner(tiny)
    embeddings = 7 * torch.randn(3, captioner.config.image_feature_dim)
    torch.testing.assert_close(captioner.finish_features(embeddings).norm(dim=-1), torch.ones(3))
    captioner.config.normalize_image_features = False
    assert torch.equal(captioner.finish_features(embeddings), embeddings)


def test_adapter_kinds_take_sizes_from_backbones(tiny):
    linear = make_captioner(tiny, adapter_kind="linear", prefix_length=10)
    mlp = make_captioner(tiny, adapter_kind="mlp", prefix_length=4)
    clip_dim = linear.clip.visual_projection.out_features
    lm_dim = linear.lm.get_input_embeddings().weight.shape[1]
    assert linear.config.prefix_length == 1
    assert [tuple(p.shape) for p in linear.adapter.parameters()] == [(lm_dim, clip_dim), (lm_dim,)]
    assert mlp.config.adapter_hidden_dim == 4 * lm_dim // 2
    assert mlp.adapter(torch.randn(3, clip_dim)).shape == (3, 4, lm_dim)


def test_transformer_adapter_attends_from_learned_prefix_tokens_and_learns_through_all_of_them(tiny, tmp_path,
                                                                                                 monkeypatch):
    import model

    captioner = make_captioner(tiny, adapter_kind="transformer", prefix_length=4, adapter_layers=2)
    clip_dim, lm_dim = captioner.config.image_feature_dim, captioner.config.lm_hidden_dim
    adapter = captioner.adapter
    features = torch.randn(3, clip_dim)
    prefix = adapter(features)
    assert prefix.shape == (3, 4, lm_dim)
    # Each image's prefix depends on its own feature only, through attention to its projected tokens.
    assert torch.allclose(adapter(features[1:2]), prefix[1:2], atol=1e-6)
    assert not torch.allclose(prefix[0], prefix[1])
    captioner.train()
    batch = collate_captions([{"image_features": f, "token_ids": tokenize_caption(
        captioner.tokenizer, "a red circle on white", captioner.config.eos_token_id, 40)} for f in features],
        pad_token_id=captioner.config.pad_token_id)
    captioner(batch["image_features"], batch["input_ids"], batch["labels"]).backward()
    no_gradient = [name for name, p in adapter.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_gradient and {"net.project.weight", "net.prefix_const"} <= {n for n, _ in adapter.named_parameters()}
    # The size check's count is the real one (it refuses adapters too large to allocate).
    parameters = sum(p.numel() for p in adapter.parameters())
    config = captioner.config
    monkeypatch.setattr(model, "MAX_ADAPTER_PARAMETERS", parameters)
    model.check_adapter_size(config, config.prefix_length * lm_dim)  # exactly at the limit: allowed
    monkeypatch.setattr(model, "MAX_ADAPTER_PARAMETERS", parameters - 1)
    too_large = rf"would have {parameters:,} parameters \(transformer, .*, 2 layers\).*--adapter-layers"
    with pytest.raises(UserError, match=too_large):
        model.check_adapter_size(config, config.prefix_length * lm_dim)
    monkeypatch.undo()
    # Saved and rebuilt from its config alone: the same prefix.
    save_adapter(tmp_path / "ckpt", adapter, config)
    reloaded = load_captioner(tmp_path / "ckpt")
    assert reloaded.config.adapter_kind == "transformer" and reloaded.config.adapter_layers == 2
    assert torch.equal(reloaded.adapter(features), adapter.eval()(features))


def test_save_reload_gives_identical_captions(tiny, tmp_path):
    captioner = make_captioner(tiny)
    torch.manual_seed(0)
    for param in captioner.adapter.parameters():  # a distinctive adapter, not the fresh init
        param.data.normal_(0, 0.5)
    save_adapter(tmp_path / "ckpt", captioner.adapter, captioner.config)
    reloaded = load_captioner(tmp_path / "ckpt")
    images = [Image.open(f"{tiny['data_dir']}/images/test_000{i}.png") for i in range(4)]
    for decoding in (DecodingConfig(), DecodingConfig(strategy="beam", num_beams=3)):
        assert reloaded.caption_images(images, decoding) == captioner.caption_images(images, decoding)
    for (name, a), (_, b) in zip(captioner.adapter.state_dict().items(), reloaded.adapter.state_dict().items()):
        assert torch.equal(a, b), name


def test_generation_modes_return_clean_strings(tiny):
    captioner = make_captioner(tiny)
    features = torch.randn(3, captioner.config.image_feature_dim)
    torch.manual_seed(0)
    for decoding in (DecodingConfig(max_new_tokens=5), DecodingConfig(strategy="beam", num_beams=2),
                     DecodingConfig(strategy="sample", temperature=0.9, top_p=0.8)):
        captions = captioner.generate(features, decoding)
        assert len(captions) == 3
        for caption in captions:
            assert "<|endoftext|>" not in caption and caption == " ".join(caption.split())
    # The limit counts generated tokens (re-tokenising the text may split it differently).
    with torch.no_grad():
        prefix = captioner.prefix_embeds(features)
        assert captioner.greedy_tokens(prefix, 2).shape[1] <= 2
        for strategy in ("beam", "sample"):
            assert captioner.hf_generate_tokens(prefix, DecodingConfig(strategy=strategy, max_new_tokens=2)).shape[1] <= 2
    assert captioner.generate(features, DecodingConfig(max_new_tokens=2)) == captioner.decode(
        captioner.greedy_tokens(prefix, 2))


def test_a_caption_that_ends_before_others_of_its_batch_is_the_caption_it_gets_alone(tiny):
    """The LM writes on after its EOS ("in front of a white" went on "a blue cross on a white"): greedy decoding fills
    the rows that ended with PAD, so a caption does not depend on which images share its batch."""
    captioner = make_captioner(tiny)
    torch.manual_seed(0)
    for param in captioner.adapter.parameters():  # a distinctive adapter: some captions end early, some run on
        param.data.normal_(0, 0.5)
    with torch.no_grad():
        prefix = captioner.prefix_embeds(F.normalize(torch.randn(6, captioner.config.image_feature_dim), dim=-1))
        tokens = captioner.greedy_tokens(prefix, 16)
        alone = [captioner.decode(captioner.greedy_tokens(prefix[i : i + 1], 16))[0] for i in range(6)]
    eos = captioner.config.eos_token_id
    assert tokens.shape[1] == 16 and any(eos in row[:-1] for row in tokens.tolist()), \
        "the fixture should end some captions early and run others to the end"
    assert captioner.decode(tokens) == alone


def test_sampling_is_pure_nucleus_with_no_hidden_top_k(tiny):
    """top-p 1.0 samples from the whole vocabulary: generate's default top-k of 50 must not creep in."""
    captioner = make_captioner(tiny)
    torch.manual_seed(0)
    with torch.no_grad():
        prefix = captioner.prefix_embeds(torch.randn(1, captioner.config.image_feature_dim)).repeat(2000, 1, 1)
        # A high temperature makes the first token nearly uniform over the vocabulary.
        tokens = captioner.hf_generate_tokens(prefix, DecodingConfig(strategy="sample", temperature=50.0, top_p=1.0,
                                                                     max_new_tokens=1))
    assert captioner.config.vocab_size > 100
    assert tokens[:, 0].unique().numel() > 100


def test_a_temperature_too_small_to_compute_is_one_line_and_the_smallest_allowed_samples_greedily(tiny):
    """--temperature 1e-45 used to end in torch.multinomial's NaN traceback (logits / T overflowed)."""
    with pytest.raises(UserError, match="temperature 1e-45 is too small"):
        DecodingConfig(strategy="sample", temperature=1e-45)
    captioner = make_captioner(tiny)
    torch.manual_seed(0)
    features = torch.randn(4, captioner.config.image_feature_dim)
    coldest = DecodingConfig(strategy="sample", temperature=1e-6, top_p=1.0, max_new_tokens=8)
    assert captioner.generate(features, coldest) == captioner.generate(features, DecodingConfig(max_new_tokens=8))


def test_decoding_passes_the_kv_cache_under_the_name_the_installed_lm_takes(tiny):
    import warnings

    from model import kv_cache_argument

    class Renamed(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert (kv_cache_argument(Renamed()), kv_cache_argument(Older())) == ("cache", "past_key_values")
    captioner = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"]))
    prefix = captioner.adapter(torch.randn(2, captioner.config.image_feature_dim))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tokens = captioner.greedy_tokens(prefix, 6, stop_at_eos=False)
    # A deprecated name still works today, with a warning; once it is gone it would be swallowed.
    assert not [w for w in seen if "is deprecated" in str(w.message)], [str(w.message) for w in seen]
    assert tokens.shape == (2, 6)


def test_standardised_features_reach_the_mlp_centred_and_scaled(tiny):
    captioner = make_captioner(tiny, standardize_image_features=True)
    adapter = captioner.adapter
    torch.manual_seed(0)
    features = F.normalize(torch.randn(50, captioner.config.image_feature_dim) + 3.0, dim=-1)  # a narrow cone
    features[:, 0] = 0.25  # a dimension that never varies in training
    adapter.set_feature_statistics(features)
    standardised = (features - features.mean(dim=0)) / adapter.feature_std
    assert torch.allclose(adapter(features).flatten(1), adapter.net(standardised))
    typical = features.std(dim=0, correction=0).median()
    assert adapter.feature_std[0] == 0.1 * typical  # floored: not divided by (almost) zero
    assert torch.allclose(adapter.feature_std[1:], features[:, 1:].std(dim=0, correction=0).clamp_min(0.1 * typical))
    assert torch.isfinite(adapter(features + 0.01)).all()
    # One training image (no spread at all): the features pass through centred, unscaled.
    adapter.set_feature_statistics(features[:1])
    assert torch.equal(adapter.feature_std, torch.ones_like(adapter.feature_std))
    # The statistics are buffers: saved and reloaded with the weights, never trained.
    assert {"feature_mean", "feature_std"} <= set(adapter.state_dict())
    assert all("feature" not in name for name, _ in adapter.named_parameters())


def test_checkpoints_from_before_standardisation_load_without_it(tiny, tmp_path):
    import json

    captioner = make_captioner(tiny)
    save_adapter(tmp_path, captioner.adapter, captioner.config)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["standardize_image_features"]  # as written before the field existed
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_captioner(tmp_path)
    assert loaded.config.standardize_image_features is False and not hasattr(loaded.adapter, "feature_mean")


def test_a_caption_longer_than_the_lm_context_is_refused_in_one_line(tiny):
    captioner = make_captioner(tiny)
    context, k = captioner.lm.config.max_position_embeddings, captioner.config.prefix_length
    features = torch.randn(1, captioner.config.image_feature_dim)
    with pytest.raises(UserError, match=f"exceed the language model's {context}-token context; use at most "
                                        f"{context - k}"):
        captioner.generate(features, DecodingConfig(strategy="beam", max_new_tokens=context - k + 1))
    assert len(captioner.generate(features, DecodingConfig(max_new_tokens=context - k))) == 1


def test_beam_search_and_sampling_follow_the_flags_not_the_lms_own_generation_config(tiny, tmp_path):
    """An LM's generation_config.json (an instruct model's repetition_penalty, ...) filled every setting the
    decoding flags leave open: beam search and sampling silently obeyed it, while the greedy loop did not."""
    import json
    import shutil

    opinionated = tmp_path / "lm"
    shutil.copytree(tiny["lm_model"], opinionated)
    settings = json.loads((opinionated / "generation_config.json").read_text())
    settings.update(min_new_tokens=10, repetition_penalty=5.0, no_repeat_ngram_size=1, length_penalty=-5.0)
    (opinionated / "generation_config.json").write_text(json.dumps(settings))
    plain = make_captioner(tiny)
    other = build_captioner(AdapterConfig(clip_model=tiny["clip_model"], lm_model=str(opinionated)))
    other.adapter.load_state_dict(plain.adapter.state_dict())
    features = torch.randn(4, plain.config.image_feature_dim)
    for decoding in (DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=12),
                     DecodingConfig(strategy="sample", temperature=0.5, top_p=0.9, max_new_tokens=12)):
        captions = []
        for captioner in (plain, other):
            torch.manual_seed(0)
            captions.append(captioner.generate(features, decoding))
        assert captions[1] == captions[0], decoding.strategy


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2"])
def test_the_loss_follows_an_lm_that_changes_its_heads_logits(tiny, kind, capsys):
    """Granite divides its head's output by logits_scaling, Cohere multiplies it by logit_scale, Gemma 2 caps it
    (final_logit_softcapping). The chunked loss took the head's weight alone: it trained the adapter against
    logits the LM never captions with (a tiny Granite: 5.680 against the LM's own 5.699)."""
    import transformers

    from model import Captioner, head_logit_changes

    base = make_captioner(tiny)
    assert head_logit_changes(base.lm) == []  # Qwen3 keeps the fast chunked loss
    sizes = dict(vocab_size=base.lm.config.vocab_size, hidden_size=base.lm.config.hidden_size, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config_class, lm_class, change = {
        "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
        "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0,
                                                         "head_dim": sizes["hidden_size"] // 4}),
    }[kind]
    torch.manual_seed(0)
    lm = getattr(transformers, lm_class)(getattr(transformers, config_class)(**sizes, **change)).eval()
    captioner = Captioner(base.config, base.clip, base.processor, lm, base.tokenizer, base.adapter)
    assert head_logit_changes(lm) and captioner.head_logit_changes
    tok, eos, pad = captioner.tokenizer, captioner.config.eos_token_id, captioner.config.pad_token_id
    batch = collate_captions([{"image_features": torch.randn(captioner.config.image_feature_dim),
                               "token_ids": tokenize_caption(tok, caption, eos, 40)}
                              for caption in ("a red circle on white", "a picture of a blue square on a gray background")],
                             pad_token_id=pad)
    loss = captioner(**batch)
    loss.backward()  # gradients reach the adapter through the LM's own logits
    assert all(p.grad is not None for p in captioner.adapter.parameters())
    k = captioner.config.prefix_length
    embeds = torch.cat([captioner.prefix_embeds(batch["image_features"]),
                        lm.get_input_embeddings()(batch["input_ids"])], dim=1)
    logits = lm(inputs_embeds=embeds).logits
    expected = F.cross_entropy(logits[:, k - 1 : -1].reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    captioner(**batch)
    assert capsys.readouterr().err.count("the LM changes its head's logits") == 1  # told once, on stderr
    # A batch of padding rows only (a process's last one, see EpochShuffleSampler) adds nothing: 0, not NaN.
    padding = collate_captions([{"image_features": torch.zeros(captioner.config.image_feature_dim), "token_ids": []}],
                               pad_token_id=pad)
    assert captioner(**padding).item() == 0


def test_the_loss_follows_logits_changed_where_no_setting_names_it(tiny, capsys):
    """head_logit_changes knows the settings of a few LMs; one that scales its logits in its forward (a subclass,
    remote code) named nothing, and the chunked loss trained against logits three times smaller than captioning's.
    The probe before the first loss finds it; the plain tiny Qwen3 keeps the chunked loss."""
    from model import Captioner, TrainingLoss, head_logit_changes

    base = make_captioner(tiny)

    class ScaledLM(type(base.lm)):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 3
            return output

    lm = ScaledLM(base.lm.config)
    lm.load_state_dict(base.lm.state_dict())
    lm.eval()
    captioner = Captioner(base.config, base.clip, base.processor, lm, base.tokenizer, base.adapter)
    assert head_logit_changes(lm) == []  # no setting says so
    tok, eos, pad = captioner.tokenizer, captioner.config.eos_token_id, captioner.config.pad_token_id
    batch = collate_captions([{"image_features": torch.randn(captioner.config.image_feature_dim),
                               "token_ids": tokenize_caption(tok, caption, eos, 40)}
                              for caption in ("a red circle on white", "a blue square on a gray background")],
                             pad_token_id=pad)
    loss = TrainingLoss(captioner)(**batch)
    k = captioner.config.prefix_length
    with torch.no_grad():
        embeds = torch.cat([captioner.prefix_embeds(batch["image_features"]),
                            lm.get_input_embeddings()(batch["input_ids"])], dim=1)
        logits = lm(inputs_embeds=embeds).logits
    expected = F.cross_entropy(logits[:, k - 1 : -1].reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    assert "its forward's logits differ from its head's output" in capsys.readouterr().err
    plain = make_captioner(tiny)
    plain(**batch)
    assert plain.head_probed and plain.head_logit_changes == []  # probed, and the fast chunked loss kept


def test_decoding_settings_out_of_range_are_refused_by_the_library_too():
    """The scripts check their flags, but caption_images takes a DecodingConfig from any caller: a beam of 1 is greedy
    under another name, and no token to generate gives empty captions."""
    with pytest.raises(UserError, match="--num-beams from 2 to 64, got 1"):
        DecodingConfig(strategy="beam", num_beams=1)
    with pytest.raises(UserError, match="must be >= 1, got 0"):
        DecodingConfig(max_new_tokens=0)
    with pytest.raises(UserError, match="0 < top-p <= 1, got 0.7, 1.5"):
        DecodingConfig(strategy="sample", top_p=1.5)


def test_the_transformer_adapter_is_clipcaps_mapper_with_8_heads(tiny):
    """Neither the number of heads (attention's weights have the same shapes for any) nor which half of the 2k outputs
    is the prefix is in a checkpoint: either changed, a saved transformer adapter reloads to another function."""
    captioner = make_captioner(tiny, adapter_kind="transformer", prefix_length=3, adapter_layers=1)
    mapper, k = captioner.adapter.net, 3
    assert captioner.config.lm_hidden_dim % 8 == 0 and mapper.layers.layers[0].self_attn.num_heads == 8
    features = torch.randn(2, captioner.config.image_feature_dim)
    with torch.no_grad():
        tokens = mapper.project(features).view(2, k, -1)  # (B, k, D)
        mapped = mapper.layers(torch.cat([tokens, mapper.prefix_const.expand(2, -1, -1)], dim=1))  # (B, 2k, D)
        assert torch.equal(captioner.adapter(features), mapped[:, k:])  # the learned constants' outputs


def test_generate_decodes_as_long_as_the_training_captions_by_default(tiny, monkeypatch):
    """Validation and the app caption with no DecodingConfig: as many tokens as training captions held (EOS
    included), not DecodingConfig's own default."""
    captioner = make_captioner(tiny, max_caption_tokens=7)
    budgets, greedy_tokens = [], captioner.greedy_tokens
    monkeypatch.setattr(captioner, "greedy_tokens", lambda prefix, budget, **kwargs: budgets.append(budget)
                        or greedy_tokens(prefix, budget, **kwargs))
    captioner.generate(torch.randn(2, captioner.config.image_feature_dim))
    assert budgets == [7]


def caption_prefixes(captioner, *texts: str) -> torch.Tensor:
    """Prefixes (B, n, D) that are the LM's own embeddings of caption beginnings of n tokens each: the tiny LM
    trained on the demo captions ends a whole caption at once and finishes a cut one in a few tokens, so a batch
    holds a row that ends at its first token beside one that ends later (a random adapter's rows rarely do)."""
    ids = [captioner.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    with torch.no_grad():
        return captioner.lm.get_input_embeddings()(torch.tensor(ids))


def tokens_after_first_eos(row: list[int], eos: int) -> list[int]:
    return row[row.index(eos) + 1 :] if eos in row else []


def test_greedy_rows_hold_pad_after_their_first_eos_and_decoding_stops_once_all_have_ended(tiny):
    """Ended rows are filled with PAD, never with what the LM would say after its EOS (decoding drops only special
    tokens: a row that went on would read "... background red circle"), and the loop stops at the step every row
    has ended. PAD is made unlike EOS here, as Gemma's (0 and 1), so that a row resuming after its EOS shows."""
    captioner = make_captioner(tiny)
    eos, pad = captioner.config.eos_token_id, 5
    captioner.config.pad_token_id = pad
    prefix = caption_prefixes(captioner, "a red circle on a white background", "a picture of a green cross on")
    tokens = captioner.greedy_tokens(prefix, 8).tolist()
    ended_at = [row.index(eos) if eos in row else None for row in tokens]
    assert ended_at[0] == 0 and 0 < ended_at[1] < 7, f"the fixture should end row 0 at once, row 1 later: {tokens}"
    assert tokens[0] == [eos] + [pad] * ended_at[1]
    assert all(tokens_after_first_eos(row, eos) == [pad] * (len(row) - row.index(eos) - 1) for row in tokens)
    assert len(tokens[1]) == ended_at[1] + 1  # not a step more than the last row to end needed
    assert captioner.decode(captioner.greedy_tokens(prefix[:1], 8)) == [""]
    assert len(captioner.greedy_tokens(prefix, 8, stop_at_eos=False)[0]) == 8


@pytest.mark.parametrize("decoding", [DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=8),
                                      DecodingConfig(strategy="sample", temperature=0.3, top_p=0.9, max_new_tokens=8)],
                         ids=["beam", "sample"])
def test_beam_search_and_sampling_end_rows_at_eos_and_fill_them_with_pad(tiny, decoding):
    """generate takes EOS and PAD from us (the LM's own generation config is set aside): without EOS it would run
    every caption to --max-new-tokens past its end, without PAD fill ended rows with EOS."""
    captioner = make_captioner(tiny)
    eos, pad = captioner.config.eos_token_id, 5
    captioner.config.pad_token_id = pad
    prefix = caption_prefixes(captioner, "a red circle on a white background", "a picture of a green cross on")
    torch.manual_seed(0)
    tokens = captioner.hf_generate_tokens(prefix, decoding).tolist()
    assert tokens[0][0] == eos and eos in tokens[1], f"the fixture should end both rows: {tokens}"
    assert all(tokens_after_first_eos(row, eos) == [pad] * (len(row) - row.index(eos) - 1) for row in tokens)
    assert len(tokens[0]) < 8  # stopped once both rows had ended
    # A budget that ends the later row before its EOS: every one of the tokens asked for, not one fewer.
    budget = tokens[1].index(eos)
    assert budget >= 2, f"the fixture should end row 1 after a few tokens: {tokens}"
    torch.manual_seed(0)
    assert captioner.hf_generate_tokens(prefix, dataclasses.replace(decoding, max_new_tokens=budget)).shape[1] == budget


def test_beam_search_keeps_num_beams_hypotheses_per_image(tiny):
    """--num-beams reaches generate: its LM head scores beams x images rows at every step (a width lost on the
    way is greedy decoding under beam search's name)."""
    captioner = make_captioner(tiny)
    rows = []
    spy = captioner.lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        captioner.generate(torch.randn(2, captioner.config.image_feature_dim),
                           DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=3))
    finally:
        spy.remove()
    assert set(rows) == {2 * 4}


def test_sampling_from_a_nucleus_of_one_token_is_greedy(tiny):
    """top-p reaches the sampler: at temperature 1 a top-p so small that the nucleus holds the likeliest token alone
    gives greedy's captions, where sampling the whole distribution does not."""
    captioner = make_captioner(tiny)
    torch.manual_seed(0)
    features = torch.randn(4, captioner.config.image_feature_dim)
    greedy = captioner.generate(features, DecodingConfig(max_new_tokens=8))
    nucleus = DecodingConfig(strategy="sample", temperature=1.0, top_p=1e-6, max_new_tokens=8)
    whole = DecodingConfig(strategy="sample", temperature=1.0, top_p=1.0, max_new_tokens=8)
    assert captioner.generate(features, nucleus) == greedy
    assert captioner.generate(features, whole) != greedy, "the fixture should sample other captions at top-p 1"


def test_an_lm_loaded_in_bf16_takes_the_fp32_adapters_prefix(tiny):
    """eval.py and inference.py load the backbones in bf16 on a GPU that computes in it, the adapter staying in
    fp32: its prefix is cast to the LM's dtype before it meets the caption's embeddings, for the loss and for
    every decoding."""
    config = AdapterConfig(clip_model=tiny["clip_model"], lm_model=tiny["lm_model"])
    captioner = build_captioner(config, dtype=torch.bfloat16)
    assert captioner.lm.dtype == torch.bfloat16 and next(captioner.adapter.parameters()).dtype == torch.float32
    features = torch.randn(2, config.image_feature_dim)
    for decoding in (DecodingConfig(max_new_tokens=4), DecodingConfig(strategy="beam", num_beams=2, max_new_tokens=4)):
        assert len(captioner.generate(features, decoding)) == 2
    batch = collate_captions([{"image_features": f, "token_ids": tokenize_caption(
        captioner.tokenizer, "a red circle on white", config.eos_token_id, 40)} for f in features],
        pad_token_id=config.pad_token_id)
    assert torch.isfinite(captioner(**batch))


def test_every_config_field_survives_saving_and_loading(tmp_path):
    """The adapter's config is the only record of how to rebuild it: a field not written (or not read back) reloads
    as its default, and a run trained on raw CLIP features would be fed normalised ones."""
    from model import ADAPTER_CONFIG

    config = AdapterConfig(clip_model="clip", lm_model="lm", clip_revision="c1", lm_revision="l1", adapter_kind="mlp",
                           prefix_length=3, image_feature_dim=6, lm_hidden_dim=8, adapter_hidden_dim=5,
                           adapter_layers=2, normalize_image_features=False, standardize_image_features=True,
                           eos_token_id=4, pad_token_id=7, vocab_size=99, vocabulary_digest="abc",
                           max_caption_tokens=12, training={"step": 3})
    config.to_json(tmp_path / ADAPTER_CONFIG)
    assert AdapterConfig.from_json(tmp_path / ADAPTER_CONFIG) == config


@pytest.mark.parametrize("kind", ["linear", "mlp", "transformer"])
def test_the_adapter_size_check_counts_every_parameter(kind, monkeypatch):
    """check_adapter_size refuses an adapter over the limit by a count of its parameters made before any is
    allocated: that count is the real one for every kind, biases included (exactly at the limit is allowed)."""
    import model

    config = AdapterConfig(clip_model="clip", lm_model="lm", adapter_kind=kind, prefix_length=3, image_feature_dim=6,
                           lm_hidden_dim=8, adapter_layers=2)
    out_dim = config.prefix_length * config.lm_hidden_dim
    parameters = sum(p.numel() for p in model.Adapter(config).parameters())
    monkeypatch.setattr(model, "MAX_ADAPTER_PARAMETERS", parameters)
    model.check_adapter_size(config, out_dim)
    monkeypatch.setattr(model, "MAX_ADAPTER_PARAMETERS", parameters - 1)
    with pytest.raises(UserError, match=f"would have {parameters:,} parameters"):
        model.check_adapter_size(config, out_dim)
