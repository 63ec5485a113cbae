"""The promotion gate's decision on two versions' figures (the registry around it: test_registry)."""

import argparse

import pytest

from core.config import ConfigError
from pipelines.promote import GateConfig, decide, gate_config


def figures(rank: float, loss: float, chance: float = 20.5, **more) -> dict:
    return {"train_retrieval_median_rank": rank, "val_loss": loss, "chance_median_rank": chance, **more}


def test_the_floor_refuses_a_prior_at_chance_even_as_the_first_champion():
    gate = GateConfig()
    decision, why = decide(gate, figures(rank=19, loss=0.01), None)
    assert decision == "refused" and "median rank 19 > 0.5 x chance's 20" in why
    assert decide(gate, figures(rank=19, loss=0.01), figures(rank=30, loss=0.5))[0] == "refused"
    assert decide(gate, figures(rank=10, loss=0.5), None) == ("promoted", "first champion")  # 10 <= 0.5 x 20.5
    assert decide(GateConfig(max_rank_vs_chance=None), figures(rank=19, loss=0.5), None)[0] == "promoted"


def test_the_primary_metric_decides_with_its_margin_and_the_tie_breaker_within_it():
    gate = GateConfig()
    champion = figures(rank=4, loss=0.100)
    assert decide(gate, figures(rank=3, loss=0.100), champion)[0] == "promoted"
    kept, why = decide(gate, figures(rank=5, loss=0.090), champion)
    assert kept == "kept" and "train_retrieval_median_rank 5 vs champion 4" in why  # worse retrieval, better loss
    # the same rank (both at the top): the held-out loss decides, by the same 1% margin
    promoted, why = decide(gate, figures(rank=4, loss=0.098), champion)
    assert promoted == "promoted" and "tie-breaker: val_loss 0.098 vs champion 0.1" in why
    assert decide(gate, figures(rank=4, loss=0.0995), champion)[0] == "kept"
    assert decide(GateConfig(tie_breaker=None), figures(rank=4, loss=0.05), champion)[0] == "kept"
    # higher is better for the condition gap
    loss_gate = GateConfig(primary="condition_gap", max_rank_vs_chance=None, guard_rails={})
    assert decide(loss_gate, figures(4, 0.1, condition_gap=0.02), figures(4, 0.1, condition_gap=0.01))[0] == "promoted"
    assert decide(loss_gate, figures(4, 0.1, condition_gap=0.01), figures(4, 0.1, condition_gap=0.02))[0] == "kept"


def test_a_guard_rail_keeps_the_champion_when_the_loss_gets_much_worse():
    gate = GateConfig()
    champion = figures(rank=4, loss=0.100)
    kept, why = decide(gate, figures(rank=2, loss=0.106), champion)
    assert kept == "kept" and why.startswith("guard rail: val_loss 0.106 vs champion 0.1 is worse by more than 5%")
    assert decide(gate, figures(rank=2, loss=0.104), champion)[0] == "promoted"
    assert decide(GateConfig(guard_rails={}), figures(rank=2, loss=0.2), champion)[0] == "promoted"


def test_losses_of_priors_in_different_latent_spaces_are_not_compared():
    """A challenger diffusing in another latent space than the champion: its loss is in other units
    (0.06 in e against 0.0003 in (e + 1) / 42), so the guard rail and tie-breaker on val_loss are left
    out and retrieval decides; a gate whose primary metric is the loss keeps the champion."""
    champion, challenger = figures(rank=4, loss=0.0003), figures(rank=2, loss=0.06)
    assert decide(GateConfig(), challenger, champion)[0] == "kept"  # same space: the guard rail holds
    assert decide(GateConfig(), challenger, champion, same_space=False)[0] == "promoted"
    assert decide(GateConfig(), figures(rank=4, loss=0.06), champion, same_space=False)[0] == "kept"  # no tie-breaker
    kept, why = decide(GateConfig(primary="val_loss"), figures(rank=2, loss=0.0001), champion, same_space=False)
    assert kept == "kept" and "does not compare between priors of different latent spaces" in why


def test_a_metric_the_evaluation_did_not_measure_is_an_error_and_bad_configs_are_refused():
    with pytest.raises(ValueError, match="decides on train_retrieval_median_rank, which the evaluation did not measure"):
        decide(GateConfig(), {"val_loss": 0.1}, None)
    with pytest.raises(ConfigError, match="primary"):
        GateConfig(primary="psnr")
    with pytest.raises(ConfigError, match="guard_rails"):
        GateConfig(guard_rails={"val_loss": -0.1})


def test_the_command_line_flags_make_the_gate_config():
    def args(**given):
        base = dict(primary="train_retrieval_median_rank", min_absolute_improvement=0.0, min_relative_improvement=0.01,
                    max_rank_vs_chance=0.5, tie_breaker="val_loss", guard=None)
        return argparse.Namespace(**{**base, **given})

    assert gate_config(args()) == GateConfig()
    loss_only = gate_config(args(primary="val_loss", max_rank_vs_chance=0, tie_breaker="none", guard=["none"]))
    assert loss_only == GateConfig(primary="val_loss", max_rank_vs_chance=None, tie_breaker=None, guard_rails={})
    assert gate_config(args(guard=["val_loss=0.1", "retrieval_median_rank=0.5"])).guard_rails == {
        "val_loss": 0.1, "retrieval_median_rank": 0.5}
