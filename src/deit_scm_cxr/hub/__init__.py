"""The Hub remote code: every file here is written next to `config.json` by `save_pretrained`, imports the
others relatively and only installed packages, so a saved folder loads with `trust_remote_code=True` in an
interpreter that has never seen this package."""

from .configuration_deit_scm import DeiTSCMConfig
from .cxr_decoding import CXRImageError
from .image_processing_cxr import CXRImageProcessor
from .modeling_deit_scm import DeiTSCMForImageClassification, DeiTSCMModel
from .pipeline_cxr import ChestXrayLocalizationPipeline

__all__ = [
    "CXRImageError", "CXRImageProcessor", "ChestXrayLocalizationPipeline", "DeiTSCMConfig",
    "DeiTSCMForImageClassification", "DeiTSCMModel",
]  # fmt: skip
