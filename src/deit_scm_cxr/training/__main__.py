"""`python -m deit_scm_cxr.training` (and `accelerate launch -m deit_scm_cxr.training`): `run_wsol.py`."""

from deit_scm_cxr.training.run import main

if __name__ == "__main__":
    main()
