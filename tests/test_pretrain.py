"""Tests of the pretraining job: smoke runs of both objectives, timm's format, the user path into DeiT-SCM,
the cached rerun, and the data it may use (disjoint from every fine-tuning split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import deit_scm_cxr.pretraining.objectives as pretrain_objectives
import deit_scm_cxr.pretraining.run as run_pretrain
from deit_scm_cxr.convert import load_backbone_weights
from deit_scm_cxr.data import load_dataset_module
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMModel

ROOT = Path(__file__).resolve().parents[1]
NIH_FIXTURES = ROOT / "tests" / "fixtures" / "nih"
TINY = [
    "--num_images", "40", "--phantom_size", "96", "--image_size", "32", "--patch_size", "8", "--embed_dim", "24",
    "--depth", "2", "--num_heads", "2", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
    "--warmup_epochs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def supervised(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pretrain") / "supervised"
    run_pretrain.main([*TINY, "--attention_mil_weight", "1", "--output_dir", str(output)])
    return output


@pytest.fixture(scope="module")
def dino(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pretrain") / "dino"
    run_pretrain.main([*TINY, "--objective", "dino", "--dino_out_dim", "64", "--output_dir", str(output)])
    return output


def _timm_model(folder: Path) -> torch.nn.Module:
    """What a user does with a timm checkpoint: create the model by name and load it strictly."""
    config = json.loads((folder / run_pretrain.CONFIG_FILE).read_text())
    model = timm.create_model(config["timm_architecture"], pretrained=False, **config["timm_kwargs"])
    model.load_state_dict(load_file(str(folder / run_pretrain.CHECKPOINT_FILE)), strict=True)
    return model.eval()


@pytest.mark.parametrize("run", ["supervised", "dino"])
def test_smoke_run_writes_a_timm_checkpoint(run, request):
    folder = request.getfixturevalue(run)
    results = json.loads((folder / run_pretrain.RESULTS_FILE).read_text())
    assert len(results["history"]) == 2 and all(np.isfinite(e["loss"]) for e in results["history"])
    model = _timm_model(folder)
    assert type(model).__name__ == "VisionTransformer"
    if run == "supervised":
        assert model.head.out_features == 7 and 0 <= results["history"][-1]["mean_roc_auc"] <= 1
    else:
        assert model.num_classes == 0  # DINO saves the teacher backbone without its projection head
    check = results["attention_check"]
    assert check["phantom_series"] == 42 and check["boxed_images"] > 0
    assert 0 <= check["F0_last_layer"] <= 100 and check["random"] > 0


def test_trained_checkpoint_converted_gives_timms_patch_tokens(supervised):
    """The user path: a trained (not random) timm checkpoint through the converter gives DeiT-SCM's backbone
    the same final tokens as timm and the same CLS attention as timm's last block."""
    model = _timm_model(supervised)
    backbone = run_pretrain.deit_scm_model(supervised, "cxr").deit
    assert isinstance(backbone, DeiTSCMModel)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.forward_features(pixels)
        ours = backbone(pixels)
    torch.testing.assert_close(ours.last_hidden_state, theirs, atol=2e-5, rtol=1e-5)
    captured = {}
    model.blocks[-1].attn.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.no_grad():
        model.forward_features(pixels)
        row = pretrain_objectives.cls_attention_row(model.blocks[-1].attn, captured["x"])[:, 1:]
    torch.testing.assert_close(ours.cls_attention.flatten(1), row, atol=1e-6, rtol=1e-5)
    # The weights did move away from the initialization: this is a trained backbone.
    fresh = run_pretrain.create_backbone(json.loads((supervised / run_pretrain.CONFIG_FILE).read_text())["timm_kwargs"])
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_run_wsol_reads_the_checkpoint_folder(supervised):
    """`--backbone_weights DIR` reads model.safetensors from the folder, every backbone key present."""
    target = run_pretrain.deit_scm_model(supervised, "paper")
    report = load_backbone_weights(target, supervised)
    assert report.missing_keys == [] and sorted(report.unexpected_keys) == ["head.bias", "head.weight"]


def test_a_finished_run_is_reused_not_retrained(supervised, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(run_pretrain, "train", fail)
    first = json.loads((supervised / run_pretrain.RESULTS_FILE).read_text())
    again = run_pretrain.main([*TINY, "--attention_mil_weight", "1", "--output_dir", str(supervised)])
    assert again == first
    # Other settings: not the same run, and the finished one is not replaced unless asked for.
    with pytest.raises(SystemExit) as refused:
        run_pretrain.main([*TINY, "--attention_mil_weight", "0.5", "--output_dir", str(supervised)])
    assert refused.value.code == 2
    with pytest.raises(AssertionError, match="retrained"):
        run_pretrain.main([*TINY, "--attention_mil_weight", "0.5", "--overwrite", "--output_dir", str(supervised)])


def test_a_folder_of_someone_elses_files_is_never_replaced(tmp_path, capsys):
    """Issue 33: --output_dir pointed at a user's model.safetensors replaced it without --overwrite."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"the user's weights")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as refused:
            run_pretrain.main([*TINY, "--output_dir", str(folder), *extra])
        assert refused.value.code == 2 and "not a pretraining run" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == b"the user's weights"


def test_an_unfinished_or_misshapen_run_is_not_reused(supervised, tmp_path, monkeypatch):
    """Issue 33: a run killed after saving but before its checks, or weights of the wrong shape, were reused."""
    import shutil

    from safetensors.torch import save_file
    from transformers import HfArgumentParser

    flags = [*TINY, "--attention_mil_weight", "1", "--output_dir", str(supervised)]
    (args,) = HfArgumentParser(run_pretrain.PretrainArguments).parse_args_into_dataclasses(args=flags)
    assert run_pretrain.finished_run(args)
    killed = tmp_path / "killed"
    shutil.copytree(supervised, killed)
    results = json.loads((killed / run_pretrain.RESULTS_FILE).read_text())
    results.pop("attention_check")
    (killed / run_pretrain.RESULTS_FILE).write_text(json.dumps(results))
    args.output_dir = str(killed)
    assert not run_pretrain.finished_run(args)
    misshapen = tmp_path / "misshapen"
    shutil.copytree(supervised, misshapen)
    state = load_file(str(misshapen / run_pretrain.CHECKPOINT_FILE))
    state["cls_token"] = torch.zeros(1, 1, 7)
    save_file(state, str(misshapen / run_pretrain.CHECKPOINT_FILE))
    args.output_dir = str(misshapen)
    assert not run_pretrain.finished_run(args)


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        run_pretrain.main(["--objective", "mae"])
    assert raised.value.code == 2 and "objective" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_pretrain.main(["--image_size", "30", "--patch_size", "8"])
    for flags in (["--objective", "dino", "--patch_cam_weight", "1"], ["--attention_guidance_weight", "-1"],
                  ["--patch_cam_lse_r", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as raised:
            run_pretrain.main(flags)
        assert raised.value.code == 2
    # Issue 33: these ended in tracebacks, or in a NaN run saved with exit 0.
    a_file = Path("a_file")
    a_file.write_text("x")
    for flag, value in (("--num_images", "0"), ("--num_images", "1"), ("--per_device_train_batch_size", "0"),
                        ("--depth", "-1"), ("--learning_rate", "nan"), ("--mlp_ratio", "0"),
                        ("--output_dir", str(a_file))):  # fmt: skip
        with pytest.raises(SystemExit) as raised:
            run_pretrain.main([flag, value])
        assert raised.value.code == 2 and flag[2:] in capsys.readouterr().err


def test_patch_cam_and_guidance_terms_follow_their_formulas():
    """The patch-CAM and guidance terms against the formulas written out here, on timm's own attention
    weights (read from its unfused attention path), with the CAM target held fixed (no gradient)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=3)
    attention: list[torch.Tensor] = []
    for block in backbone.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda module, inputs, output: attention.append(inputs[0]))
    pixels = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    objective = pretrain_objectives.SupervisedObjective(backbone, patch_cam_weight=1.0, guidance_weight=0.5, lse_r=5.0)
    objective.eval()
    loss = objective(pixels, targets)
    (head_gradient,) = torch.autograd.grad(loss, backbone.head.weight)

    attention.clear()
    tokens = backbone.forward_features(pixels)
    patches = backbone.head(tokens[:, 1:])  # (B, N, K)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pooled = (torch.logsumexp(5.0 * patches, dim=1) - np.log(patches.shape[1])) / 5.0
    expected = bce(backbone.forward_head(tokens), targets) + bce(pooled, targets)
    cam = (patches.detach().clamp_min(0) * targets[:, None]).sum(-1)  # image 1 has no finding: left out
    keep = cam.sum(-1) > 0
    assert keep.tolist() == [True, False, True, True]
    cam = cam[keep] / cam[keep].sum(-1, keepdim=True)
    cross_entropies = []
    for weights in attention:  # (B, heads, T, T), one per layer
        row = weights[:, :, 0, 1:].mean(dim=1)
        row = row / row.sum(-1, keepdim=True)
        cross_entropies.append(-(cam * row[keep].log()).sum(-1).mean())
    expected = expected + 0.5 * torch.stack(cross_entropies).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head_gradient, torch.autograd.grad(expected, backbone.head.weight)[0])


def test_guided_pretraining_smoke_run(tmp_path):
    output = tmp_path / "guided"
    run_pretrain.main([*TINY, "--patch_cam_weight", "1", "--attention_guidance_weight", "0.1",
                       "--output_dir", str(output)])  # fmt: skip
    results = json.loads((output / run_pretrain.RESULTS_FILE).read_text())
    assert all(np.isfinite(e["loss"]) for e in results["history"])
    assert _timm_model(output).head.out_features == 7


def _png_bytes(split) -> set[bytes]:
    from datasets import Image as ImageFeature

    return {bytes(image["bytes"]) for image in split.cast_column("image", ImageFeature(decode=False))["image"]}


def test_pretraining_phantoms_are_in_no_fine_tuning_split():
    phantoms = load_dataset_module("phantoms")
    pretraining = phantoms.build_pretraining_dataset(6, size=64, seed=run_pretrain.PRETRAIN_SERIES)
    fine_tuning = phantoms.build_phantom_dataset(20, 6, 6, size=64, seed=run_pretrain.PRETRAIN_SERIES)
    assert not _png_bytes(pretraining) & set().union(*(_png_bytes(split) for split in fine_tuning.values()))
    patients = {p for split in fine_tuning.values() for p in split["patient_id"]}
    assert not patients & set(pretraining["patient_id"])
    for labels, findings in zip(pretraining["image_labels"], pretraining["findings"]):
        assert labels == sorted(set(findings)) and set(labels) <= set(phantoms.PRETRAIN_FINDINGS)


def _nih_stand_in(folder: Path, patients: int = 60) -> pd.DataFrame:
    """Real NIH metadata rows (`patients` without boxes and three with) and 32 x 32 stand-in images."""
    metadata = pd.read_csv(NIH_FIXTURES / "Data_Entry_2017_sample.csv")
    boxes = pd.read_csv(NIH_FIXTURES / "BBox_List_2017.csv")
    boxed_patients = set(metadata.loc[metadata["Image Index"].isin(boxes["Image Index"]), "Patient ID"])
    chosen = sorted(set(metadata["Patient ID"]) - boxed_patients)[:patients] + sorted(boxed_patients)[:3]
    subset = metadata[metadata["Patient ID"].isin(chosen)]
    images = folder / "images_001" / "images"
    images.mkdir(parents=True)
    subset.to_csv(folder / "Data_Entry_2017_v2020.csv", index=False)
    boxes[boxes["Image Index"].isin(subset["Image Index"])].to_csv(folder / "BBox_List_2017.csv", index=False)
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    for index, name in enumerate(subset["Image Index"]):
        Image.fromarray(np.roll(ramp, index, axis=1)).save(images / name)
    return subset


def test_the_nih_pretraining_command_on_stand_in_images(tmp_path):
    _nih_stand_in(tmp_path / "nih", patients=30)
    output = tmp_path / "pretrain-nih"
    tiny = [flag for flag in TINY if flag not in ("--num_images", "40", "--phantom_size", "96")]
    results = run_pretrain.main(["--dataset", "nih", "--data_dir", str(tmp_path / "nih"), *tiny,
                                 "--output_dir", str(output)])  # fmt: skip
    config = json.loads((output / run_pretrain.CONFIG_FILE).read_text())
    nih = load_dataset_module("nih")
    assert config["label_names"] == list(nih.NIH_FINDINGS) and config["timm_kwargs"]["num_classes"] == 14
    assert _timm_model(output).head.out_features == 14
    assert len(results["history"]) == 2 and "attention_check" not in results  # no boxes to score on NIH here


def test_nih_pretraining_keeps_out_validation_test_and_boxed_patients(tmp_path):
    nih = load_dataset_module("nih")
    subset = _nih_stand_in(tmp_path)
    boxes = pd.read_csv(tmp_path / "BBox_List_2017.csv")
    boxed_patients = set(subset.loc[subset["Image Index"].isin(boxes["Image Index"]), "Patient ID"])
    assert boxed_patients  # the stand-in holds patients with boxes, to be kept out
    dataset = nih.build_pretraining_dataset(tmp_path, seed=0)
    manifest, _ = nih.build_manifest(tmp_path / "Data_Entry_2017_v2020.csv", tmp_path / "BBox_List_2017.csv",
                                     official_lists_dir=tmp_path, seed=0)  # fmt: skip
    held_out = set(manifest.loc[manifest["split"] != "train", "Patient ID"].astype(int))
    used = {int(p) for p in dataset["patient_id"]}
    assert used and not used & held_out
    assert not used & {int(p) for p in boxed_patients}
    by_id = dict(zip(subset["Image Index"], subset["Finding Labels"]))
    for image_id, labels in zip(dataset["image_id"], dataset["image_labels"]):
        names = by_id[image_id].split("|")
        assert sorted(labels) == ([] if names == ["No Finding"] else sorted(names))
        assert set(labels) <= set(nih.NIH_FINDINGS)
