"""`python -m pipelines.promote` / `wuerstchen promote`: the promotion gate of the model registry.

    wuerstchen promote [--name wuerstchen-stage-c] [--cache URL] [--min-relative-improvement 0.01]
    wuerstchen promote --rollback [--name wuerstchen-stage-c]

The gate evaluates `challenger` and `champion` on the same evaluation (the challenger's spec, see
`wuerstchen evaluate`; a score already recorded under the same spec id is reused) and moves
`champion` to the challenger only when its validation loss is lower by more than the margin
(max(absolute, relative x champion's loss)). With no champion yet, the challenger becomes the first.
An evaluation that fails or is missing never promotes. The decision, the reason and both scores are
written as tags on the challenger (`promotion.*`); the `challenger` alias is then removed, and every
champion is appended to the registered model's `champion_history`, which `--rollback` walks back.

Exit codes: 0 decided (promoted or kept the champion), nothing to decide (no challenger: it says
so), or rolled back; 2 bad arguments (e.g. nothing to roll back to); 1 failed.
"""

import argparse
import json
import logging
import sys
import time

from pydantic import NonNegativeFloat

from pipelines import registry
from pipelines.config import config_dataclass

log = logging.getLogger(__name__)

@config_dataclass
class GateConfig:
    min_absolute_improvement: NonNegativeFloat = 0.0
    min_relative_improvement: NonNegativeFloat = 0.01  # the challenger must be 1% better than the champion


def _score(mlflow_client, version, spec) -> tuple[float | None, str | None]:
    """(val_loss, None) under the spec, evaluated now unless recorded; (None, why) when it failed."""
    from data_prep.cache import Cache
    from pipelines.evaluate import evaluate_model, recorded

    try:
        spec_id = spec.spec_id(Cache(spec.cache).manifest)
        known = recorded(version, spec_id)
        if known is not None:
            return known, None
        return evaluate_model(f"models:/{version.name}/{version.version}", spec)["val_loss"], None
    except Exception as err:  # any failure is a failed evaluation, which never promotes
        log.warning("evaluation of models:/%s/%s failed: %s: %s", version.name, version.version, type(err).__name__, err)
        return None, f"{type(err).__name__}: {err}"


def promote(tracking_uri: str | None = None, name: str = registry.STAGE_C_MODEL, cache: str | None = None,
            gate: GateConfig | None = None) -> dict:
    """Runs the gate once; returns the decision record (decision: promoted / kept / nothing_to_do)."""
    from pipelines.evaluate import default_spec

    gate = gate or GateConfig()
    mlflow_client = registry.client(tracking_uri)
    challenger = registry.version_by_alias(mlflow_client, name, registry.CHALLENGER)
    if challenger is None:
        return {"decision": "nothing_to_do", "reason": f"{name} has no version with the alias {registry.CHALLENGER}"}
    champion = registry.version_by_alias(mlflow_client, name, registry.CHAMPION)
    record = {"challenger_version": challenger.version, "champion_version": champion.version if champion else None}
    try:
        spec = default_spec(mlflow_client, challenger, cache)
        record["cache"] = spec.cache
    except Exception as err:
        spec = None
        record.update(decision="kept", reason=f"no evaluation spec for the challenger: {err}")
    if spec is not None:
        challenger_loss, failure = _score(mlflow_client, challenger, spec)
        record["challenger_val_loss"] = challenger_loss
        if failure:
            record.update(decision="kept", reason=f"the challenger's evaluation failed: {failure}")
        elif champion is None:
            record.update(decision="promoted", reason="first champion")
        elif champion.version == challenger.version:
            record.update(decision="kept", reason="the challenger is already the champion")
        else:
            champion_loss, failure = _score(mlflow_client, champion, spec)
            record["champion_val_loss"] = champion_loss
            if failure:
                record.update(decision="kept", reason=f"the champion could not be evaluated on the same spec: {failure}")
            else:
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
    parser = argparse.ArgumentParser(prog="wuerstchen promote", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--name", default=registry.STAGE_C_MODEL)
    parser.add_argument("--cache", help="evaluate on this cache (default: the challenger's training cache)")
    parser.add_argument("--min-absolute-improvement", type=float, default=GateConfig.min_absolute_improvement)
    parser.add_argument("--min-relative-improvement", type=float, default=GateConfig.min_relative_improvement)
    parser.add_argument("--rollback", action="store_true", help="move champion back to the previous champion")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.rollback:
            out = rollback(args.tracking_uri, args.name)
            print(f"{args.name}: champion rolled back from version {out['from_version']} to {out['to_version']}")
            return 0
        out = promote(args.tracking_uri, args.name, args.cache,
                      GateConfig(args.min_absolute_improvement, args.min_relative_improvement))
    except ValueError as err:
        print(f"wuerstchen promote: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {out['decision']}: {out['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
