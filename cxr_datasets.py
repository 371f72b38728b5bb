"""The dataset loader: imports `datasets/<folder>/<module>.py` by file path. The `datasets/` folder is not a
package (it must never shadow the `datasets` library), and its modules import `cxr_data`; loading them
from here keeps the arrows one way: `cxr_datasets` -> `datasets/*` -> `cxr_data`."""

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


def load_dataset_module(name: str) -> ModuleType:
    """Import `datasets/<folder>/<module>.py` by path (there is no package to import it from)."""
    if name not in DATASET_MODULES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASET_MODULES)}")
    module_name = f"cxr_dataset_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, DATASET_MODULES[name])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
