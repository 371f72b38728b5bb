"""Test session setup: offline hub, throwaway HF_HOME, and the repo root on sys.path."""

import os
import sys
import tempfile
from pathlib import Path

# Before transformers is imported anywhere: nothing may reach a hub, nothing may touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
