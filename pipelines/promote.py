"""`python -m pipelines.promote` / `wuerstchen promote`: the promotion gate of the model registry.

    wuerstchen promote [--name wuerstchen-stage-c] [--cache URL] [--primary train_retrieval_median_rank]
    wuerstchen promote --rollback [--name wuerstchen-stage-c]

The gate evaluates `challenger` and `champion` on the same evaluation (the challenger's spec, see
`wuerstchen evaluate`; figures already recorded under the same spec id are reused) and decides on a
primary metric, with a floor, margins and guard rails (GateConfig):

- the floor: a challenger whose training captions do not find their own latents clearly better than
  chance (train_retrieval_median_rank above max_rank_vs_chance x chance's median rank) is refused,
  even as the first champion. A prior that ignores its text samples the same kind of latent for every
  caption and stays at chance, however low its loss: the default gate cannot promote it.
- the primary metric (default: that median rank; also retrieval_median_rank on held-out captions,
  val_loss, condition_gap) must be better than the champion's by more than the margin
  (max(absolute, relative x |champion's|)); within the margin, the tie-breaker (default val_loss)
  decides by the same margin (a prior that already finds every caption's latent can still improve).
- guard rails: the challenger must not be worse than the champion on each guarded metric by more
  than its relative tolerance (default: val_loss by 5%: retrieval must not improve at the cost of the
  held-out loss).

With no champion yet, a challenger above the floor becomes the first. The evaluations run as Ray
tasks (on a GPU node when the cluster has one) when the job is connected to a cluster (`ray job
submit` sets RAY_ADDRESS), else in this process. The decision (promoted / kept / refused), the reason
and both sides' figures are written as tags on the challenger (`promotion.*`); the `challenger` alias
is then removed, and every champion is appended to the registered model's `champion_history`, which
`--rollback` walks back. An evaluation that fails (which may be transient) decides nothing: no tag is
written, the challenger keeps its alias, and the job fails, so that running it again decides.
"""

import json
import logging
import os
import sys
import time

import dataclasses
from typing import Literal

from pydantic import NonNegativeFloat, PositiveFloat

from pipelines import registry
from pipelines.cli import FAILED, job_parser, run_job
from core.config import config_dataclass

log = logging.getLogger(__name__)

# Which way each figure the gate can decide on gets better.
LOWER_IS_BETTER = {"val_loss": True, "train_retrieval_median_rank": True, "retrieval_median_rank": True,
                   "condition_gap": False, "train_retrieval_top10": False, "retrieval_top10": False}
Metric = Literal[tuple(LOWER_IS_BETTER)]


@config_dataclass
class GateConfig:
    primary: Metric = "train_retrieval_median_rank"
    min_absolute_improvement: NonNegativeFloat = 0.0
    min_relative_improvement: NonNegativeFloat = 0.01  # the challenger must be 1% better than the champion
    # The floor: train_retrieval_median_rank at most this fraction of chance's median rank. None: no floor.
    max_rank_vs_chance: PositiveFloat | None = 0.5
    tie_breaker: Metric | None = "val_loss"
    guard_rails: dict[Metric, NonNegativeFloat] = dataclasses.field(default_factory=lambda: {"val_loss": 0.05})

    def needs_retrieval(self) -> bool:
        return self.max_rank_vs_chance is not None or any(
            "retrieval" in m for m in (self.primary, self.tie_breaker or "", *self.guard_rails))


class EvaluationFailed(RuntimeError):
    """The gate could not score a version: nothing is decided, and the challenger keeps its alias."""


def _undecided(what: str, err: Exception, challenger) -> EvaluationFailed:
    return EvaluationFailed(
        f"{what}: {type(err).__name__}: {err}. Nothing was decided: version {challenger.version} keeps the alias "
        f"{registry.CHALLENGER}; run the gate again once this is fixed"
    )


def _score(version, spec, tracking_uri: str, challenger) -> dict[str, float]:
    """The version's figures under the spec: recorded, or evaluated now (a Ray task on a connected
    cluster). Any failure may be transient (storage away, a node lost), so none is a decision."""
    from latent_cache.reader import Cache
    from pipelines.evaluate import recorded, run_evaluation

    uri = f"models:/{version.name}/{version.version}"
    try:
        known = recorded(version, spec.spec_id(Cache(spec.cache).manifest))
        return known if known is not None else run_evaluation(uri, spec, tracking_uri)
    except Exception as err:
        raise _undecided(f"the gate could not evaluate {uri} on {spec.cache}", err, challenger) from err


def _improvement(metric: str, challenger: dict, champion: dict) -> float:
    """How much better the challenger is on `metric` (positive: better), in the metric's units."""
    gain = champion[metric] - challenger[metric]
    return gain if LOWER_IS_BETTER[metric] else -gain


# Figures in the units of the prior's latent space: two versions of different spaces can't compare them.
SPACE_DEPENDENT = ("val_loss", "condition_gap")


def decide(gate: GateConfig, challenger: dict, champion: dict | None, same_space: bool = True) -> tuple[str, str]:
    """The gate's decision on two versions' figures (champion None: there is none): (promoted / kept
    / refused, why). `same_space`: whether both diffuse in one latent space; if not, their losses
    (SPACE_DEPENDENT) are not compared: guard rails and a tie-breaker on them are left out, and a
    primary metric on them keeps the champion."""
    for metric in {gate.primary, gate.tie_breaker, *gate.guard_rails} - {None}:
        if metric not in challenger:
            raise ValueError(f"the gate decides on {metric}, which the evaluation did not measure "
                             "(retrieval needs the spec's retrieval_captions / train_captions)")
    if gate.max_rank_vs_chance is not None:
        rank, chance = challenger["train_retrieval_median_rank"], challenger["chance_median_rank"]
        if rank > gate.max_rank_vs_chance * chance:
            return "refused", (f"its training captions do not find their own latents: median rank {rank:.0f} > "
                               f"{gate.max_rank_vs_chance:g} x chance's {chance:.0f} (a prior that ignores its text stays at chance)")
    if champion is None:
        return "promoted", "first champion"
    if not same_space:
        if gate.primary in SPACE_DEPENDENT:
            return "kept", (f"the gate decides on {gate.primary}, which does not compare between priors of different "
                            "latent spaces (decide on a retrieval figure)")
        gate = dataclasses.replace(gate, tie_breaker=None if gate.tie_breaker in SPACE_DEPENDENT else gate.tie_breaker,
                                   guard_rails={m: t for m, t in gate.guard_rails.items() if m not in SPACE_DEPENDENT})

    def margin(metric: str) -> float:
        return max(gate.min_absolute_improvement, gate.min_relative_improvement * abs(champion[metric]))

    def compared(metric: str) -> str:
        return f"{metric} {challenger[metric]:.6g} vs champion {champion[metric]:.6g}"

    for metric, tolerance in gate.guard_rails.items():
        worse = -_improvement(metric, challenger, champion)
        if worse > tolerance * abs(champion[metric]):
            return "kept", f"guard rail: {compared(metric)} is worse by more than {tolerance:.0%}"
    gain, needed = _improvement(gate.primary, challenger, champion), margin(gate.primary)
    if gain > needed:
        return "promoted", f"{compared(gate.primary)}: improvement {gain:.6g} > required {needed:.6g}"
    if gain < -needed or gate.tie_breaker is None:
        return "kept", f"{compared(gate.primary)}: improvement {gain:.6g} <= required {needed:.6g}"
    tie_gain, tie_needed = _improvement(gate.tie_breaker, challenger, champion), margin(gate.tie_breaker)
    within = f"{compared(gate.primary)} (within the margin {needed:.6g}), so the tie-breaker: {compared(gate.tie_breaker)}"
    if tie_gain > tie_needed:
        return "promoted", f"{within}: improvement {tie_gain:.6g} > required {tie_needed:.6g}"
    return "kept", f"{within}: improvement {tie_gain:.6g} <= required {tie_needed:.6g}"


# What the decision record carries of each side's figures (as promotion.<side>_<figure> tags).
RECORDED = ("val_loss", "condition_gap", "train_retrieval_median_rank", "retrieval_median_rank", "chance_median_rank")


def promote(tracking_uri: str | None = None, name: str = registry.STAGE_C_MODEL, cache: str | None = None,
            gate: GateConfig | None = None) -> dict:
    """Runs the gate once; returns the decision record (decision: promoted / kept / refused /
    nothing_to_do, reason, and each side's figures as challenger_<figure> / champion_<figure>)."""
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
        if gate.needs_retrieval() and not spec.train_captions:
            raise ValueError("the gate measures retrieval on training captions, but the evaluation spec has train_captions=0")
    except Exception as err:
        raise _undecided(f"no evaluation spec for models:/{name}/{challenger.version}", err, challenger) from err
    record["cache"] = spec.cache
    tracking_uri = resolved_uri(tracking_uri)
    challenger_figures = _score(challenger, spec, tracking_uri, challenger)
    record.update({f"challenger_{k}": challenger_figures[k] for k in RECORDED if k in challenger_figures})
    champion_figures = None
    if champion is not None and champion.version != challenger.version:
        champion_figures = _score(champion, spec, tracking_uri, challenger)
        record.update({f"champion_{k}": champion_figures[k] for k in RECORDED if k in champion_figures})
    if champion is not None and champion.version == challenger.version:
        record.update(decision="kept", reason="the challenger is already the champion")
    else:
        spaces = {v.tags.get(registry.LATENT_SPACE_TAG, "v2") for v in (challenger, champion) if v is not None}
        decision, reason = decide(gate, challenger_figures, champion_figures, same_space=len(spaces) == 1)
        record.update(decision=decision, reason=reason, primary=gate.primary)
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


def gate_config(args) -> GateConfig:
    """The GateConfig of the command line's flags (validated as a config file's would be)."""
    guards = {"val_loss": 0.05} if not args.guard else {}
    for guard in args.guard or []:
        if guard != "none":
            metric, _, tolerance = guard.partition("=")
            guards[metric] = tolerance
    return GateConfig(primary=args.primary, min_absolute_improvement=args.min_absolute_improvement,
                      min_relative_improvement=args.min_relative_improvement,
                      max_rank_vs_chance=args.max_rank_vs_chance or None,
                      tie_breaker=None if args.tie_breaker == "none" else args.tie_breaker, guard_rails=guards)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("promote", __doc__, {
        0: "decided (promoted or kept the champion), nothing to decide (no challenger: it says so), or rolled back",
        1: "failed (an evaluation too)",
        2: "bad arguments (e.g. nothing to roll back to)",
    })
    parser.add_argument("--name", default=registry.STAGE_C_MODEL)
    parser.add_argument("--cache", help="evaluate on this cache (default: the challenger's training cache)")
    parser.add_argument("--primary", default=GateConfig.primary, choices=list(LOWER_IS_BETTER))
    parser.add_argument("--min-absolute-improvement", type=float, default=GateConfig.min_absolute_improvement)
    parser.add_argument("--min-relative-improvement", type=float, default=GateConfig.min_relative_improvement)
    parser.add_argument("--max-rank-vs-chance", type=float, default=GateConfig.max_rank_vs_chance,
                        help="the floor on train_retrieval_median_rank; 0: none")
    parser.add_argument("--tie-breaker", default=GateConfig.tie_breaker, choices=[*LOWER_IS_BETTER, "none"])
    parser.add_argument("--guard", action="append", metavar="METRIC=TOLERANCE",
                        help="a guard rail (repeatable; default val_loss=0.05); --guard none: no guard rails")
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
        out = promote(args.tracking_uri, args.name, args.cache, gate_config(args))
        print(f"{args.name}: {out['decision']}: {out['reason']}")

    return run_job("promote", gate, {EvaluationFailed: FAILED})


if __name__ == "__main__":
    sys.exit(main())
