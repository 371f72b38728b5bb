"""DeiT with the Spatial Calibration Module (SCM) for weakly supervised localization on chest radiographs.

Subpackages, one per job:

* `deit_scm_cxr.hub` — the model, its configuration, the SCM, the image processor, DICOM decoding, the
  heatmap/box post-processing and the `chest-xray-localization` pipeline: the files `save_pretrained` writes
  next to `config.json` (Hub remote code).
* `deit_scm_cxr.data` — the embedded phantom generator, the NIH ChestX-ray14 builder, split preparation.
* `deit_scm_cxr.evaluation` — WSOL metrics (MaxBoxAccV2, PxAP, pointing game), calibration, bootstrap.
* `deit_scm_cxr.training` — `deit-scm-train` / `run_wsol.py`: fine-tuning with Accelerate, recipes.
* `deit_scm_cxr.pretraining` — `deit-scm-pretrain` / `run_pretrain.py`: backbone pretraining.
* `deit_scm_cxr.outputs` — what a run writes: model card, plots, overlays, predictions.

The model classes are importable from here: `from deit_scm_cxr import DeiTSCMForImageClassification`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# Loaded on first use, so that `import deit_scm_cxr.data.phantoms` does not import transformers.
_EXPORTS = {
    "DeiTSCMConfig": "deit_scm_cxr.hub.configuration_deit_scm",
    "DeiTSCMModel": "deit_scm_cxr.hub.modeling_deit_scm",
    "DeiTSCMForImageClassification": "deit_scm_cxr.hub.modeling_deit_scm",
    "CXRImageProcessor": "deit_scm_cxr.hub.image_processing_cxr",
    "CXRImageError": "deit_scm_cxr.hub.cxr_decoding",
    "ChestXrayLocalizationPipeline": "deit_scm_cxr.hub.pipeline_cxr",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deit_scm_cxr' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
