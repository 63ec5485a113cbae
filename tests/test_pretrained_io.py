"""save_pretrained / from_pretrained: round trips, dtypes, subfolders and the errors users meet."""

import json

import pytest
import safetensors.torch
import torch
from conftest import offline_hub, randomize_

from stages import CheckpointMismatchError, SemanticCompressor, StageA, StageB, StageC


@pytest.mark.parametrize("cls", [StageC, StageB, StageA, SemanticCompressor])
def test_round_trip_is_exact(cls, tmp_path):
    model = randomize_(cls.from_flavor("tiny"), seed=7)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_save_in_bf16_and_load_in_a_chosen_dtype(tmp_path):
    model = StageC.from_flavor("tiny")
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    stored = safetensors.torch.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert next(StageC.from_pretrained(tmp_path).parameters()).dtype == torch.float32
    assert next(StageC.from_pretrained(tmp_path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_batchnorm_counter_keeps_its_integer_dtype(tmp_path):
    StageA.from_flavor("tiny").save_pretrained(tmp_path)
    loaded = StageA.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.down_blocks[-1][1].num_batches_tracked.dtype == torch.int64
    assert loaded.down_blocks[-1][1].running_var.dtype == torch.float16


def test_hub_repository_layout_with_subfolders(tmp_path):
    """warp-ai/wuerstchen keeps decoder/ and vqgan/ side by side; the default subfolder is found."""
    StageB.from_flavor("tiny").save_pretrained(tmp_path / "decoder")
    StageA.from_flavor("tiny").save_pretrained(tmp_path / "vqgan")
    assert isinstance(StageB.from_pretrained(tmp_path), StageB)
    assert isinstance(StageA.from_pretrained(tmp_path, subfolder="vqgan"), StageA)


def test_sharded_weights_are_read_through_their_index(tmp_path):
    state = StageC.from_flavor("tiny").state_dict()
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        safetensors.torch.save_file({k: state[k].contiguous() for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    StageC.from_flavor("tiny").save_pretrained(tmp_path / "tmp")
    (tmp_path / "config.json").write_text((tmp_path / "tmp" / "config.json").read_text())
    loaded = StageC.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in keys)


def test_a_folder_of_another_model_is_refused_by_name(tmp_path):
    StageB.from_flavor("tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="describes a WuerstchenDiffNeXt, but StageC loads a WuerstchenPrior"):
        StageC.from_pretrained(tmp_path)


def _saved_tiny_prior_with(folder, **changes) -> None:
    StageC.from_flavor("tiny").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_unknown_config_keys_are_named(tmp_path):
    _saved_tiny_prior_with(tmp_path, c_hiddden=3)
    with pytest.raises(ValueError, match=r"config keys StageC does not know: \['c_hiddden'\]"):
        StageC.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_name_the_file(tmp_path):
    _saved_tiny_prior_with(tmp_path, depth=3)
    with pytest.raises(CheckpointMismatchError, match=r"diffusion_pytorch_model\.safetensors does not match.*20 missing keys"):
        StageC.from_pretrained(tmp_path)


def test_missing_weights_list_the_folder(tmp_path):
    StageC.from_flavor("tiny").save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*found \['config.json'\]"):
        StageC.from_pretrained(tmp_path)


def test_a_path_that_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        StageC.from_pretrained(tmp_path / "nope" / "nothing")


def test_a_hub_id_without_network_gives_an_actionable_error(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hub")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"(?s)could not fetch 'warp-ai/wuerstchen-prior'.*pass the local folder"):
        StageC.from_pretrained("warp-ai/wuerstchen-prior")


def test_a_hub_id_resolves_through_the_local_hub_cache(tmp_path, monkeypatch):
    """The hub path for real: a repository snapshot in the cache layout huggingface_hub uses offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--warp-ai--wuerstchen-prior" / "snapshots" / ("0" * 40)
    StageC.from_flavor("tiny").save_pretrained(snapshot / "prior")
    (cache / "models--warp-ai--wuerstchen-prior" / "refs").mkdir(parents=True)
    (cache / "models--warp-ai--wuerstchen-prior" / "refs" / "main").write_text("0" * 40)
    offline_hub(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)
    model = StageC.from_pretrained("warp-ai/wuerstchen-prior")
    assert model.config == StageC.flavor_config("tiny")
