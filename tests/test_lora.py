"""LoRA adapters (stages/lora.py): the base frozen, the adapter the only trainable part, its file in
the format diffusers loads, giving diffusers' prior pipeline the latents our sampler makes with it."""

import copy

import pytest
import torch
from conftest import randomize_

from stages import StageB, StageC
from stages import lora
from stages.lora import LoraSpec
from stages.text_encoders import ClipTextEncoder


def _adapted(seed: int = 1, spec: LoraSpec = LoraSpec(rank=2, alpha=3.0)) -> tuple[StageC, StageC]:
    """(base, an adapted copy of it with a random, non-zero adapter)."""
    base = randomize_(StageC.from_flavor("tiny", dropout=0.0), seed=seed, std=0.1).eval()
    adapted = lora.add_lora(copy.deepcopy(base), spec)
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if lora.is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return base, adapted.eval()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 4, 4, generator=gen), torch.rand(2, generator=gen), torch.randn(2, 5, 32, generator=gen)


def test_an_adapter_starts_as_its_base_and_trains_alone():
    base = randomize_(StageC.from_flavor("tiny", dropout=0.0), seed=1, std=0.1).eval()
    adapted = lora.add_lora(copy.deepcopy(base), LoraSpec()).eval()
    torch.testing.assert_close(adapted(*_inputs()), base(*_inputs()))  # lora_B starts at zero
    assert lora.base_state(adapted.state_dict()).keys() == base.state_dict().keys()
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter_key(n) for n in trainable)
    # 2 blocks' attention x 4 projections x (A, B)
    assert len(trainable) == 2 * 4 * 2
    assert sorted(lora.adapter_state(adapted.state_dict()))[0] == "blocks.2.attention.to_k.lora_A.weight"


def test_the_merged_weights_are_the_adapted_model():
    spec = LoraSpec(rank=2, alpha=3.0)
    _, adapted = _adapted(spec=spec)
    plain = StageC.from_flavor("tiny", dropout=0.0).eval()
    plain.load_state_dict(lora.base_state(adapted.state_dict()))
    lora.merge_into(plain, lora.adapter_state(adapted.state_dict()), spec)
    torch.testing.assert_close(plain(*_inputs()), adapted(*_inputs()), atol=1e-5, rtol=1e-5)


def test_the_file_round_trips_and_refuses_what_does_not_fit(tmp_path):
    spec = LoraSpec(rank=2, alpha=3.0, dropout=0.1)
    _, adapted = _adapted(spec=spec)
    adapter = lora.adapter_state(adapted.state_dict())
    lora.save(tmp_path, adapter, spec, lora.prefix_of(adapted))
    loaded, loaded_spec, prefix = lora.load(tmp_path)
    assert (loaded_spec, prefix) == (spec, "prior")
    fresh = lora.add_lora(StageC.from_flavor("tiny", dropout=0.0), loaded_spec)
    lora.load_adapter(fresh, loaded)
    for name, t in lora.adapter_state(fresh.state_dict()).items():
        torch.testing.assert_close(t, adapter[name])
    with pytest.raises(ValueError, match="the adapter does not fit StageC's: missing"):
        lora.load_adapter(fresh, {k: v for k, v in loaded.items() if "to_q" not in k})
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapter"):
        lora.load(tmp_path / "nothing")


def test_targets_that_are_not_in_the_model_are_named():
    with pytest.raises(ValueError, match=r"LoRA target modules \['to_qkv'\] are not in StageC"):
        lora.add_lora(StageC.from_flavor("tiny"), LoraSpec(target_modules=("to_q", "to_qkv")))
    adapted = lora.add_lora(StageB.from_flavor("tiny"), LoraSpec())  # Stage B's attention has the same names
    assert lora.prefix_of(adapted) == "decoder" and lora.is_adapted(adapted)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(adapted, LoraSpec())


def test_diffusers_prior_pipeline_with_our_adapter_samples_what_our_sampler_does(tmp_path):
    """The file in diffusers' format: WuerstchenPriorPipeline.load_lora_weights(folder) on the exported
    base gives the latents our sampler makes with the adapted prior, for the same seed, at a
    non-square size; and the adapter changes them (a LoRA that loads with no effect fails)."""
    from diffusers import WuerstchenPriorPipeline

    from stages.diffusers_pipeline import write_prior_pipeline
    from stages.sampler import WuerstchenSampler

    spec = LoraSpec(rank=2, alpha=3.0)
    base, adapted = _adapted(spec=spec)
    text_encoder = ClipTextEncoder.tiny(width=32, seed=1)
    write_prior_pipeline(tmp_path / "base", base, text_encoder)
    lora.save(tmp_path / "adapter", lora.adapter_state(adapted.state_dict()), spec, lora.prefix_of(adapted))
    pipe = WuerstchenPriorPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    theirs = pipe(["a cat", "a dog"], height=256, width=384, num_inference_steps=4, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(3), output_type="pt").image_embeddings
    kwargs = dict(height=256, width=384, prior_steps=4, prior_guidance=4.0, generator=3, output="semantic", progress=False)
    ours = WuerstchenSampler(adapted, text_encoder, None, None, None)(["a cat", "a dog"], **kwargs)
    assert ours.shape == theirs.shape == (2, 16, 6, 9)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()  # fp32 rounding at the samples' scale
    without = WuerstchenSampler(base, text_encoder, None, None, None)(["a cat", "a dog"], **kwargs)
    assert (without - ours).abs().max() > 0.05 * ours.abs().max()


# The trainer's side: a LoRA fine-tune's train state, checkpoint and learning.

def _lora_run(steps: int = 0, sets: tuple = ()):
    """(config, task, base state dict, TrainState) of a tiny Stage C LoRA fine-tune on the CPU."""
    import numpy as np

    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.state import TrainState
    from pipelines.training.tasks import StageCTask

    cfg = load(TrainConfig, None, ["model.flavor=tiny", "model.init=base", "model.lora.rank=4", "ema.decay=0.5",
                                   "optim.lr=3e-3", "optim.weight_decay=0", "objective.caption_dropout=0", *sets])
    base = randomize_(StageC.from_flavor("tiny", dropout=0.0), seed=5, std=0.1).state_dict()
    task = StageCTask(cfg.model, cfg.encoders, cfg.objective, cfg.validation, "embeddings",
                      np.zeros((4, 32), dtype=np.float32)).setup(torch.device("cpu"))

    class Position:  # stands for EqualStepBatches: its data position
        def state_dict(self):
            return {"epoch": 0, "batch_in_epoch": 0}

        def load_state_dict(self, position):
            pass

    torch.manual_seed(0)
    state = TrainState.build(cfg.model.build(base), Position(), cfg, torch.device("cpu"))
    return cfg, task, base, state


def _pairs(rows: int = 4):
    """Latents and captions (text embeddings) that belong together."""
    gen = torch.Generator().manual_seed(7)
    return {"stage_c_latents": torch.randn(rows, 16, 3, 3, generator=gen),
            "text_embeddings": torch.randn(rows, 4, 32, generator=gen)}


def _step(state, task, batch: dict) -> float:
    state.seed_step(rank=0)
    state.optimizer.zero_grad()
    loss = task.loss(state.model, batch, state.generator)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    state.ema.update(state.model, state.step)
    return float(loss.detach())


def test_a_lora_fine_tune_trains_the_adapter_only_and_checkpoints_it_alone(tmp_path):
    from pipelines.training import checkpoint as ckpt_io
    from pipelines.training.parallel import full_model_state

    cfg, task, base, state = _lora_run()
    adapter_names = {n for n, p in state.model.named_parameters() if lora.is_adapter_key(n)}
    assert {id(p) for g in state.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in state.model.named_parameters() if n in adapter_names}
    assert set(state.ema.shadow) == adapter_names
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    for _ in range(3):
        _step(state, task, _pairs())
    after = state.model.state_dict()
    for name, t in lora.base_state(after).items():
        assert torch.equal(t, base[name]), name  # the base: bitwise the same
    assert any(not torch.equal(after[n], before[n]) for n in adapter_names)
    full = state.state_dict()
    assert set(full["model"]) == set(full["ema"]) == adapter_names
    ckpt_io.write(tmp_path, state.model.config, full["model"], full["ema"], full["optimizer"],
                  {"step": 3, "config": {"model": {"stage": "c"}}}, lora_spec=cfg.model.lora.spec())
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == [lora.WEIGHTS_NAME]
    read = ckpt_io.read(tmp_path)
    _, _, _, resumed = _lora_run()
    resumed.load_state_dict({**read, "step": 3, "data_position": {}})
    for name, t in full_model_state(resumed.model).items():
        assert torch.equal(t, full["model"][name]), name
    assert all(torch.equal(resumed.ema.shadow[n], state.ema.shadow[n]) for n in adapter_names)
    batch = _pairs()
    assert _step(resumed, task, batch) == _step(state, task, batch)  # the same next step, optimizer state included
    with pytest.raises(ValueError, match="the checkpoint's adapter does not fit"):
        resumed.load_state_dict({"model": {k: v for k, v in read["model"].items() if "to_q" not in k},
                                 "step": 3, "data_position": {}})


def test_a_lora_adapter_alone_learns_new_captions():
    """The wiring check of a fine-tune: a tiny prior learns eight captions with their latents (the
    base), then an adapter alone (the base frozen) learns eight others. The validation's retrieval
    finds each new caption's own latent with the adapter, not without it, and not with the captions
    rolled against their latents (a misaligned cache). The loss alone would not tell these apart."""
    import numpy as np

    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.data import to_tensors
    from pipelines.training.tasks import StageCTask

    def probe(seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return {"key": np.array([f"train-{seed}-{i}" for i in range(8)], dtype=object),
                "stage_c_latents": rng.standard_normal((8, 16, 3, 3)).astype(np.float32),
                "text_embeddings": rng.standard_normal((8, 4, 32)).astype(np.float32)}

    def task(*sets) -> StageCTask:
        cfg = load(TrainConfig, None, ["model.flavor=tiny", "model.overrides={c: 64, nhead: 4, dropout: 0.0}",
                                       "validation.retrieval_captions=8", *sets])
        return StageCTask(cfg.model, cfg.encoders, cfg.objective, cfg.validation, "embeddings",
                          np.zeros((4, 32), dtype=np.float32)).setup(torch.device("cpu"))

    def fit(model, rows: dict, lr: float, steps: int) -> None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        generator, batch = torch.Generator().manual_seed(1), to_tensors(rows, torch.device("cpu"))
        for _ in range(steps):
            optimizer.zero_grad()
            task_base.loss(model, batch, generator).backward()
            optimizer.step()

    old, new, held = probe(7), probe(8), _held_out_rows()
    task_base = task()
    torch.manual_seed(0)
    base = task_base.build_model()
    fit(base, old, lr=2e-3, steps=400)
    task_lora = task("model.init=base", "model.lora.rank=8")
    torch.manual_seed(0)  # the adapter's A
    adapted = task_lora.build_model(base.state_dict())
    frozen = {k: v.clone() for k, v in lora.base_state(adapted.state_dict()).items()}
    fit(adapted, new, lr=1e-2, steps=600)  # (measured over seeds 0-2: 7 to 8 of 8 found; rank 4: at most 2)
    assert all(torch.equal(v, frozen[k]) for k, v in lora.base_state(adapted.state_dict()).items())

    task_lora.train_probe = new
    learned = task_lora.validation_loss(adapted, held)
    assert learned["train_retrieval_top1"] >= 0.75, learned
    assert task_lora.validation_loss(base, held)["train_retrieval_top1"] <= 0.25  # the base never saw them
    task_lora.train_probe = {**new, "text_embeddings": np.roll(new["text_embeddings"], 1, axis=0)}
    assert task_lora.validation_loss(adapted, held)["train_retrieval_top1"] <= 0.25


def _held_out_rows() -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(3)
    return [{"key": np.array([f"held-{i}-{j}" for j in range(12)], dtype=object),
             "stage_c_latents": rng.standard_normal((12, 16, 3, 3)).astype(np.float32),
             "text_embeddings": rng.standard_normal((12, 4, 32)).astype(np.float32)} for i in range(2)]


def test_lora_is_refused_where_it_cannot_apply():
    from core.config import ConfigError, load
    from pipelines.training.config import TrainConfig

    with pytest.raises(ConfigError, match="model.lora adapts trained weights: model.init must name them"):
        load(TrainConfig, None, ["model.lora.rank=4"])
    with pytest.raises(ConfigError, match="model.lora adapts the attention of Stage C or Stage B; model.stage is 'a'"):
        load(TrainConfig, None, ["model.stage=a", "model.init=x", "model.lora.rank=4"])
    assert load(TrainConfig, None, ["model.init=x", "model.lora.alpha=8"]).model.lora.spec() == LoraSpec(rank=4, alpha=8.0)


def test_a_stage_b_adapter_registers_merged_into_the_base_it_was_trained_on(tmp_path):
    """diffusers has no LoRA loader for the decoder and a bundle holds its Stage B whole: a Stage B
    adapter is merged into its base (model.init, checked by digest) to register."""
    import dataclasses

    from core.config import load
    from latent_cache.encoders import state_digest
    from pipelines.register import _merged_stage_b
    from pipelines.training.config import TrainConfig

    base = randomize_(StageB.from_flavor("tiny", dropout=0.0), seed=3, std=0.1)
    base.save_pretrained(tmp_path / "base")
    cfg = load(TrainConfig, None, ["model.stage=b", "model.flavor=tiny", "model.overrides={dropout: 0.0}",
                                   f"model.init={tmp_path / 'base'}", "model.lora.rank=2"])
    adapted = cfg.model.build(base.state_dict()).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if lora.is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    lora.save(tmp_path / "ema", lora.adapter_state(adapted.state_dict()), cfg.model.lora.spec(), "decoder")
    state = {"config": dataclasses.asdict(cfg), "lora_base": {"sha256": state_digest(base.state_dict())}}
    merged = _merged_stage_b(state, tmp_path / "ema").eval()
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 16, 2, 2), torch.randn(2, 3, 32))
    torch.testing.assert_close(merged(*inputs), adapted(*inputs), atol=1e-5, rtol=1e-5)
    assert (merged(*inputs) - base.eval()(*inputs)).abs().max() > 1e-3  # the adapter is in it
    randomize_(StageB.from_flavor("tiny", dropout=0.0), seed=4).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="now gives other weights than the base this Stage B adapter was trained on"):
        _merged_stage_b(state, tmp_path / "ema")
