import pytest
import torch
from torch import nn

from mi_opt.hooks import Hook, attached


def test_hooks_are_removed_even_on_error():
    lin = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with attached([Hook(lin, lambda m, a, o: o * 0), Hook(lin, lambda m, a: (a[0] * 2,), kind="forward_pre")]):
            assert torch.count_nonzero(lin(torch.ones(1, 2))) == 0
            raise RuntimeError("boom")
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_replace_hook_stands_in_for_forward_and_is_removed_on_error():
    lin = torch.nn.Linear(2, 2)
    seen = []
    with pytest.raises(RuntimeError):
        with attached([Hook(lin, lambda x: torch.zeros(1, 2), kind="replace"),
                       Hook(lin, lambda m, a, out: seen.append(out.sum().item()))]):
            assert torch.count_nonzero(lin(torch.ones(1, 2))) == 0
            raise RuntimeError("boom")
    assert seen == [0.0]                       # the module's own hooks ran around the stand-in
    assert "forward" not in lin.__dict__ and torch.count_nonzero(lin(torch.ones(1, 2))) > 0
