"""`python -m deit_scm_cxr.pretraining` (and `accelerate launch -m deit_scm_cxr.pretraining`): `run_pretrain.py`."""

from deit_scm_cxr.pretraining.run import main

if __name__ == "__main__":
    main()
