"""The Gradio demo (`deit-scm-demo`, `python -m deit_scm_cxr.demo`) and its Space upload."""
