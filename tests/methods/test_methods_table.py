"""One vocabulary (issue 31): the methods table (`pyramiddrop.methods`) is what the registered scorers are, and every
list of method names (config, budget, harnesses, command line) is read from it."""

import pytest

from pyramiddrop import budget, config, methods
from pyramiddrop.methods import BEFORE_AND_INSIDE, BEFORE_LLM, BY_NAME, ONE_DROP, PYRAMID, TABLE


def test_every_registered_scorer_is_in_the_table_and_every_table_scorer_is_registered():
    from pyramiddrop.scoring import MERGES, SCORERS, STOCHASTIC_SCORERS

    built_in = {name for name, scorer in SCORERS.items() if scorer.__module__.startswith("pyramiddrop.scoring")}
    assert set(methods.SCORER_NAMES) == built_in
    assert {method.scorer for method in TABLE} == built_in
    for method in TABLE:  # the table's flags say what the registry says about its scorer
        assert method.stochastic == (method.scorer in STOCHASTIC_SCORERS), method.name
        assert method.merge == (method.scorer in MERGES), method.name
        assert method.extra_kept is None or method.merge, method.name  # only a merge keeps tokens beyond the count


def test_every_method_builds_a_config_with_its_fields():
    for method in TABLE:
        layer_list, ratios = {BEFORE_LLM: ([0], [0.25]), BEFORE_AND_INSIDE: ([0, 2], [0.25, 0.1])}.get(
            method.drops, ([2], [0.25])
        )
        built = config.PyramidDropConfig(layer_list, ratios, **methods.config_fields(method.name))
        assert built.method == method.scorer
        for key, value in method.fields.items():
            assert getattr(built, key) == value


def test_the_lists_of_names_come_from_the_table():
    from pyramiddrop.cli import evaluate as eval_command
    from pyramiddrop.settings import ALL_METHODS as HARNESS_METHODS

    assert config.BUILTIN_METHODS == methods.SCORER_NAMES
    assert budget.ALL_METHODS == methods.NAMES == tuple(BY_NAME)
    assert set(budget.METHODS) == set(methods.names(PYRAMID))
    own = set(methods.names(ONE_DROP)) | set(methods.names(BEFORE_LLM)) | set(methods.names(BEFORE_AND_INSIDE))
    assert set(budget.SCHEDULE_METHODS) == own
    assert ("none", *methods.names(ONE_DROP), *methods.names(PYRAMID)) == HARNESS_METHODS
    assert all(name in methods.describe() for name in methods.NAMES)  # the --methods help
    assert set(eval_command.BASELINES) <= set(methods.NAMES)


def test_every_method_has_a_schedule_at_a_budget():
    for name in methods.NAMES:
        if BY_NAME[name].video_only:  # keeps every image token: refused, with what to do instead
            with pytest.raises(ValueError, match=f"method '{name}' merges video frames only"):
                budget.schedule_for(name, 1 / 4, 8, 144)
            continue
        scheduled = budget.schedule_for(name, 1 / 4, 8, 144)
        assert scheduled.method == BY_NAME[name].scorer, name
        assert (scheduled.layer_list == [0]) == (BY_NAME[name].drops == BEFORE_LLM), name
