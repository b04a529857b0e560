"""The candidate study's decision rule: validation accuracy first, validation reach on a tie."""

from pathlib import Path

from research.candidate_study import TIE_POINTS, decide


def test_better_validation_accuracy_wins_and_a_tie_goes_to_the_closer_reach():
    reach = {"named_perturbed": 15.8, "generic_far": 14.7}
    both = ["named_perturbed", "generic_far"]
    assert decide({"named_perturbed": 99.0, "generic_far": 97.0}, reach, both) == "named_perturbed"
    assert decide({"named_perturbed": 99.0, "generic_far": 99.0 - TIE_POINTS / 2}, reach, both) == (
        "generic_far"
    )
    # a candidate whose images miss the image targets is not chosen while another is eligible
    assert (
        decide({"named_perturbed": 98.0, "generic_far": 99.0}, reach, ["named_perturbed"])
        == "named_perturbed"
    )


def test_three_candidates_tie_within_one_prediction_of_the_best_and_go_to_the_closest_reach():
    val = {"generic_far": 97.9, "named_perturbed": 97.9 - TIE_POINTS / 2, "named_uncertain": 96.0}
    reach = {"generic_far": 14.7, "named_perturbed": 14.2, "named_uncertain": 13.0}
    # named_uncertain reaches closest but is more than one prediction below the best
    assert decide(val, reach, list(val)) == "named_perturbed"


def test_the_uncertain_candidate_is_the_named_walks_keeping_the_least_sure_above_an_even_chance():
    from research.evaluate import (
        NAMED_PROMPTS,
        UNCERTAIN_KEEP,
        generic_prompts,
        shipped_candidates,
    )
    from tailseed.stages.augment_pipeline import load_config

    card = {"split": {"tail_classes": [4, 7]}}
    found = shipped_candidates(True, True, generic_prompts(card), NAMED_PROMPTS)
    assert found["named_uncertain"] == (*found["named_perturbed"], *UNCERTAIN_KEEP)
    config = load_config(Path("configs/seen.yaml"), list(found["named_uncertain"]))
    assert (config.filter.keep, config.filter.min_score) == ("uncertain", 0.5)
    assert config.walk.perturb_angle == 0.3 and config.filter.enabled


def test_the_tie_is_one_rare_validation_prediction_of_the_regime():
    from research.candidate_study import tie_points

    assert tie_points(40, 3, 2) == TIE_POINTS
    val = {"config": 96.0, "uncertain": 96.0 - tie_points(80, 3, 2) * 1.5}
    reach = {"config": 15.0, "uncertain": 14.0}
    # half a seen tie apart: tied under the seen regime's tie, not under never-seen's
    assert decide(val, reach, list(val)) == "uncertain"
    assert decide(val, reach, list(val), tie_points(80, 3, 2)) == "config"


def test_the_never_seen_uncertain_candidate_is_the_default_config_keeping_the_least_sure():
    from research.evaluate import UNCERTAIN_KEEP, shipped_candidates
    from tailseed.stages.augment_pipeline import load_config

    found = shipped_candidates(True, True)
    assert found["uncertain"] == ("filter.enabled=true", *UNCERTAIN_KEEP)
    config = load_config(Path("configs/default.yaml"), list(found["uncertain"]))
    plain = load_config(Path("configs/default.yaml"))
    assert (config.filter.keep, config.filter.min_score) == ("uncertain", 0.5)
    assert (config.walk, config.tone, config.generate) == (plain.walk, plain.tone, plain.generate)


def test_exactly_one_prediction_apart_is_a_tie_whatever_the_float_rounding():
    # the seen study's validation: 98.33 (40 x 3 predictions, 2 recipes) against 97.92
    val = {"generic_far": 97.91666666666667, "named_uncertain": 98.33333333333333}
    reach = {"generic_far": 14.73, "named_uncertain": 16.30}
    assert decide(val, reach, list(val)) == "generic_far"
    assert decide({**val, "generic_far": 97.9}, reach, list(val)) == "named_uncertain"


def test_fresh_uncertain_is_the_shipped_seen_config_keeping_the_least_sure():
    """`fresh_uncertain` differs from configs/seen.yaml (fresh noise, pool 8, floor 0.5) in the
    keep rule only."""
    from research.evaluate import (
        NAMED_PROMPTS,
        generic_prompts,
        shipped_candidates,
    )
    from tailseed.stages.augment_pipeline import load_config

    card = {"split": {"tail_classes": [4, 7]}}
    found = shipped_candidates(True, True, generic_prompts(card), NAMED_PROMPTS)
    config = load_config(Path("configs/seen.yaml"), list(found["fresh_uncertain"]))
    shipped = load_config(Path("configs/seen.yaml"), list(found["generic_fresh"]))
    assert (config.filter.keep, config.filter.min_score) == ("uncertain", 0.5)
    assert (config.filter.floor, config.filter.pool_factor) == (0.5, 8)
    assert config.walk == shipped.walk and config.generate == shipped.generate
    assert shipped.filter.keep != "uncertain"


def test_the_plain_prompt_baseline_names_the_class_in_both_regimes():
    """configs/seen.yaml prompts its tail classes with the generic caption; the "plain prompts"
    baseline must prompt them with their own name, and in the never-seen regime (no overrides)
    it stays the configuration it was (same config hash: the same runs)."""
    from research.evaluate import variants
    from tailseed.pipeline.config import config_hash
    from tailseed.stages.augment_pipeline import load_config
    from tailseed.stages.select import prompt_for

    card = {"split": {"tail_classes": [4, 7]}, "guidance_scale": 2.0, "num_inference_steps": 20}
    for regime, path in (("seen", "configs/seen.yaml"), ("never-seen", "configs/default.yaml")):
        prompt = {v.key: v for v in variants(card, regime, True)}["prompt"]
        config = load_config(Path(path), list(prompt.overrides))
        assert prompt_for("four", config.select) == "a photo of the digit four"
        without = [o for o in prompt.overrides if not o.startswith("select.prompt_overrides")]
        if regime == "never-seen":
            assert config_hash(config) == config_hash(load_config(Path(path), without))
        else:
            assert prompt_for("four", load_config(Path(path), without).select) != (
                "a photo of the digit four"
            )


def test_the_study_takes_the_filtered_baselines_as_candidates():
    from research.candidate_study import study_candidates
    from research.evaluate import variants

    card = {"split": {"tail_classes": [4, 7]}, "guidance_scale": 2.0, "num_inference_steps": 20}
    found = study_candidates(card, "seen")
    baselines = {v.key: v.overrides for v in variants(card, "seen", True)}
    assert found["prompt"] == baselines["prompt"] and found["generic"] == baselines["generic"]
    assert "generic_fresh" in found and "fresh_uncertain" in found
    assert "generic" not in study_candidates(card, "never-seen")
