"""Shared test helpers."""
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def recording_ops():
    """An `ops` namespace whose Linear/Conv2d record every layer they build: (ops, built layers)."""
    made = []

    class Linear(torch.nn.Linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    class Conv2d(torch.nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    return SimpleNamespace(Linear=Linear, Conv2d=Conv2d), made
