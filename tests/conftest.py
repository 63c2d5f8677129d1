"""Shared fixtures: models are loaded once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    from adore.models import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def tiny_gqa():
    from adore.models import load_model

    return load_model("random:tiny-gqa")


@pytest.fixture(scope="session")
def smollm2():
    from adore.models import load_model

    return load_model("smollm2-135m")
