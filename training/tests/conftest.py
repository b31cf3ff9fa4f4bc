import sys
from pathlib import Path

import pytest

# `import training` from the repository root, however pytest is started
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.tests.synthetic import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dataset"))
