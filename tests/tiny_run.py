"""The tiny main-job run that tests train in CPU seconds: its flags, and one call that trains it."""

from __future__ import annotations

from pathlib import Path

TINY = [
    "--num_phantoms", "48", "--phantom_size", "96", "--image_size", "64",
    "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,patch_size=8",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
]  # fmt: skip


def train_tiny(output: Path, steps: int = 2, *extra: str) -> Path:
    """`run_wsol.main` with the tiny flags for `steps` steps into `output` (returned)."""
    import deit_scm_cxr.training.run as run_wsol

    run_wsol.main([*TINY, "--output_dir", str(output), "--max_train_steps", str(steps), *extra])
    return output
