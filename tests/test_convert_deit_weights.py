"""Loading timm and transformers DeiT/ViT weights into the DeiT-SCM backbone (nothing downloads)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import ViTConfig, ViTModel

from deit_scm_cxr.convert import WeightConversionError, load_backbone_weights, main, read_state_dict
from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification


def test_timm_deit_tiny_gives_identical_final_tokens():
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-tiny")).eval()
    report = load_backbone_weights(model, reference.state_dict())
    assert report.missing_keys == []
    assert report.unexpected_keys == ["head.bias", "head.weight"]
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(pixels)
        got = model.deit(pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_timm_distilled_checkpoint_at_another_resolution(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    path = tmp_path / "deit.pth"
    torch.save({"model": reference.state_dict()}, path)
    model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-tiny", image_size=160))
    report = load_backbone_weights(model, path)
    assert report.missing_keys == []
    assert "dist_token" in report.unexpected_keys and "head_dist.weight" in report.unexpected_keys
    assert report.interpolated_position_embeddings == ((14, 14), (10, 10))
    position = model.deit.embeddings.position_embeddings
    assert position.shape == (1, 101, 192)
    # The CLS row is kept; the distillation row is dropped rather than mistaken for a patch.
    torch.testing.assert_close(position[0, 0], reference.pos_embed[0, 0])


def _hf_vit(seed: int = 0) -> tuple[ViTModel, DeiTSCMConfig]:
    torch.manual_seed(seed)
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    hf = ViTModel(ViTConfig(image_size=32, patch_size=8, layer_norm_eps=1e-6, **dims), add_pooling_layer=False)
    return hf.eval(), DeiTSCMConfig(image_size=32, patch_size=8, **dims)


def _to_v4_layout(state: dict) -> dict:
    """Rename transformers-v5 ViT keys to the v4 layout that Hub checkpoints are stored in."""
    renames = [
        (r"^layers\.(\d+)\.attention\.q_proj", r"encoder.layer.\1.attention.attention.query"),
        (r"^layers\.(\d+)\.attention\.k_proj", r"encoder.layer.\1.attention.attention.key"),
        (r"^layers\.(\d+)\.attention\.v_proj", r"encoder.layer.\1.attention.attention.value"),
        (r"^layers\.(\d+)\.attention\.o_proj", r"encoder.layer.\1.attention.output.dense"),
        (r"^layers\.(\d+)\.mlp\.fc1", r"encoder.layer.\1.intermediate.dense"),
        (r"^layers\.(\d+)\.mlp\.fc2", r"encoder.layer.\1.output.dense"),
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, key)
            if new != key:
                key = new
                break
        out["vit." + key] = value
    return out


@pytest.mark.parametrize("layout", ["v5", "v4-safetensors"])
def test_transformers_vit_checkpoints(layout, tmp_path):
    hf, config = _hf_vit()
    model = DeiTSCMForImageClassification(config).eval()
    state = hf.state_dict()
    if layout == "v4-safetensors":
        save_file({k: v.contiguous() for k, v in _to_v4_layout(state).items()}, str(tmp_path / "model.safetensors"))
        source = tmp_path  # a directory holding model.safetensors
    else:
        source = state
    report = load_backbone_weights(model, source)
    assert report.missing_keys == [] and report.unexpected_keys == []
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.deit(pixels).last_hidden_state, hf(pixels).last_hidden_state, atol=1e-5, rtol=1e-5
        )


def test_shape_mismatch_and_bad_files_raise_typed_errors(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()
    model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-tiny"))
    with pytest.raises(WeightConversionError, match="shape"):
        load_backbone_weights(model, small)
    with pytest.raises(WeightConversionError, match="no such checkpoint"):
        read_state_dict(tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightConversionError, match="broken.pth"):
        read_state_dict(broken)
    with pytest.raises(WeightConversionError, match="no model.safetensors"):
        read_state_dict(tmp_path)


def test_cli_writes_a_loadable_model(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    source = tmp_path / "deit_tiny.pth"
    torch.save(reference.state_dict(), source)
    out_dir = tmp_path / "converted"
    assert main(["--source", str(source), "--preset", "deit-tiny", "--output_dir", str(out_dir)]) == 0
    loaded = DeiTSCMForImageClassification.from_pretrained(out_dir)
    torch.testing.assert_close(loaded.deit.embeddings.cls_token, reference.cls_token)
    assert main(["--source", str(tmp_path / "nope.pth"), "--output_dir", str(out_dir)]) == 2


def test_missing_backbone_keys_are_an_error_unless_allowed(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-tiny"))
    with pytest.raises(WeightConversionError, match="not in the checkpoint"):
        load_backbone_weights(model, partial)
    report = load_backbone_weights(model, partial, allow_missing=True)
    assert report.missing_keys and all(k.startswith("encoder.layer.11.") for k in report.missing_keys)
    # The CLI: a checkpoint with no matching key at all exits 2 and saves nothing.
    path = tmp_path / "unrelated.safetensors"
    save_file({"something.weight": torch.zeros(3)}, str(path))
    assert main(["--source", str(path), "--preset", "deit-tiny", "--output_dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
