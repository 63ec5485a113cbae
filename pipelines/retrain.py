"""`python -m pipelines.retrain --config FILE [--set key=value ...]` / `wuerstchen retrain`: the
scheduled retraining workflow, as one job.

1. Find the source shards the cache does not hold yet; with none, stop: nothing is trained or
   registered, and the run says so (a success: exit code 0, decision "nothing_to_do").
2. Prepare only those shards into the cache.
3. Fine-tune Stage C from the current champion (pinned to its version when the attempt starts) on
   the cache: every row, or the new rows plus a replay share of the old (`data_mix`).
4.-5. Register the result as `challenger` and run the promotion gate (evaluation on the fixed
   held-out rows of the whole cache, against the champion, as Ray tasks). An evaluation that fails
   decides nothing: the run fails (exit code 1) and keeps its attempt, and rerunning it runs the gate again.
6. Write a summary (data, versions, scores, decision) to stdout, to `<state>/summaries/<attempt>.json`
   and as tags on the training run.

Idempotent: a lease in `<state>` lets one run go at a time (another one refuses, exit code 4; a run
that loses its lease, taken over or its heartbeat failing, stops before its next phase, exit code 5); an
attempt is recorded in `<state>/attempt.json` before any work, so a run that crashed is finished
by rerunning the same command: data prep resumes, training resumes from its newest checkpoint, and
registration finds the version it already made (no duplicate). `<state>` defaults to
`<train.checkpoint.storage_path>/retrain`.
"""

import dataclasses
import hashlib
import json
import logging
import sys
import time

from pydantic import PositiveFloat

from data_prep.config import PrepConfig
from core.config import Probability, config_dataclass, load
from pipelines.cli import FAILED, add_config_arguments, job_parser, run_job
from pipelines.promote import EvaluationFailed, GateConfig
from pipelines.training.config import TrainConfig

log = logging.getLogger(__name__)

# Exit codes of retrain's lease, beside those every job shares (pipelines.cli).
ALREADY_RUNNING, LEASE_LOST = 4, 5
ATTEMPT = "attempt.json"


@config_dataclass
class DataMix:
    mode: str = "all"  # "all": every row of the cache; "replay": the new rows + replay_fraction of the old
    replay_fraction: Probability = 0.25

    def __post_init__(self):
        if self.mode not in ("all", "replay"):
            raise ValueError(f"data_mix.mode must be 'all' or 'replay', got {self.mode!r}")


@config_dataclass
class LeaseConfig:
    stale_after_s: PositiveFloat = 600.0
    heartbeat_s: PositiveFloat = 30.0

    def __post_init__(self):
        if self.heartbeat_s >= self.stale_after_s:
            raise ValueError(f"lease.heartbeat_s={self.heartbeat_s} must be below lease.stale_after_s="
                             f"{self.stale_after_s}: a running job's lease would look dead and be taken over")


@config_dataclass
class RetrainConfig:
    prep: PrepConfig = dataclasses.field(default_factory=PrepConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model_name: str = "wuerstchen-stage-c"
    decoders: str | None = None  # a registered decoder bundle for the new versions, e.g. models:/wuerstchen-decoders/1
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    data_mix: DataMix = dataclasses.field(default_factory=DataMix)
    state_url: str | None = None  # default: <train.checkpoint.storage_path>/retrain
    lease: LeaseConfig = dataclasses.field(default_factory=LeaseConfig)


def state_url(cfg: RetrainConfig) -> str:
    from core.storage import join

    return cfg.state_url or join(cfg.train.checkpoint.storage_path.rstrip("/"), "retrain")


def new_shards(cfg: RetrainConfig) -> list[str]:
    from core.storage import read_text, resolve
    from latent_cache.manifest import MANIFEST
    from data_prep.sources import reader_for

    fs, root = resolve(cfg.prep.output.url)
    text = read_text(fs, f"{root}/{MANIFEST}")
    held = set(json.loads(text)["shards"]) if text else set()
    # prep.limit_shards caps an attempt as it caps prep: the attempt trains on exactly what it prepares.
    _, listed = reader_for(cfg.prep.source).list_shards(cfg.prep.source.url)
    return [url for url, _ in listed if url not in held][: cfg.prep.limit_shards]


def _champion(uri: str, name: str):
    from pipelines import registry

    return registry.version_by_alias(registry.client(uri), name, registry.CHAMPION)


def _start_attempt(cfg: RetrainConfig, uri: str, shards: list[str]) -> dict:
    champion = _champion(uri, cfg.model_name)
    attempt_id = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()[:12]
    return {
        "attempt_id": attempt_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "new_shards": shards,
        "base_version": champion.version if champion else None,
        "train_run_name": f"{cfg.train.checkpoint.run_name}-retrain-{attempt_id}",
    }


def _check_lora_base(cfg: RetrainConfig, attempt: dict) -> None:
    """A LoRA retrain fine-tunes an adapter on the champion, and the registered adapter pins that
    version: with no champion yet there is no registered base, and registration after training would
    refuse the run. Refused before anything is prepared or trained."""
    if cfg.train.model.lora is not None and attempt["base_version"] is None:
        raise ValueError(f"train.model.lora: a LoRA retrain fine-tunes the champion of {cfg.model_name!r}, which has "
                         f"none yet; register and promote a base version first (wuerstchen register, wuerstchen "
                         f"promote), or run the first retrain without train.model.lora")


def _train_config(cfg: RetrainConfig, attempt: dict) -> TrainConfig:
    train = dataclasses.replace(cfg.train)
    train.data = dataclasses.replace(train.data, cache=cfg.prep.output.url)
    if cfg.data_mix.mode == "replay" and attempt["base_version"] is not None:
        train.data.shards, train.data.replay_fraction = list(attempt["new_shards"]), cfg.data_mix.replay_fraction
    init = f"models:/{cfg.model_name}/{attempt['base_version']}" if attempt["base_version"] else train.model.init
    train.model = dataclasses.replace(train.model, init=init)
    train.checkpoint = dataclasses.replace(train.checkpoint, run_name=attempt["train_run_name"])
    return train


def run_retrain(cfg: RetrainConfig) -> dict:
    """One retraining run; returns its summary (decision: promoted / kept / refused / nothing_to_do)."""
    from core.storage import join, read_text, resolve, write_text_atomically
    from core.ray_cluster import connect
    from data_prep.runner import run_prep
    from data_prep.summary import format_summary
    from pipelines import registry
    from pipelines.lease import Lease
    from pipelines.promote import promote
    from pipelines.register import register_stage_c
    from pipelines.train import run_training
    from pipelines.training.tracking import tracking_uri

    uri = tracking_uri(cfg.train.tracking.tracking_uri)
    state = state_url(cfg)
    fs, root = resolve(state)
    lease = Lease(state, cfg.lease.stale_after_s, cfg.lease.heartbeat_s)
    with lease:
        text = read_text(fs, join(root, ATTEMPT))
        if text is not None:
            attempt = json.loads(text)
            print(f"resuming attempt {attempt['attempt_id']} (started {attempt['started']}): "
                  f"{len(attempt['new_shards'])} new shards", flush=True)
            _check_lora_base(cfg, attempt)
        else:
            shards = new_shards(cfg)
            if not shards:
                summary = {"decision": "nothing_to_do", "reason": f"no new source shards in {cfg.prep.source.url}",
                           "cache": cfg.prep.output.url, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                print(f"nothing to do: every shard of {cfg.prep.source.url} is in the cache {cfg.prep.output.url}; "
                      f"nothing trained or registered", flush=True)
                return summary
            attempt = _start_attempt(cfg, uri, shards)
            _check_lora_base(cfg, attempt)  # before the attempt is recorded: a rerun once a champion exists starts afresh
            write_text_atomically(fs, join(root, ATTEMPT), json.dumps(attempt, indent=2) + "\n")
            print(f"attempt {attempt['attempt_id']}: {len(shards)} new shards; base champion "
                  f"{attempt['base_version'] or '(none yet: training from the configured init)'}", flush=True)

        lease.check("data prep")
        print("== prep: the attempt's new shards only", flush=True)
        # Exactly the attempt's shards: one that arrived since it started is the next attempt's, in full.
        prep_summary = run_prep(cfg.prep, shards=attempt["new_shards"])
        print(format_summary(prep_summary), flush=True)

        lease.check("training")
        train_cfg = _train_config(cfg, attempt)
        print(f"== fine-tune: {train_cfg.steps} steps from {train_cfg.model.init or 'scratch'} "
              f"({cfg.data_mix.mode} data), run {train_cfg.checkpoint.run_name}", flush=True)
        _, run_id = run_training(train_cfg)

        lease.check("registration")
        print("== register and gate", flush=True)
        version = register_stage_c(uri, cfg.model_name, run_id=run_id, decoders=cfg.decoders)
        mlflow_client = registry.client(uri)
        recorded = mlflow_client.get_model_version(cfg.model_name, version["version"]).tags
        if "promotion.decision" in recorded:  # decided by the run that crashed after the gate
            decision = {k.split(".", 1)[1]: v for k, v in recorded.items() if k.startswith("promotion.")}
        else:
            lease.check("the promotion gate")
            # The gate's evaluations run as Ray tasks on the cluster (a GPU node when it has one), not
            # in this driver on the head node. A failed one raises: no decision, the attempt stays, and
            # rerunning the job runs the gate again.
            connect(cfg.prep.ray_address, cfg.prep.num_cpus)
            decision = promote(uri, cfg.model_name, cfg.prep.output.url, cfg.gate)
        champion = _champion(uri, cfg.model_name)
        summary = {
            "attempt_id": attempt["attempt_id"],
            "started": attempt["started"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "new_shards": attempt["new_shards"],
            "cache": cfg.prep.output.url,
            "cache_rows": prep_summary["manifest"]["rows_written"],
            "rows_added": prep_summary["rows_written"],
            "data_mix": dataclasses.asdict(cfg.data_mix),
            "base_version": attempt["base_version"],
            "training_run_id": run_id,
            "candidate_version": version["version"],
            "candidate_created": version["created"],
            "decision": decision.get("decision"),
            "reason": decision.get("reason"),
            **{k: v for k, v in decision.items() if k.startswith(("challenger_", "champion_")) and k != "champion_version"},
            "champion_version": champion.version if champion else None,
        }
        lease.check("writing the summary")
        write_text_atomically(fs, join(root, "summaries", f"{attempt['attempt_id']}.json"), json.dumps(summary, indent=2) + "\n")
        for key in ("attempt_id", "decision", "candidate_version", "champion_version", "base_version"):
            mlflow_client.set_tag(run_id, f"retrain.{key}", str(summary[key]))
        mlflow_client.set_tag(run_id, "retrain.summary", json.dumps(summary)[:4900])
        mlflow_client.set_model_version_tag(cfg.model_name, version["version"], "retrain.attempt_id", attempt["attempt_id"])
        fs.delete_file(join(root, ATTEMPT))  # done: the next run looks for new shards again
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("retrain", __doc__, {  # what a Ray job's status and a scheduler see
        0: "done (promoted, the champion kept, or nothing to do)",
        1: "failed (an evaluation of the gate too: rerunning runs the gate again)",
        2: "bad configuration, or a cache made by other encoders",
        ALREADY_RUNNING: "refused: another run holds the lease; nothing was touched",
        LEASE_LOST: "stopped between phases because this run lost its lease (another run may have taken "
                    "over): rerun later to finish the attempt",
    })
    add_config_arguments(parser, "YAML file (see configs/retrain_*.yaml)", "data_mix.mode=replay")
    args = parser.parse_args(argv)
    from pipelines.lease import LeaseHeldError, LeaseLostError

    def retrain() -> None:
        summary = run_retrain(load(RetrainConfig, args.config, args.overrides))
        print("retrain summary: " + json.dumps(summary, indent=2), flush=True)

    return run_job("retrain", retrain, {LeaseHeldError: ALREADY_RUNNING, LeaseLostError: LEASE_LOST, EvaluationFailed: FAILED})


if __name__ == "__main__":
    sys.exit(main())
