"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private data home (backbone caches, default model) for one module's tests."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_LOCAL_HOME", str(path))
        yield path
