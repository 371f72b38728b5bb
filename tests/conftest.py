"""Test session setup: offline hub, throwaway caches, and a working directory of each test's own.

Nothing a user leaves in the checkout may change a result: a run's `outputs/wsol/`, a preprocessed-array
cache, an `HF_HOME` with models in it, or the directory pytest was started from. The repository root is on
`sys.path` through pyproject's `pythonpath` (an absolute path, so changing directory keeps the imports).
"""

import os
import tempfile

import pytest

# Before transformers is imported anywhere: nothing may reach a hub, nothing may read or fill the user's
# caches. Set unconditionally: a user's own HF_HOME (or a cache variable pointing into it) would otherwise
# leak models, datasets and preprocessed arrays from earlier runs into the tests.
_HF_HOME = tempfile.mkdtemp(prefix="hf_home_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
for _variable in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
                  "HF_MODULES_CACHE"):  # fmt: skip
    os.environ.pop(_variable, None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts in an empty directory of its own: relative defaults such as `--output_dir outputs/wsol`
    resolve there, never in the checkout or wherever pytest was started."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
