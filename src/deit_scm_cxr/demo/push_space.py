"""Push the demo as a Hugging Face Space next to a pushed model, so the model card can link to it.

    python -m deit_scm_cxr.demo.push_space --model_id org/deit-scm-cxr --space_id org/deit-scm-cxr-demo

Creates (or updates) a Gradio Space with `app.py`, `README.md` (the Space's YAML header) and
`requirements.txt` (this folder), and sets its `MODEL_ID` variable to the model. Offline (`HF_HUB_OFFLINE=1`) or
without a token it fails at once with one line and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

DEMO = Path(__file__).resolve().parent
SPACE_FILES = ("app.py", "README.md", "requirements.txt")


def push_space(model_id: str, space_id: str, private: bool = False) -> str:
    """Upload the demo to `space_id` with `MODEL_ID=model_id`; return the Space's URL."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit("push_space.py: error: the hub is offline (HF_HUB_OFFLINE=1); nothing was pushed")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(DEMO), allow_patterns=list(SPACE_FILES))
        api.add_space_variable(space_id, "MODEL_ID", model_id)
    except Exception as error:  # network and auth errors of every kind end the same way
        message = f"push_space.py: error: push to {space_id} failed ({type(error).__name__}: {error})"
        raise SystemExit(message) from error
    return f"https://huggingface.co/spaces/{space_id}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_id", required=True, help="the model's Hub id (run_wsol.py --hub_model_id)")
    parser.add_argument("--space_id", required=True, help="the Space to create or update")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    print(push_space(args.model_id, args.space_id, args.private), file=sys.stdout)


if __name__ == "__main__":
    main()
