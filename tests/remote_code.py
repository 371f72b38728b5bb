"""Running a script in a fresh interpreter that cannot import this repository's modules, so that only
the code files saved next to the weights (remote code) can serve."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The package, and the remote-code files' own names (a saved folder's code must not import from elsewhere).
PROJECT_MODULES = (
    "deit_scm_cxr", "configuration_deit_scm", "modeling_deit_scm", "image_processing_cxr", "localization",
    "pipeline_cxr",
)  # fmt: skip


def run_outside_repo(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` with the repository off `sys.path` and its modules unimportable (the project may be
    pip-installed in editable mode). Returns the finished process; stdout and stderr are captured."""
    prelude = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() not in ({str(ROOT)!r}, {str(ROOT / 'src')!r})]
        for _name in {PROJECT_MODULES!r}:
            sys.modules[_name] = None
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
