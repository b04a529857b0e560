"""The candidate study's decision rule: validation accuracy first, validation reach on a tie."""

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
