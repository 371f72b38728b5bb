"""Pretrain a DeiT backbone on radiographs disjoint from the fine-tuning splits.

A thin script, as in the transformers examples, so that `accelerate launch run_pretrain.py` works from a
checkout; the code is `deit_scm_cxr.pretraining.run` (also `deit-scm-pretrain` and
`python -m deit_scm_cxr.pretraining`).
"""

from deit_scm_cxr.pretraining.run import cli

if __name__ == "__main__":
    cli()
