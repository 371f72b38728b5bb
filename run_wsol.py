"""Train, evaluate and predict with DeiT-SCM for weakly supervised localization on chest radiographs.

A thin script, as in the transformers examples, so that `accelerate launch run_wsol.py` works from a checkout;
the code is `deit_scm_cxr.training.run` (also `deit-scm-train` and `python -m deit_scm_cxr.training`).
`python run_wsol.py --help` lists every flag with the value a run will use.
"""

from deit_scm_cxr.training.run import cli

if __name__ == "__main__":
    cli()
