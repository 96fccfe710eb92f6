import pytest

from mi_opt.errors import MiOptError
from mi_opt.options import parse_options
from mi_opt.policy.layer_skip import LayerSkipConfig
from mi_opt.profile.ablation import AblationConfig
from mi_opt.profile.scorers import SCORERS


def test_a_wrong_type_names_the_key():
    with pytest.raises(MiOptError, match="option 'batch_size' must be an integer, got 'two'"):
        SCORERS.get("ablation").make_config({"batch_size": "two"})
    with pytest.raises(MiOptError, match="'cache_budget_mb' must be a number"):
        parse_options(AblationConfig, {"cache_budget_mb": "big"}, "scorer 'ablation'")
    with pytest.raises(MiOptError, match="unknown LayerSkipConfig option"):
        parse_options(LayerSkipConfig, {"n_dorp": 2}, "LayerSkipConfig")


def test_good_options_parse_as_before():
    config = SCORERS.get("ablation").make_config({"unit_kinds": "layer,head", "batch_size": 2,
                                                  "cache_budget_mb": 64})
    assert config.unit_kinds == ("layer", "head") and config.batch_size == 2
    assert parse_options(AblationConfig, None, "x") == AblationConfig()
