"""HF checkpoint fixtures for the converter tests (builders in ``testkit.checkpoints``)."""
import pytest

from testkit.checkpoints import HFDirs


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> HFDirs:
    return HFDirs(str(tmp_path_factory.mktemp("hf_fixtures")))
