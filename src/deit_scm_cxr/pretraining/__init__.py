"""Backbone pretraining on radiographs (`deit-scm-pretrain`, `python -m deit_scm_cxr.pretraining`,
`run_pretrain.py`)."""
