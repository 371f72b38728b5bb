"""Data: the embedded phantom generator, the NIH ChestX-ray14 builder, the shared sample contract (`cxr`)
and the preparation of splits for training and evaluation (`prepare`)."""

from __future__ import annotations

import importlib
from types import ModuleType

# `--dataset` names -> the module that builds that dataset.
DATASET_MODULES = {"phantoms": "deit_scm_cxr.data.phantoms", "nih": "deit_scm_cxr.data.nih_cxr14"}


def load_dataset_module(name: str) -> ModuleType:
    """The builder module of the dataset `name` ("phantoms" or "nih")."""
    if name not in DATASET_MODULES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASET_MODULES)}")
    return importlib.import_module(DATASET_MODULES[name])


__all__ = ["DATASET_MODULES", "load_dataset_module"]
