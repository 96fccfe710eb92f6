from tiny import tiny_model, tiny_windows

from mi_opt.profile.ablation import AblationConfig, profile_ablation
from mi_opt.profile.plots import head_heatmap, layer_bars


def test_plots_are_written(tmp_path):
    profile = profile_ablation(tiny_model("llama"), tiny_windows(4, 12), AblationConfig(), progress=False)
    for path in (head_heatmap(profile, tmp_path / "h.png"), layer_bars(profile, tmp_path / "l.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heads_only = profile_ablation(tiny_model("llama"), tiny_windows(4, 12),
                                  AblationConfig(unit_kinds=("head",)), progress=False)
    assert layer_bars(heads_only, tmp_path / "none.png") is None
