"""The loader of modules that live in folders which are not packages: `datasets/<folder>/<module>.py` (the
`datasets/` folder must never shadow the `datasets` library, and its modules import `cxr_data`; loading them
from here keeps the arrows one way: `cxr_datasets` -> `datasets/*` -> `cxr_data`) and the demo's files
(`demo/`, which the Space carries alone), imported by file path instead of through `sys.path`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent
DATASET_MODULES = {
    "nih": ROOT / "datasets" / "nih_cxr14" / "nih_cxr14.py",
    "phantoms": ROOT / "datasets" / "cxr_phantoms" / "cxr_phantoms.py",
}
DEMO_MODULES = {"app": ROOT / "demo" / "app.py", "push_space": ROOT / "demo" / "push_space.py"}


def load_dataset_module(name: str) -> ModuleType:
    """Import `datasets/<folder>/<module>.py` by path (there is no package to import it from)."""
    if name not in DATASET_MODULES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASET_MODULES)}")
    return _load_file(f"cxr_dataset_{name}", DATASET_MODULES[name])


def load_demo_module(name: str) -> ModuleType:
    """Import `demo/app.py` ("app") or `demo/push_space.py` ("push_space") by path."""
    if name not in DEMO_MODULES:
        raise ValueError(f"unknown demo module {name!r}; choose from {sorted(DEMO_MODULES)}")
    return _load_file(f"deit_scm_demo_{name}", DEMO_MODULES[name])


def _load_file(module_name: str, path: Path) -> ModuleType:
    """The module at `path`, imported once under `module_name` (registered before it runs: dataclasses look
    their module up in `sys.modules`)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
