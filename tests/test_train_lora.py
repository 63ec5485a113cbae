"""A LoRA fine-tune of a registered Stage C on Ray Train with 2 CPU workers (FSDP2, sharded
checkpoints), against real parts: a local Ray cluster, an MLflow server over HTTP, checkpoints on
local storage. One run through its life: a worker fails and the run recovers, the base stays bitwise
the same, the checkpoints hold the adapter alone, the adapter registers as a version pinned to its
base and loads, serves and exports as base + adapter, a resume on another base is refused and on the
same one goes on."""

import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import randomize_
from mlflow.tracking import MlflowClient
from test_train import metric_history, train_config

from latent_cache.encoders import state_digest
from latent_cache.reader import Cache
from pipelines import registry
from pipelines.export import export
from pipelines.register import register_stage_c
from pipelines.train import run_training
from pipelines.training import checkpoint as ckpt_io
from stages import StageC, lora

BASE = "lora-base"


def _register_base(cache: str, uri: str, folder: Path, seed: int) -> str:
    """A Stage C of seeded random weights registered as a version of BASE (through a checkpoint
    folder written as the trainer writes one); its version number."""
    model = randomize_(StageC.from_flavor("tiny"), seed=seed, std=0.1)
    cfg = train_config(cache, str(folder.parent), uri, folder.name)
    state = {"step": 0, "data_position": {}, "mlflow_run_id": None, "cache_fingerprints": Cache(cache).fingerprints(),
             "config": dataclasses.asdict(cfg), "validation": {}}
    ckpt_io.write(folder, model.config, None, model.state_dict(), None, state)
    return register_stage_c(uri, BASE, checkpoint=str(folder))["version"]


def _adapter_of(folder: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The trained adapter a sharded checkpoint holds, read back in this (non-distributed) process."""
    import torch.distributed.checkpoint as dcp

    shapes = lora.add_lora(StageC.from_flavor("tiny"), lora.LoraSpec(rank=2)).state_dict()
    state = {"model": {name: torch.zeros_like(shapes[name]) for name in names}}
    dcp.load(state, checkpoint_id=f"{folder}/sharded")
    return lora.adapter_state(state["model"])


def test_a_lora_fine_tune_recovers_keeps_its_base_registers_pinned_to_it_and_resumes_on_it_only(
        tiny_cache, mlflow_server, tmp_path):
    from diffusers import WuerstchenPriorPipeline

    from stages.diffusers_pipeline import load_sampler

    uri = mlflow_server
    first = _register_base(tiny_cache, uri, tmp_path / "base-1", seed=4)
    other = _register_base(tiny_cache, uri, tmp_path / "base-2", seed=5)
    client = MlflowClient(uri)
    client.set_registered_model_alias(BASE, "base", first)
    base = registry.load_stage_c(f"models:/{BASE}/{first}", uri)
    base_sha = state_digest(base.state_dict())

    storage, marker = str(tmp_path / "runs"), tmp_path / "failed"
    sets = {"model.init": f"models:/{BASE}@base", "model.lora.rank": 2, "parallel.strategy": "fsdp2",
            "checkpoint.fsdp_state_dict": "sharded", "optim.lr": 1e-2}
    fault = {"max_failures": 1, "fault.fail_at_step": 4, "fault.rank": 1, "fault.marker": str(marker)}
    cfg = train_config(tiny_cache, storage, uri, "lora", **sets, **fault)
    result, run_id = run_training(cfg)
    assert result.metrics["step"] == 6 and marker.exists(), "a worker failed at step 4 and the run recovered"
    assert [s for s, _ in metric_history(uri, run_id, "loss")] == [1, 2, 3, 4, 5, 6], "no step twice"
    tags = client.get_run(run_id).data.tags
    assert (tags["lora.base"], tags["lora.base_sha256"]) == (f"models:/{BASE}/{first}", base_sha)
    assert len(metric_history(uri, run_id, "val_train_retrieval_top10_ema")) == 2  # the wiring check runs

    with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:
        pinned = {"init": f"models:/{BASE}@base", "sha256": base_sha, "version": f"models:/{BASE}/{first}"}
        assert ckpt_io.read_train_state(Path(folder))["lora_base"] == pinned
        assert sorted(p.name for p in Path(folder, "ema").iterdir()) == [lora.WEIGHTS_NAME]  # for consumers
        ema, spec, prefix = lora.load(Path(folder, "ema"))
        trained = _adapter_of(folder, sorted(lora.model_keys(ema)))
    assert (spec, prefix) == (lora.LoraSpec(rank=2, alpha=2.0), "prior")
    assert set(trained) == set(ema) and all(t.abs().sum() > 0 for n, t in trained.items() if ".lora_B." in n)
    assert any(not torch.equal(trained[n], ema[n]) for n in ema)  # the EMA lags the trained adapter
    assert state_digest(registry.load_stage_c(f"models:/{BASE}/{first}", uri).state_dict()) == base_sha  # untouched

    # Registered: the version holds the adapter only and pins the base version it was trained on.
    version = register_stage_c(uri, "lora-tuned", run_id=run_id)["version"]
    tuned = f"models:/lora-tuned/{version}"
    assert registry.model_config_of(tuned)["lora_base"] == f"models:/{BASE}/{first}"
    assert registry.model_config_of(tuned)["buckets"] == ["128x128"]
    registry.download(tuned, tmp_path / "downloaded")
    files = sorted(p.name for p in (tmp_path / "downloaded").rglob("*.safetensors"))
    assert files == [lora.WEIGHTS_NAME]
    merged = lora.merge_into(registry.load_stage_c(f"models:/{BASE}/{first}", uri), ema, spec)
    loaded = registry.load_stage_c(tuned, uri)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), merged.state_dict().values()))
    # a non-square shape (an aspect-ratio bucket's), as the params ask
    served = mlflow.pyfunc.load_model(tuned).predict(["a red apple"], params={"steps": 3, "seed": 7, "guidance": 2.0,
                                                                             "height": 96, "width": 160})
    from pipelines.pyfunc_models import TextEncoderRef
    from stages.sampler import WuerstchenSampler

    text = TextEncoderRef.from_dict(registry.model_config_of(tuned)["text_encoder"]).load()
    ours = WuerstchenSampler(merged.eval(), text)(["a red apple"], height=96, width=160, prior_steps=3, prior_guidance=2.0,
                                                  generator=7, output="semantic", progress=False)
    assert ours.shape == (1, 16, 2, 4)  # the grid of a 96 x 160 bucket's cached latents
    torch.testing.assert_close(torch.as_tensor(served), ours, rtol=1e-5, atol=1e-5)

    # Exported: merged into a plain prior, or the adapter alone on an export of the base (diffusers).
    out = export(tuned, tmp_path / "merged", uri)
    assert all(torch.equal(a, b) for a, b in zip(StageC.from_pretrained(out / "prior").state_dict().values(),
                                                 merged.state_dict().values()))
    adapter_dir = export(tuned, tmp_path / "adapter", uri, adapter_only=True)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["REGISTRY_SOURCE.txt", lora.WEIGHTS_NAME]
    pipe = WuerstchenPriorPipeline.from_pretrained(export(f"models:/{BASE}/{first}", tmp_path / "base", uri))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter_dir))
    theirs = pipe(["a cat"], height=128, width=128, num_inference_steps=4, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5), output_type="pt").image_embeddings
    mine = load_sampler(out)(["a cat"], height=128, width=128, prior_steps=4, prior_guidance=3.0, generator=5,
                             output="semantic", progress=False)
    torch.testing.assert_close(theirs, mine, rtol=1e-3, atol=2e-4)  # as the plain export's test (e = 42 z - 1)

    # The alias moved to another base: the adapter was not trained on it.
    client.set_registered_model_alias(BASE, "base", other)
    with pytest.raises(ValueError, match=r"model.init=models:/lora-base@base now gives other weights .* adapter of lora"):
        run_training(train_config(tiny_cache, storage, uri, "lora", steps=9, **sets))
    client.set_registered_model_alias(BASE, "base", first)
    result, again = run_training(train_config(tiny_cache, storage, uri, "lora", steps=9, **sets))
    assert again == run_id and result.metrics["step"] == 9
    assert [s for s, _ in metric_history(uri, run_id, "loss")] == list(range(1, 10))
    tags = client.get_run(run_id).data.tags
    assert tags["resume.step_6.weights_sha256"] == state_digest(lora.model_keys(trained))  # the adapter it resumed from


def _register_adapter(cache: str, uri: str, folder: Path, name: str, base: str, seed: int) -> tuple[str, dict]:
    """A seeded random rank-2 adapter on the registered `base` (models:/NAME/VERSION), registered as a
    version of `name` through a checkpoint folder written as a LoRA run writes one; (its version, the
    adapter under the file's names)."""
    spec = lora.LoraSpec(rank=2)
    adapted = lora.add_lora(StageC.from_flavor("tiny"), spec)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for key, p in adapted.named_parameters():
            if lora.is_adapter_key(key):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    cfg = train_config(cache, str(folder.parent), uri, folder.name, **{"model.init": base, "model.lora.rank": 2})
    sha = state_digest(registry.load_stage_c(base, uri).state_dict())
    state = {"step": 0, "data_position": {}, "mlflow_run_id": None, "cache_fingerprints": Cache(cache).fingerprints(),
             "config": dataclasses.asdict(cfg), "validation": {},
             "lora_base": {"init": base, "sha256": sha, "version": base}}
    ckpt_io.write(folder, adapted.config, None, adapted.state_dict(), None, state, lora_spec=spec)
    return register_stage_c(uri, name, checkpoint=str(folder))["version"], lora.adapter_state(adapted.state_dict())


def test_an_adapter_on_a_lora_version_loads_serves_and_exports_as_the_whole_chain_merged(tiny_cache, mlflow_server,
                                                                                         tmp_path):
    """A fine-tune of a champion that is itself a LoRA version (the retraining workflow's second LoRA
    round): the new version pins the LoRA version it was trained on, and loading, serving and
    exporting it merge the whole chain: the base with both adapters."""
    uri, name = mlflow_server, "lora-chain"
    first = _register_base(tiny_cache, uri, tmp_path / "base", seed=6)
    v1, a1 = _register_adapter(tiny_cache, uri, tmp_path / "adapter-1", name, f"models:/{BASE}/{first}", seed=7)
    v2, a2 = _register_adapter(tiny_cache, uri, tmp_path / "adapter-2", name, f"models:/{name}/{v1}", seed=8)
    assert registry.model_config_of(f"models:/{name}/{v2}")["lora_base"] == f"models:/{name}/{v1}"
    spec = lora.LoraSpec(rank=2)
    base = registry.load_stage_c(f"models:/{BASE}/{first}", uri)
    chain = lora.merge_into(lora.merge_into(base, a1, spec), a2, spec)
    loaded = registry.load_stage_c(f"models:/{name}/{v2}", uri)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), chain.state_dict().values()))
    one_adapter = lora.merge_into(registry.load_stage_c(f"models:/{BASE}/{first}", uri), a2, spec)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), one_adapter.state_dict().values()))

    from pipelines.pyfunc_models import TextEncoderRef
    from stages.sampler import WuerstchenSampler

    served = mlflow.pyfunc.load_model(f"models:/{name}/{v2}").predict(["a red apple"], params={"steps": 3, "seed": 7})
    text = TextEncoderRef.from_dict(registry.model_config_of(f"models:/{name}/{v2}")["text_encoder"]).load()
    ours = WuerstchenSampler(chain.eval(), text)(["a red apple"], height=128, width=128, prior_steps=3, generator=7,
                                                 output="semantic", progress=False)
    torch.testing.assert_close(torch.as_tensor(served), ours, rtol=1e-5, atol=1e-5)
    out = export(f"models:/{name}/{v2}", tmp_path / "merged", uri)
    assert all(torch.equal(a, b) for a, b in zip(StageC.from_pretrained(out / "prior").state_dict().values(),
                                                 chain.state_dict().values()))
