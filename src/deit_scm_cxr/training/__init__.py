"""Fine-tuning DeiT-SCM on radiographs (`deit-scm-train`, `python -m deit_scm_cxr.training`, `run_wsol.py`)."""
