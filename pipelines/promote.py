"""`python -m pipelines.promote` / `wuerstchen promote`: the promotion gate of the model registry.

    wuerstchen promote [--name wuerstchen-stage-c] [--cache URL] [--min-relative-improvement 0.01]
    wuerstchen promote --rollback [--name wuerstchen-stage-c]

The gate evaluates `challenger` and `champion` on the same evaluation (the challenger's spec, see
`wuerstchen evaluate`; a score already recorded under the same spec id is reused) and moves
`champion` to the challenger only when its validation loss is lower by more than the margin
(max(absolute, relative x champion's loss)). With no champion yet, the challenger becomes the first.
The evaluations run as Ray tasks (on a GPU node when the cluster has one) when the job is connected
to a cluster (`ray job submit` sets RAY_ADDRESS), else in this process. The decision, the reason and
both scores are written as tags on the challenger (`promotion.*`); the `challenger` alias is then
removed, and every champion is appended to the registered model's `champion_history`, which
`--rollback` walks back. An evaluation that fails (which may be transient) decides nothing: no tag is
written, the challenger keeps its alias, and the job fails, so that running it again decides.
"""

import json
import logging
import os
import sys
import time

from pydantic import NonNegativeFloat

from pipelines import registry
from pipelines.cli import FAILED, job_parser, run_job
from core.config import config_dataclass

log = logging.getLogger(__name__)

@config_dataclass
class GateConfig:
    min_absolute_improvement: NonNegativeFloat = 0.0
    min_relative_improvement: NonNegativeFloat = 0.01  # the challenger must be 1% better than the champion


class EvaluationFailed(RuntimeError):
    """The gate could not score a version: nothing is decided, and the challenger keeps its alias."""


def _undecided(what: str, err: Exception, challenger) -> EvaluationFailed:
    return EvaluationFailed(
        f"{what}: {type(err).__name__}: {err}. Nothing was decided: version {challenger.version} keeps the alias "
        f"{registry.CHALLENGER}; run the gate again once this is fixed"
    )


def _score(version, spec, tracking_uri: str, challenger) -> float:
    """The version's val_loss under the spec: recorded, or evaluated now (a Ray task on a connected
    cluster). Any failure may be transient (storage away, a node lost), so none is a decision."""
    from latent_cache.reader import Cache
    from pipelines.evaluate import recorded, run_evaluation

    uri = f"models:/{version.name}/{version.version}"
    try:
        known = recorded(version, spec.spec_id(Cache(spec.cache).manifest))
        return known if known is not None else run_evaluation(uri, spec, tracking_uri)["val_loss"]
    except Exception as err:
        raise _undecided(f"the gate could not evaluate {uri} on {spec.cache}", err, challenger) from err


def promote(tracking_uri: str | None = None, name: str = registry.STAGE_C_MODEL, cache: str | None = None,
            gate: GateConfig | None = None) -> dict:
    """Runs the gate once; returns the decision record (decision: promoted / kept / nothing_to_do)."""
    from pipelines.evaluate import default_spec
    from pipelines.training.tracking import tracking_uri as resolved_uri

    gate = gate or GateConfig()
    mlflow_client = registry.client(tracking_uri)
    challenger = registry.version_by_alias(mlflow_client, name, registry.CHALLENGER)
    if challenger is None:
        return {"decision": "nothing_to_do", "reason": f"{name} has no version with the alias {registry.CHALLENGER}"}
    champion = registry.version_by_alias(mlflow_client, name, registry.CHAMPION)
    record = {"challenger_version": challenger.version, "champion_version": champion.version if champion else None}
    try:
        spec = default_spec(mlflow_client, challenger, cache)
    except Exception as err:
        raise _undecided(f"no evaluation spec for models:/{name}/{challenger.version}", err, challenger) from err
    record["cache"] = spec.cache
    tracking_uri = resolved_uri(tracking_uri)
    challenger_loss = record["challenger_val_loss"] = _score(challenger, spec, tracking_uri, challenger)
    if champion is None:
        record.update(decision="promoted", reason="first champion")
    elif champion.version == challenger.version:
        record.update(decision="kept", reason="the challenger is already the champion")
    else:
        champion_loss = record["champion_val_loss"] = _score(champion, spec, tracking_uri, challenger)
        needed = max(gate.min_absolute_improvement, gate.min_relative_improvement * champion_loss)
        gain = champion_loss - challenger_loss
        better = gain > needed
        record.update(
            decision="promoted" if better else "kept",
            reason=f"val_loss {challenger_loss:.6g} vs champion {champion_loss:.6g}: improvement {gain:.6g} "
                   f"{'>' if better else '<='} required {needed:.6g}",
        )
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in record.items():
        if value is not None and key != "challenger_version":
            mlflow_client.set_model_version_tag(name, challenger.version, f"promotion.{key}", str(value))
    if record["decision"] == "promoted":
        history = [v for v in registry.champion_history(mlflow_client, name) if v != challenger.version]
        registry.set_champion(mlflow_client, name, challenger.version, history + [challenger.version])
    mlflow_client.delete_registered_model_alias(name, registry.CHALLENGER)
    log.info("%s version %s: %s (%s)", name, challenger.version, record["decision"], record["reason"])
    return record


def rollback(tracking_uri: str | None = None, name: str = registry.STAGE_C_MODEL) -> dict:
    """Moves `champion` back to the champion before the current one."""
    mlflow_client = registry.client(tracking_uri)
    current = registry.version_by_alias(mlflow_client, name, registry.CHAMPION)
    if current is None:
        raise ValueError(f"{name} has no champion to roll back")
    history = [v for v in registry.champion_history(mlflow_client, name) if v != current.version]
    if not history:
        raise ValueError(f"{name} has no champion before version {current.version} to roll back to")
    previous = history[-1]
    registry.set_champion(mlflow_client, name, previous, history)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mlflow_client.set_model_version_tag(name, current.version, "promotion.rolled_back", json.dumps({"time": now, "to": previous}))
    log.info("%s: champion rolled back from version %s to %s", name, current.version, previous)
    return {"decision": "rolled_back", "from_version": current.version, "to_version": previous}


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("promote", __doc__, {
        0: "decided (promoted or kept the champion), nothing to decide (no challenger: it says so), or rolled back",
        1: "failed (an evaluation too)",
        2: "bad arguments (e.g. nothing to roll back to)",
    })
    parser.add_argument("--name", default=registry.STAGE_C_MODEL)
    parser.add_argument("--cache", help="evaluate on this cache (default: the challenger's training cache)")
    parser.add_argument("--min-absolute-improvement", type=float, default=GateConfig.min_absolute_improvement)
    parser.add_argument("--min-relative-improvement", type=float, default=GateConfig.min_relative_improvement)
    parser.add_argument("--rollback", action="store_true", help="move champion back to the previous champion")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = parser.parse_args(argv)

    def gate() -> None:
        if os.environ.get("RAY_ADDRESS") and not args.rollback:  # submitted to a cluster: evaluate on its nodes
            from core.ray_cluster import connect

            connect()
        if args.rollback:
            out = rollback(args.tracking_uri, args.name)
            print(f"{args.name}: champion rolled back from version {out['from_version']} to {out['to_version']}")
            return
        out = promote(args.tracking_uri, args.name, args.cache,
                      GateConfig(args.min_absolute_improvement, args.min_relative_improvement))
        print(f"{args.name}: {out['decision']}: {out['reason']}")

    return run_job("promote", gate, {EvaluationFailed: FAILED})


if __name__ == "__main__":
    sys.exit(main())
