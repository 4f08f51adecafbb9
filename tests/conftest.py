import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One pretokenized-data cache for the whole session (tokenizers train once)."""
    return tmp_path_factory.mktemp("somoe-cache")
