"""Text conditioning: tokens, padding, the post-LN output contract, tokenizer sanity, both backends."""

import json

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stages.text_encoders import (
    STAGE_C_TEXT_ENCODER,
    ClipTextEncoder,
    TokenizerError,
    check_tokenizer,
    load_clip_tokenizer,
    write_clip_tokenizer_files,
)

EOT = 49407


def test_tokens_are_padded_to_77_with_endoftext_and_masked():
    encoder = ClipTextEncoder.tiny()
    ids, mask = encoder.tokenize(["a red apple", ""])
    assert ids.shape == mask.shape == (2, 77)
    assert ids[0, 0].item() == 49406 and ids[0, 4].item() == EOT and torch.all(ids[0, 4:] == EOT)
    assert mask[0].sum().item() == 5 and mask[1].sum().item() == 2  # <sot> a red apple <eot> / <sot> <eot>
    # the same BPE ids as open_clip's tokenizer (which pads with 0 instead)
    reference = SimpleTokenizer()(["a red apple"])[0]
    assert torch.equal(ids[0, :5], reference[:5])


def test_long_prompts_are_truncated_to_77_tokens():
    ids, mask = ClipTextEncoder.tiny().tokenize(["apple " * 200])
    assert ids.shape == (1, 77) and mask.sum().item() == 77 and ids[0, -1].item() == EOT


def test_output_is_every_token_after_the_final_layer_norm():
    encoder = ClipTextEncoder.tiny(width=48, heads=4)
    hidden = encoder.encode(["a photo of a cat", "two dogs"])
    assert hidden.shape == (2, 77, 48)
    # The final LayerNorm (weight 1, bias 0 at init) leaves each token with mean 0 and variance 1.
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(2, 77), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.var(-1, unbiased=False), torch.ones(2, 77), atol=1e-3, rtol=0)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_attention_mask_is_passed_to_the_encoder():
    encoder = ClipTextEncoder.tiny()
    ids, mask = encoder.tokenize(["a red apple"])
    with torch.no_grad():
        masked = encoder(ids, mask)
        unmasked = encoder(ids, torch.ones_like(mask))
    torch.testing.assert_close(masked[:, :5], unmasked[:, :5])  # causal: real tokens never see padding
    assert not torch.allclose(masked[:, 5:], unmasked[:, 5:])  # padding positions do differ


def test_frozen_encoder_stays_in_eval_mode():
    encoder = ClipTextEncoder.tiny()
    encoder.train()
    assert not encoder.training and not encoder.model.training


def test_round_trip_through_the_pipeline_layout(tmp_path):
    encoder = ClipTextEncoder.tiny(width=24, seed=5)
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder" / "config.json").is_file() and (tmp_path / "tokenizer").is_dir()
    loaded = ClipTextEncoder.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.encode(["hello world"]), encoder.encode(["hello world"]))


def test_a_broken_tokenizer_is_refused(tmp_path):
    """What an offline CLIPTokenizer.from_pretrained(hub id) returns: a vocabulary of two tokens."""
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    broken = CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match=r"has 2 tokens \(a CLIP tokenizer has 49408\)"):
        check_tokenizer(broken, str(tmp_path))
    with pytest.raises(TokenizerError):
        load_clip_tokenizer(tmp_path)


def test_an_offline_hub_tokenizer_is_refused_not_used(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TokenizerError, match=STAGE_C_TEXT_ENCODER):
        load_clip_tokenizer(STAGE_C_TEXT_ENCODER, "tokenizer")


class _EverythingIsEndOfText:
    """A tokenizer with a full-size vocabulary that maps every word to <|endoftext|>: the failure
    mode of an offline load, but with the size check passed."""

    def __len__(self):
        return 49408

    def __call__(self, text):
        class Encoding:
            input_ids = [49406] + [EOT] * len(text.split()) + [EOT]

        return Encoding()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def test_a_tokenizer_that_does_not_round_trip_is_refused(tmp_path):
    check_tokenizer(CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path)), "the real vocabulary")
    with pytest.raises(TokenizerError, match="does not round-trip 'a photo of a red apple"):
        check_tokenizer(_EverythingIsEndOfText(), "stub")


def _open_clip_to_transformers(tower: TextTransformer, heads: int) -> CLIPTextModel:
    """The same weights in transformers' layout (q/k/v split from the packed in_proj)."""
    width, layers = tower.transformer.width, tower.transformer.layers
    config = CLIPTextConfig(
        vocab_size=tower.vocab_size, hidden_size=width, intermediate_size=width * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
        pad_token_id=EOT, bos_token_id=49406, eos_token_id=EOT,
    )
    model = CLIPTextModel(config).eval()
    sd = {
        "embeddings.token_embedding.weight": tower.token_embedding.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "final_layer_norm.weight": tower.ln_final.weight,
        "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i, block in enumerate(tower.transformer.resblocks):
        p = f"encoder.layers.{i}."
        for name, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            sd[f"{p}self_attn.{name}_proj.weight"], sd[f"{p}self_attn.{name}_proj.bias"] = w, b
        sd[f"{p}self_attn.out_proj.weight"], sd[f"{p}self_attn.out_proj.bias"] = block.attn.out_proj.weight, block.attn.out_proj.bias
        sd[f"{p}layer_norm1.weight"], sd[f"{p}layer_norm1.bias"] = block.ln_1.weight, block.ln_1.bias
        sd[f"{p}layer_norm2.weight"], sd[f"{p}layer_norm2.bias"] = block.ln_2.weight, block.ln_2.bias
        sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"] = block.mlp.c_fc.weight, block.mlp.c_fc.bias
        sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"] = block.mlp.c_proj.weight, block.mlp.c_proj.bias
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


def test_open_clip_backend_gives_the_same_output_as_transformers_for_the_same_weights():
    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=32, heads=4, layers=2, output_dim=16).eval()
    with torch.no_grad():  # the default init leaves biases at zero; make every weight count
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    open_clip_encoder = ClipTextEncoder.from_open_clip_tower(tower)
    reference = ClipTextEncoder(open_clip_encoder.tokenizer, _open_clip_to_transformers(tower, heads=4))
    prompts = ["a watercolor painting of a lighthouse", ""]
    assert open_clip_encoder.width == reference.width == 32
    torch.testing.assert_close(open_clip_encoder.encode(prompts), reference.encode(prompts), atol=1e-5, rtol=1e-4)


def _decoder_repo(root, encoder: ClipTextEncoder) -> None:
    """The file layout of warp-ai/wuerstchen: the text encoder and tokenizer in subfolders."""
    from stages import StageA, StageB
    from stages.diffusers_pipeline import write_decoder_pipeline

    write_decoder_pipeline(root, StageB.from_flavor("tiny"), encoder, StageA.from_flavor("tiny"))


def test_the_text_encoder_of_a_decoder_pipeline_folder_is_found(tmp_path):
    encoder = ClipTextEncoder.tiny(width=24, seed=3)
    _decoder_repo(tmp_path / "wuerstchen", encoder)
    loaded = ClipTextEncoder.from_pretrained(tmp_path / "wuerstchen")
    torch.testing.assert_close(loaded.encode(["a red apple"]), encoder.encode(["a red apple"]))


def test_the_text_encoder_of_a_decoder_pipeline_hub_id_is_found(tmp_path, monkeypatch):
    """`register --decoder-bundle warp-ai/wuerstchen`: the hub path for real, through a repository
    snapshot in the cache layout huggingface_hub reads offline."""
    from conftest import offline_hub

    cache = tmp_path / "hub"
    repo = cache / "models--warp-ai--wuerstchen"
    encoder = ClipTextEncoder.tiny(width=24, seed=3)
    _decoder_repo(repo / "snapshots" / ("1" * 40), encoder)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    offline_hub(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    loaded = ClipTextEncoder.from_pretrained("warp-ai/wuerstchen")
    torch.testing.assert_close(loaded.encode(["a red apple"]), encoder.encode(["a red apple"]))
