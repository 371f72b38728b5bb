"""Test session setup: offline hub, throwaway HF_HOME (the repo root is on sys.path through pyproject's
`pythonpath`)."""

import os
import tempfile

# Before transformers is imported anywhere: nothing may reach a hub, nothing may touch the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
