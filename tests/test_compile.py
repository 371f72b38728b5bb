"""torch.compile readiness: the forward pass traces into one graph (no graph breaks)."""

from __future__ import annotations

import pytest
import torch

from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

TINY = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)


@pytest.mark.parametrize("variant", ["paper", "cxr"])
@pytest.mark.parametrize("solver", ["polynomial", "newton_schulz", "dense"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_has_no_graph_breaks(variant, solver, training):
    torch._dynamo.reset()
    config = DeiTSCMConfig.from_preset("deit-tiny", variant, scm_solver=solver, **TINY)
    model = DeiTSCMForImageClassification(config).train(training)
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    explanation = torch._dynamo.explain(model)(pixels, labels=labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_model_matches_eager():
    torch._dynamo.reset()
    model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-tiny", "paper", **TINY)).train()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    eager = model(pixels, labels=labels)
    compiled = torch.compile(model, backend="aot_eager")(pixels, labels=labels)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
