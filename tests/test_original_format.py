"""Loading checkpoints in the original (dome272/Wuerstchen) layout, written here by the tests."""

import pytest
import torch
from conftest import randomize_

from stages import CheckpointMismatchError, SemanticCompressor, StageA, StageB, StageC
from stages.original_format import from_original, load_original, load_original_semantic_compressor, to_original


def _original_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as the original code names them, written independently of to_original():
    nn.MultiheadAttention's packed in_proj (rows q | k | v) and out_proj, Stage A's `codebook`."""
    state = model.state_dict()
    out = {}
    for key, tensor in state.items():
        if ".attention.to_q." in key:
            stem, kind = key.split(".attention.to_q.")
            out[f"{stem}.attention.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{stem}.attention.to_{p}.{kind}"] for p in "qkv"]
            )
        elif ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        elif ".attention.to_out.0." in key:
            out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = tensor
        elif key == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = tensor
        else:
            out[key] = tensor
    return {k: v.clone() for k, v in out.items()}


def test_stage_c_from_an_original_training_checkpoint(tmp_path):
    model = randomize_(StageC.from_flavor("tiny"), seed=3).eval()
    ema = _original_layout(model)
    assert any(k.endswith("attn.in_proj_weight") for k in ema)
    # A training checkpoint: the raw weights differ from the EMA ones, which must win.
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    torch.save({"state_dict": raw, "ema_state_dict": ema, "iter": 918_000}, tmp_path / "model_v3_stage_c.pt")
    loaded = load_original(StageC, tmp_path / "model_v3_stage_c.pt", flavor="tiny")
    x, r, c = torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, r, c), model(x, r, c), atol=0, rtol=0)


def test_stage_b_and_its_semantic_compressor_from_one_original_checkpoint(tmp_path):
    decoder = randomize_(StageB.from_flavor("tiny"), seed=4).eval()
    effnet = randomize_(SemanticCompressor.from_flavor("tiny"), seed=5).eval()
    path = tmp_path / "model_v2_stage_b.pt"
    # DDP-wrapped keys (`module.`) as a multi-GPU run saves them.
    state = {f"module.{k}": v for k, v in _original_layout(decoder).items()}
    torch.save({"state_dict": state, "effnet_state_dict": effnet.state_dict()}, path)

    loaded = load_original(StageB, path, flavor="tiny")
    x, r, e, clip = torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 16, 2, 2), torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, r, e, clip), decoder(x, r, e, clip), atol=0, rtol=0)

    loaded_effnet = load_original_semantic_compressor(path, flavor="tiny")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded_effnet(images), effnet(images), atol=0, rtol=0)


def test_v2_semantic_compressor_loads_an_effnet_state_dict_strictly(tmp_path):
    """Full size: torchvision's efficientnet_v2_s features + the 1280->16 mapper, as in model_v2_stage_b.pt."""
    effnet = SemanticCompressor.from_flavor("v2").eval()
    torch.save({"effnet_state_dict": effnet.state_dict()}, tmp_path / "model_v2_stage_b.pt")
    loaded = load_original_semantic_compressor(tmp_path / "model_v2_stage_b.pt")
    images = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        out = loaded(images)
        torch.testing.assert_close(out, effnet(images), atol=0, rtol=0)
    assert out.shape == (1, 16, 3, 3)


def test_stage_a_codebook_is_renamed(tmp_path):
    model = randomize_(StageA.from_flavor("tiny"), seed=6).eval()
    torch.save({"state_dict": _original_layout(model)}, tmp_path / "vqgan_f4_v1_500k.pt")
    loaded = load_original(StageA, tmp_path / "vqgan_f4_v1_500k.pt", flavor="tiny")
    torch.testing.assert_close(loaded.vquantizer.embedding.weight, model.vquantizer.embedding.weight)
    images = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(images), quantize=True), model.decode(model.encode(images), quantize=True))


def test_to_original_inverts_from_original():
    state = StageC.from_flavor("tiny").state_dict()
    back = from_original(to_original(state))
    assert sorted(back) == sorted(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    assert to_original(state).keys() == _original_layout(StageC.from_flavor("tiny")).keys()


def test_a_mismatching_checkpoint_names_the_file_and_the_keys(tmp_path):
    state = _original_layout(StageC.from_flavor("tiny"))
    del state["projection.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save({"ema_state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_original(StageC, path, flavor="tiny")
    message = str(err.value)
    assert str(path) in message and "ema_state_dict" in message
    assert "1 missing keys: projection.bias" in message
    assert "1 unexpected keys: extra.weight" in message


def test_the_wrong_flavor_reports_shapes(tmp_path):
    torch.save({"state_dict": _original_layout(StageC.from_flavor("tiny"))}, tmp_path / "c.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_original(StageC, tmp_path / "c.pt", flavor="small")
    assert "40 missing keys" in str(err.value)  # small has 4 triplets, tiny 2
    assert "blocks.0.depthwise.weight (32, 1, 3, 3) != (256, 1, 3, 3)" in str(err.value)


class Payload:
    """Any object a tensors-only load must refuse to rebuild."""


def test_a_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "object": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="tensors-only"):
        load_original(StageC, tmp_path / "evil.pt", flavor="tiny")


def test_missing_state_dict_key_lists_what_is_there(tmp_path):
    torch.save({"optimizer": {"lr": 1.0}, "iter": 3}, tmp_path / "c.pt")
    with pytest.raises(KeyError, match=r"none of the state dicts \['ema_state_dict', 'state_dict'\].*\['iter', 'optimizer'\]"):
        load_original(StageC, tmp_path / "c.pt", flavor="tiny")
