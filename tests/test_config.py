"""Job configs: types, ranges, presets and YAML errors are caught when a config is built, and every
job turns them into exit code 2 with one line that names the file and the key."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.config import ClipScoreConfig, FilterConfig, PrepConfig
from core.config import ConfigError, from_dict, load
from pipelines.evaluate import EvalSpec
from pipelines.promote import GateConfig
from pipelines.retrain import RetrainConfig
from pipelines.training.config import OptimConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# -- numbers, YAML errors -----------------------------------------------------------------------

def test_numbers_written_as_strings_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; it is the learning rate the user meant."""
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  eps: 1e-8\nsteps: '300'\n")
    cfg = load(TrainConfig, path)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.steps) == (1e-4, 1e-8, 300)
    assert load(TrainConfig, None, ["optim.lr=3e-5"]).optim.lr == 3e-5
    assert load(TrainConfig, None, ["checkpoint.run_name=2024"]).checkpoint.run_name == "2024"
    with pytest.raises(ConfigError, match=r"train.yaml: optim.lr: .*valid number.*'fast'"):
        path.write_text("optim:\n  lr: fast\n")
        load(TrainConfig, path)


def test_malformed_yaml_is_a_config_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  betas: [0.9, 0.99\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: .* at line \d+, column \d+$"):
        load(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"^override 'optim.betas=\[0.9': the value is not valid YAML \(.* at line 1"):
        load(TrainConfig, None, ["optim.betas=[0.9"])


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.integration  # the train job in its own process
def test_the_train_cli_exits_2_with_one_line_on_malformed_yaml(tmp_path):
    """Through the real command line, in a fresh process: no traceback, exit code 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    done = subprocess.run([sys.executable, "-m", "pipelines.train", "--config", str(bad)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    _one_line_error(done, "bad.yaml", "not valid YAML", "line 2")


@pytest.mark.parametrize("job", ["prep", "train", "retrain"])
def test_every_config_job_exits_2_with_one_line(job, tmp_path, capsys, monkeypatch):
    from pipelines import cli

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: b: c\n")
    assert cli.main([job, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml is not valid YAML" in err and "Traceback" not in err
    assert cli.main([job, "--set", "x=[1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'x=[1': the value is not valid YAML" in err
    key = {"prep": "encode.batch_size", "train": "optim.grad_accum", "retrain": "train.checkpoint.every_steps"}[job]
    assert cli.main([job, "--set", f"{key}=0"]) == 2  # out of range: refused before any cluster or MLflow work
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key}: Input should be greater than 0 (got 0)" in err
    assert list(tmp_path.iterdir()) == [bad], "nothing was started"


def test_promote_refuses_a_negative_margin_with_one_line(capsys):
    from pipelines import promote

    assert promote.main(["--min-relative-improvement", "-0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min_relative_improvement" in err and "Traceback" not in err


# -- ranges ---------------------------------------------------------------------------------------

BAD_TRAIN = [
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("optim.lr=0", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9, 1.5]", "optim.betas[1]"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("checkpoint.num_to_keep=0", "checkpoint.num_to_keep"),
    ("validation.every_steps=0", "validation.every_steps"),
    ("validation.t_grid=[0.5, 1.5]", "validation.t_grid[1]"),
    ("validation.t_grid=[]", "validation.t_grid"),
    ("tracking.log_every=0", "tracking.log_every"),
    ("ema.every=0", "ema.every"),
    ("ema.decay=1.5", "ema.decay"),
    ("ema.beta=-0.1", "ema.beta"),
    ("ema.copy_until=-1", "ema.copy_until"),
    ("steps=-1", "steps"),
    ("steps=0", "steps"),
    ("max_failures=-2", "max_failures"),
    ("num_cpus=0", "num_cpus"),
    ("parallel.num_workers=0", "parallel.num_workers"),
    ("parallel.cpus_per_worker=-1", "parallel.cpus_per_worker"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.validation_fraction=1", "data.validation_fraction"),
    ("data.replay_fraction=2", "data.replay_fraction"),
    ("encoders.text_width=0", "encoders.text_width"),
    ("objective.caption_dropout=2", "caption_dropout"),
    ("fault.fail_at_step=-1", "fault.fail_at_step"),
    ("model.overrides={dpeth: 2}", "model.overrides"),
    ("model.overrides={depth: two}", "model.overrides"),
    ("model.flavor=huge", "model.flavor"),
]


@pytest.mark.parametrize("override,key", BAD_TRAIN)
def test_train_config_ranges(override, key, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 10\n")
    with pytest.raises(ConfigError) as info:
        load(TrainConfig, path, [override])
    message = str(info.value)
    assert str(path) in message and key in message and "\n" not in message


BAD_PREP = [
    ("source.shard_size=0", "source.shard_size"),
    ("source.render_size=0", "source.render_size"),
    ("filters.min_side=-1", "filters.min_side"),
    ("filters.max_side=0", "filters.max_side"),
    ("filters.max_aspect=0.5", "filters.max_aspect"),
    ("filters.min_caption_words=-1", "filters.min_caption_words"),
    ("filters.max_caption_chars=0", "filters.max_caption_chars"),
    ("filters.max_pixels=0", "filters.max_pixels"),
    ("filters.metadata={punsafe: {min: 0.9, max: 0.1}}", "filters.metadata.punsafe"),
    ("filters.dedup.near_max_distance=65", "filters.dedup.near_max_distance"),
    ("filters.clip_score={min: 2, random_weights: true}", "filters.clip_score.min"),
    ("filters.clip_score={batch_size: 0, random_weights: true}", "filters.clip_score.batch_size"),
    ("encode.resolution=0", "encode.resolution"),
    ("encode.batch_size=0", "encode.batch_size"),
    ("encode.stage_a_batch_size=0", "encode.stage_a_batch_size"),
    ("encode.num_encoders=0", "encode.num_encoders"),
    ("encode.cpus_per_encoder=0", "encode.cpus_per_encoder"),
    ("encode.text_width=0", "encode.text_width"),
    ("output.max_rows_per_file=0", "output.max_rows_per_file"),
    ("output.shards_per_wave=0", "output.shards_per_wave"),
    ("limit_shards=0", "limit_shards"),
    ("num_cpus=0", "num_cpus"),
]


@pytest.mark.parametrize("override,key", BAD_PREP)
def test_prep_config_ranges(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load(PrepConfig, None, [override])


def test_filter_sides_and_caption_lengths_must_be_in_order():
    with pytest.raises(ConfigError, match="min_side=600 is above max_side=500"):
        FilterConfig(min_side=600, max_side=500)
    with pytest.raises(ConfigError, match="min_caption_chars=10 is above max_caption_chars=5"):
        FilterConfig(min_caption_chars=10, max_caption_chars=5)


BAD_RETRAIN = [
    ("train.optim.grad_accum=0", "train.optim.grad_accum"),
    ("prep.encode.batch_size=0", "prep.encode.batch_size"),
    ("data_mix.replay_fraction=1.5", "data_mix.replay_fraction"),
    ("gate.min_relative_improvement=-0.1", "gate.min_relative_improvement"),
    ("gate.min_absolute_improvement=-1", "gate.min_absolute_improvement"),
    ("lease.stale_after_s=0", "lease.stale_after_s"),
    ("lease.heartbeat_s=0", "lease.heartbeat_s"),
    ("lease.heartbeat_s=900", "heartbeat_s"),  # not below stale_after_s: a live run would look dead
]


@pytest.mark.parametrize("override,key", BAD_RETRAIN)
def test_retrain_config_ranges(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(RetrainConfig, None, [override])


def test_eval_spec_and_gate_ranges():
    for values, key in [({"validation_fraction": 1.0}, "validation_fraction"), ({"batch_size": 0}, "batch_size"),
                        ({"t_grid": [0.5, -0.1]}, "t_grid[1]"), ({"t_grid": []}, "t_grid")]:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            from_dict(EvalSpec, {"cache": "c", **values})
    assert from_dict(EvalSpec, {"cache": "c", "t_grid": [0.0, 1.0]}).t_grid == (0.0, 1.0)
    with pytest.raises(ConfigError, match="min_relative_improvement"):
        GateConfig(min_relative_improvement=-0.01)


def test_configs_built_in_code_are_validated_too():
    """Not only the YAML loader: the dataclasses check their ranges whenever they are built."""
    with pytest.raises(ConfigError, match=r"^OptimConfig: grad_accum: Input should be greater than 0 \(got 0\)$"):
        OptimConfig(grad_accum=0)
    with pytest.raises(ValueError, match="steps"):  # still a ValueError for callers that catch those
        TrainConfig(steps=-1)
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="every_steps"):
        dataclasses.replace(cfg.checkpoint, every_steps=0)


def test_unknown_keys_name_the_key_the_file_and_the_known_keys(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: optim: unknown key 'learning_rate' \(known keys: betas, .*lr"):
        load(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"objective: unknown key 'dropout'"):  # a plain dataclass of stages/
        load(TrainConfig, None, ["objective.dropout=0.1"])


def test_model_overrides_are_stage_c_fields():
    cfg = load(TrainConfig, None, ["model.flavor=tiny", "model.overrides={depth: 3, dropout: '0.0'}"])
    assert cfg.model.overrides == {"depth": 3, "dropout": 0.0}
    with pytest.raises(ConfigError, match=r"model.overrides: unknown Stage C fields \['dpeth'\]; .*depth"):
        load(TrainConfig, None, ["model.overrides={dpeth: 3}"])


def test_the_shipped_configs_still_load_and_rebuild_from_their_dicts():
    """The training workers rebuild the config from dataclasses.asdict: the same config comes back."""
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cls = {"prep": PrepConfig, "train": TrainConfig, "retrain": RetrainConfig}[path.name.split("_")[0]]
        cfg = load(cls, path)
        assert from_dict(cls, dataclasses.asdict(cfg)) == cfg, path


# -- the CLIP-score filter --------------------------------------------------------------------------

def test_the_clip_score_filter_refuses_random_weights_unless_asked_for():
    with pytest.raises(ConfigError, match="pretrained is not set.*random_weights: true"):
        load(PrepConfig, None, ["filters.clip_score={min: 0.3}"])
    with pytest.raises(ConfigError, match="pretrained"):
        ClipScoreConfig()
    with pytest.raises(ConfigError, match="both"):
        ClipScoreConfig(pretrained="laion2b_s34b_b79k", random_weights=True)
    assert ClipScoreConfig(random_weights=True).pretrained is None  # tests only
    assert load(PrepConfig, None, ["filters.clip_score.pretrained=laion2b_s34b_b79k"]).filters.clip_score.min == 0.28


# -- filter presets ---------------------------------------------------------------------------------

PRESET = "wuerstchen_original"


def test_explicit_values_win_over_the_preset_even_when_they_equal_the_default(tmp_path):
    cfg = FilterConfig(preset=PRESET, min_side=0, max_side=None)
    assert (cfg.min_side, cfg.max_side) == (0, None)
    path = tmp_path / "prep.yaml"
    path.write_text(f"filters:\n  preset: {PRESET}\n  min_side: 0\n  max_side: null\n")
    loaded = load(PrepConfig, path).filters
    assert (loaded.min_side, loaded.max_side) == (0, None)
    assert set(loaded.metadata) == {"pwatermark", "aesthetic|AESTHETIC_SCORE", "punsafe"}  # untouched: the preset's
    plain = FilterConfig(preset=PRESET)
    assert (plain.min_side, plain.max_side) == (512, 4096)


def test_explicit_metadata_thresholds_merge_into_the_presets_key_by_key():
    cfg = FilterConfig(preset=PRESET, metadata={"pwatermark": {"max": 0.8}, "nsfw": {"max": 0.1}})
    assert {k: (t.min, t.max) for k, t in cfg.metadata.items()} == {
        "pwatermark": (None, 0.8), "aesthetic|AESTHETIC_SCORE": (5.0, None), "punsafe": (None, 0.99), "nsfw": (None, 0.1),
    }
    loaded = load(PrepConfig, None, [f"filters.preset={PRESET}", "filters.metadata={punsafe: {max: 0.5}}"]).filters
    assert (loaded.metadata["punsafe"].max, loaded.metadata["pwatermark"].max) == (0.5, 0.5)
    # the resolved config describes itself: built again from its own dict (or copied), it is the same
    assert from_dict(FilterConfig, dataclasses.asdict(cfg)) == cfg
    assert dataclasses.replace(cfg) == cfg


def test_the_demo_checks_both_configs_before_any_work(tmp_path, capsys, monkeypatch):
    from pipelines import cli

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters: {min_side: 64\n")
    assert cli.main(["demo", "--prep-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml is not valid YAML" in err
    assert cli.main(["demo", "--steps", "0"]) == 2  # was taken as "the config's steps"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps: Input should be greater than 0 (got 0)" in err
    assert list(tmp_path.iterdir()) == [bad], "nothing was started"
