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
