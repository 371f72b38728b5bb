"""Tests of the two datasets: NIH ChestX-ray14 (real metadata, fixtures from ../shared) and the CXR phantoms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import deit_scm_cxr.data.cxr as cxr_data
from deit_scm_cxr.data import load_dataset_module

ROOT = Path(__file__).resolve().parents[1]
NIH = ROOT / "tests" / "fixtures" / "nih"  # copied from ../shared/data/nih, see its README
METADATA, BOXES = NIH / "Data_Entry_2017_sample.csv", NIH / "BBox_List_2017.csv"
nih = load_dataset_module("nih")
phantoms = load_dataset_module("phantoms")


# ----------------------------------------------------------------------------- the datasets folder


def test_nothing_on_the_import_path_shadows_the_datasets_library():
    assert not [p for p in (ROOT / "src").rglob("datasets") if p.is_dir()] and not (ROOT / "datasets").exists()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import datasets, sys; print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    location, has_api = result.stdout.split()
    assert "site-packages" in location and has_api == "True"
    assert not Path(location).is_relative_to(ROOT / "src") and "site-packages" in Path(location).parts


# ----------------------------------------------------------------------------- NIH: real metadata


@pytest.fixture(scope="module")
def raw_metadata() -> pd.DataFrame:
    return pd.read_csv(METADATA)


@pytest.fixture(scope="module")
def manifest_and_summary():
    return nih.build_manifest(METADATA, BOXES, seed=0)


def test_class_rules_and_no_mixed_labels(manifest_and_summary, raw_metadata):
    manifest, summary = manifest_and_summary
    findings = manifest["findings"].str.split("|").map(set)
    atelectasis = manifest["label_name"] == "Atelectasis"
    assert (findings[atelectasis] == {"Atelectasis"}).all()
    other = manifest["label_name"] == "Other_pathologies"
    assert (~findings[other].map(lambda f: "Atelectasis" in f or "No Finding" in f)).all()
    assert (findings[manifest["label_name"] == "No_pathologies"] == {"No Finding"}).all()
    # Mixed Atelectasis images, counted straight from the CSV, are exactly the ones removed.
    raw_sets = raw_metadata["Finding Labels"].str.split("|").map(set)
    mixed = int(raw_sets.map(lambda f: "Atelectasis" in f and len(f) > 1).sum())
    assert summary["removed"]["mixed_atelectasis"] == mixed > 0
    kept, kept_summary = nih.build_manifest(METADATA, keep_mixed=True)
    assert kept_summary["removed"]["mixed_atelectasis"] == 0
    assert (kept["label_name"] == "Atelectasis").sum() == int(raw_sets.map(lambda f: "Atelectasis" in f).sum())


def test_no_patient_in_two_splits(manifest_and_summary):
    manifest, summary = manifest_and_summary
    assert manifest.groupby("Patient ID")["split"].nunique().max() == 1
    assert set(summary["patient_overlap"].values()) == {0}
    assert set(manifest["split"]) == {"train", "validation", "test"}


def test_official_lists_decide_the_test_split(tmp_path, raw_metadata):
    patients = sorted(raw_metadata["Patient ID"].unique())
    test_patients = set(patients[::5])
    is_test = raw_metadata["Patient ID"].isin(test_patients)
    (tmp_path / "test_list.txt").write_text("\n".join(raw_metadata.loc[is_test, "Image Index"]))
    (tmp_path / "train_val_list.txt").write_text("\n".join(raw_metadata.loc[~is_test, "Image Index"]))
    manifest, summary = nih.build_manifest(METADATA, official_lists_dir=tmp_path)
    assert summary["official_split_lists"] is True
    test_rows = manifest[manifest["split"] == "test"]
    assert set(test_rows["Patient ID"].astype(int)) <= test_patients
    assert not manifest.loc[manifest["split"] != "test", "Patient ID"].astype(int).isin(test_patients).any()
    assert (manifest["split"] == "validation").sum() > 0


def test_stratified_balancing_keeps_age_and_sex_mix(raw_metadata):
    targets = {0: 120, 1: 400, 2: 300}
    full, _ = nih.build_manifest(METADATA)
    sampled, summary = nih.build_manifest(METADATA, per_class=targets, seed=3)
    assert sampled["label"].value_counts().to_dict() == targets
    for label, target in targets.items():
        source = full[full["label"] == label].groupby(["age_bin", "sex"]).size() / (full["label"] == label).sum()
        chosen = sampled[sampled["label"] == label].groupby(["age_bin", "sex"]).size() / target
        difference = (source - chosen.reindex(source.index, fill_value=0)).abs()
        # Largest-remainder allocation: each stratum within one image of its exact share.
        assert (difference <= 1.0 / target + 1e-9).all(), difference.max()
    assert summary["removed"]["balancing"] == len(full) - sum(targets.values())


def test_deterministic_by_seed():
    first, _ = nih.build_manifest(METADATA, total=800, seed=7)
    again, _ = nih.build_manifest(METADATA, total=800, seed=7)
    other, _ = nih.build_manifest(METADATA, total=800, seed=8)
    pd.testing.assert_frame_equal(first, again)
    assert set(first["Image Index"]) != set(other["Image Index"])
    assert len(first) == len(other) == 800


def test_box_set_counts_and_conventions(manifest_and_summary):
    _, summary = manifest_and_summary
    assert summary["bbox"]["images"] == 880 and summary["bbox"]["boxes"] == 984
    assert summary["bbox"]["per_finding"]["Atelectasis"] == 180
    assert "Infiltrate" not in summary["bbox"]["per_finding"] and summary["bbox"]["per_finding"]["Infiltration"] > 0
    boxes = nih.read_boxes(BOXES)
    raw = pd.read_csv(BOXES)
    np.testing.assert_allclose(boxes["x1"], raw.iloc[:, 2] + raw.iloc[:, 4])
    np.testing.assert_allclose(boxes["y1"], raw.iloc[:, 3] + raw.iloc[:, 5])


def test_boxed_patients_kept_out_of_train(manifest_and_summary):
    manifest, summary = manifest_and_summary
    boxed_images = set(pd.read_csv(BOXES)["Image Index"])
    metadata = pd.read_csv(METADATA)
    boxed_patients = set(
        metadata.loc[metadata["Image Index"].isin(boxed_images), "Patient ID"].astype(str).str.zfill(5)
    )
    train = manifest[manifest["split"] == "train"]
    assert not train["Patient ID"].isin(boxed_patients).any()
    without, _ = nih.build_manifest(METADATA, seed=0)
    removed = ((without["split"] == "train") & without["Patient ID"].isin(boxed_patients)).sum()
    assert summary["removed"]["boxed_patient_in_train"] == removed > 0


def test_implausible_ages_are_dropped_and_reported(tmp_path, raw_metadata):
    broken = raw_metadata.copy()
    broken.loc[broken.index[:3], "Patient Age"] = [414, 150, -1]
    path = tmp_path / "Data_Entry_2017_test.csv"
    broken.to_csv(path, index=False)
    manifest, summary = nih.build_manifest(path)
    assert summary["removed"]["implausible_age"] == 3
    assert manifest["age"].between(0, 120).all()


def test_view_filter(raw_metadata):
    manifest, summary = nih.build_manifest(METADATA, view="PA")
    assert set(manifest["view"]) == {"PA"}
    assert summary["removed"]["view_not_PA"] > 0


def test_manifest_cli(tmp_path):
    manifest_csv, summary_json = tmp_path / "manifest.csv", tmp_path / "summary.json"
    command = [
        sys.executable, "-m", "deit_scm_cxr.data.nih_cxr14",
        "--metadata_csv", str(METADATA), "--bbox_csv", str(BOXES),
        "--manifest_csv", str(manifest_csv), "--summary_json", str(summary_json), "--view", "PA",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    table = pd.read_csv(manifest_csv)
    assert list(table.columns) == nih.MANIFEST_COLUMNS
    summary = json.loads(summary_json.read_text())
    assert sum(summary["per_split"].values()) == len(table) == summary["images"]
    nested = sum(
        n
        for split in summary["counts"].values()
        for label in split.values()
        for sex in label.values()
        for n in sex.values()
    )
    assert nested == len(table)
    bad = subprocess.run(command[:3] + ["--metadata_csv", str(tmp_path / "nope.csv")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.csv" in bad.stderr


def test_image_dataset_with_stand_in_images(tmp_path, raw_metadata):
    patients = sorted(raw_metadata["Patient ID"].unique())[:12]
    subset = raw_metadata[raw_metadata["Patient ID"].isin(patients)]
    subset.to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    names = list(subset["Image Index"])
    for i, name in enumerate(names[1:]):  # the first stays missing
        folder = tmp_path / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), i % 255, np.uint8)).save(folder / name)
    corrupt = next((tmp_path / "images_001" / "images").glob("*.png"))
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    dataset = nih.build_dataset_dict(tmp_path, config="three_class", report_dir=tmp_path / "report")
    problems = pd.read_csv(tmp_path / "report" / "problem_images_three_class.csv")
    assert not list(tmp_path.glob("problem_images*"))  # nothing written into the data folder
    assert sorted(problems["problem"]) == ["missing", "unreadable"]
    assert names[0] in set(problems["Image Index"]) and corrupt.name in set(problems["Image Index"])
    built = sum(len(part) for part in dataset.values())
    expected, _ = nih.build_manifest(tmp_path / "Data_Entry_2017_v2020.csv")
    assert built == len(expected) - 2
    assert dataset["train"].features == cxr_data.sample_features()
    sample = next(iter(dataset[next(s for s in dataset if len(dataset[s]))]))
    assert sample["image"].size == (32, 32) and sample["boxes"] == [] and sample["label"] in (0, 1, 2)


# ----------------------------------------------------------------------------- phantoms


def test_phantoms_are_deterministic_per_seed_and_index():
    a = phantoms.generate_phantom(17, seed=4)
    b = phantoms.generate_phantom(17, seed=4)
    c = phantoms.generate_phantom(17, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.boxes == b.boxes and a.label == b.label
    assert not np.array_equal(a.image, c.image)


def test_phantom_classes_findings_and_proportions():
    samples = [phantoms.generate_phantom(i, seed=1, size=128) for i in range(600)]
    labels = np.array([s.label for s in samples])
    shares = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(shares, phantoms.DEFAULT_PROPORTIONS, atol=0.04)
    for sample in samples:
        assert len(sample.boxes) == len(sample.findings)
        if sample.label == phantoms.ATELECTASIS:
            assert sample.findings == ["Atelectasis"]
        elif sample.label == phantoms.OTHER:
            assert 1 <= len(sample.findings) <= 2 and set(sample.findings) <= set(phantoms.OTHER_FINDINGS)
        else:
            assert sample.findings == [] and sample.boxes == []
        for x0, y0, x1, y1 in sample.boxes:
            assert 0 <= x0 <= x1 < 128 and 0 <= y0 <= y1 < 128


def test_phantom_atelectasis_sits_where_nih_boxes_are():
    boxes = []
    for i in range(300):
        sample = phantoms.generate_phantom(i, seed=2, label=phantoms.ATELECTASIS)
        boxes.extend(sample.boxes)
    boxes = np.array(boxes) / 256
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    # NIH Atelectasis box centres: p25 0.50, p50 0.57, p75 0.65 of the image height.
    assert 0.45 < np.median(centre_y) < 0.7
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    assert (centre_x < 0.5).mean() > 0.3 and (centre_x > 0.5).mean() > 0.3  # both lungs


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_brightest_blob_does_not_localize():
    hits, total = 0, 0
    for i in range(200):
        sample = phantoms.generate_phantom(i, seed=3)
        if not sample.boxes:
            continue
        image = sample.image.astype(np.float32)
        peak = image >= np.percentile(image, 99.5)
        ys, xs = np.nonzero(peak)
        guess = [xs.min(), ys.min(), xs.max(), ys.max()]
        hits += max(_iou(guess, box) for box in sample.boxes) >= 0.5
        total += 1
    assert total > 100 and hits / total < 0.1


def test_phantom_bit_depths():
    assert phantoms.generate_phantom(0, bits=8).image.dtype == np.uint8
    deep = phantoms.generate_phantom(0, bits=16).image
    assert deep.dtype == np.uint16 and deep.max() > 255
    with pytest.raises(ValueError):
        phantoms.generate_phantom(0, bits=12)


def test_phantom_dataset_dict_contract_and_parquet_round_trip(tmp_path):
    from datasets import load_dataset

    dataset = phantoms.build_phantom_dataset(num_train=12, num_validation=4, num_test=5, size=64, seed=9)
    assert {split: len(part) for split, part in dataset.items()} == {"train": 12, "validation": 4, "test": 5}
    assert dataset["train"].features == cxr_data.sample_features()
    ids = [set(part["image_id"]) for part in dataset.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2])
    first = dataset["train"][0]
    assert first["image"].size == (64, 64)
    regenerated = phantoms.generate_phantom(0, seed=9, size=64)
    np.testing.assert_array_equal(np.asarray(first["image"]), regenerated.image)
    dataset["test"].to_parquet(str(tmp_path / "test.parquet"))
    reloaded = load_dataset("parquet", data_files=str(tmp_path / "test.parquet"), split="train")
    assert reloaded["image_id"] == dataset["test"]["image_id"] and reloaded["boxes"] == dataset["test"]["boxes"]


def test_phantom_cli_contact_sheet(tmp_path):
    sheet = tmp_path / "sheet.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deit_scm_cxr.data.phantoms",
            "--contact_sheet",
            str(sheet),
            "--size",
            "96",
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    image = Image.open(sheet)
    assert image.size == (96 * 4, 96 * 4)
