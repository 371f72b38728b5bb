"""NIH ChestX-ray14 as a three-class set (Atelectasis / Other_pathologies / No_pathologies) with
patient-wise splits, and its expert boxes as the localization test set.

Wang et al., "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised
Classification and Localization of Common Thorax Diseases", CVPR 2017.

The user supplies `data_dir`: the images (the twelve extracted `images_*` folders or one flat folder),
`Data_Entry_2017*.csv`, `BBox_List_2017.csv`, and the official `train_val_list.txt` / `test_list.txt` when
present. Nothing is downloaded.

Configurations:
    three_class  every image labelled by its findings: Atelectasis (the only finding), Other_pathologies
                 (findings, none Atelectasis), No_pathologies ("No Finding"); images with Atelectasis
                 and other findings are removed (or kept as Atelectasis with keep_mixed=True).
    bbox         the 880 images with expert boxes (984 boxes), each with its finding and the image's
                 three-class label (Atelectasis when any finding is Atelectasis).

Python:
    from deit_scm_cxr.data import nih_cxr14 as module
    manifest, summary = module.build_manifest("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv")
    dataset_dict = module.build_dataset_dict("/data/nih", config="three_class")

CLI (manifest only, no images needed):
    python -m deit_scm_cxr.data.nih_cxr14 --metadata_csv Data_Entry_2017_v2020.csv \\
        --bbox_csv BBox_List_2017.csv --manifest_csv manifest.csv --summary_json summary.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from deit_scm_cxr.data.cxr import (
    AGE_BIN_NAMES,
    CLASS_NAMES,
    SPLITS,
    age_bin,
    assert_no_patient_leakage,
    patient_splits,
    records_to_dataset,
    stratified_sample,
    write_problem_list,
)

logger = logging.getLogger(__name__)

ATELECTASIS, OTHER, NO_FINDING = 0, 1, 2
FINDING_ALIASES = {"Infiltrate": "Infiltration"}
NIH_IMAGE_SIDE = 1024  # every ChestX-ray14 image is 1024 x 1024; the box list is in that frame
# The 14 image labels of ChestX-ray14 (Wang et al., CVPR 2017), in the order of its paper.
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
MANIFEST_COLUMNS = [
    "Image Index",
    "Patient ID",
    "label",
    "label_name",
    "split",
    "age",
    "age_bin",
    "sex",
    "view",
    "findings",
]


class NIHMetadataError(ValueError):
    """A metadata file that is missing, unreadable or lacks the expected columns; names the file."""


def normalize_finding(name: str) -> str:
    """NIH's box list says `Infiltrate` where Data_Entry says `Infiltration`: one name for both."""
    name = name.strip()
    return FINDING_ALIASES.get(name, name)


def _read_csv(path: str | Path, kind: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise NIHMetadataError(f"{path}: no such {kind} file")
    try:
        return pd.read_csv(path)
    except Exception as error:  # pandas raises several types for malformed CSV
        raise NIHMetadataError(f"{path}: cannot read CSV ({error})") from error


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Read `Data_Entry_2017*.csv` into columns Image Index, Finding Labels, Patient ID, age, sex, view."""
    table = _read_csv(path, "metadata")
    needed = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise NIHMetadataError(f"{path}: missing columns {missing}")
    labels = table["Finding Labels"]
    empty = labels.isna() | (labels.astype(str).str.strip() == "")
    if empty.any():
        row = int(empty.to_numpy().nonzero()[0][0])
        raise NIHMetadataError(
            f"{path}: row {row + 2} ({table['Image Index'].iloc[row]}) has an empty Finding Labels cell "
            f"({int(empty.sum())} such rows); NIH writes 'No Finding' for a normal image"
        )
    table = _without_repeated_rows(table, path)
    ages = table["Patient Age"].astype(str).str.extract(r"(-?\d+)", expand=False)
    return pd.DataFrame(
        {
            "Image Index": table["Image Index"].astype(str),
            "Finding Labels": table["Finding Labels"].astype(str),
            "Patient ID": table["Patient ID"].astype(str).str.zfill(5),
            "age": pd.to_numeric(ages, errors="coerce"),
            "sex": table["Patient Gender"].astype(str).str.upper().str[:1],
            "view": table["View Position"].astype(str).str.upper(),
        }
    )


def _without_repeated_rows(table: pd.DataFrame, path: Path | str) -> pd.DataFrame:
    """One row per image: exact repeats (a file concatenated twice) are dropped with a warning; two rows
    that disagree about an image (labels, patient, view...) are refused, naming it: which one is right
    cannot be guessed, and either choice would train or score on a label nobody checked."""
    repeated = table["Image Index"].duplicated(keep=False)
    if not repeated.any():
        return table
    distinct = table[repeated].drop_duplicates()
    conflicting = distinct["Image Index"].duplicated(keep=False)
    if conflicting.any():
        rows = distinct[conflicting]
        image = rows["Image Index"].iloc[0]
        cells = sorted(set(rows.loc[rows["Image Index"] == image, "Finding Labels"].astype(str)))
        raise NIHMetadataError(
            f"{path}: image {image} has {int((table['Image Index'] == image).sum())} rows that disagree "
            f"(Finding Labels {cells}); {rows['Image Index'].nunique()} such images; keep one row per image"
        )
    logger.warning("%s: %d repeated rows dropped (identical copies)", path, int(table.duplicated().sum()))
    return table.drop_duplicates(subset=["Image Index"]).reset_index(drop=True)


def read_boxes(path: str | Path) -> pd.DataFrame:
    """Read `BBox_List_2017.csv`: one row per box with Image Index, finding and xyxy (original pixels)."""
    table = _read_csv(path, "box")
    if "Image Index" not in table.columns or "Finding Label" not in table.columns or table.shape[1] < 6:
        raise NIHMetadataError(f"{path}: expected Image Index, Finding Label and four box columns")
    # The header "Bbox [x,y,w,h]" spreads over four columns; take them by position.
    x, y, w, h = (pd.to_numeric(table.iloc[:, i], errors="coerce") for i in range(2, 6))
    boxes = pd.DataFrame(
        {
            "Image Index": table["Image Index"].astype(str),
            "finding": table["Finding Label"].astype(str).map(normalize_finding),
            "x0": x,
            "y0": y,
            "x1": x + w,
            "y1": y + h,
        }
    )
    bad = boxes[["x0", "y0", "x1", "y1"]].isna().any(axis=1)
    if bad.any():
        raise NIHMetadataError(f"{path}: {int(bad.sum())} rows without four numeric box values")
    # Checked here, before any training: a bad box found only in the final evaluation would cost the run.
    empty = ~((w > 0) & (h > 0) & np.isfinite(x + w) & np.isfinite(y + h))
    outside = (x < 0) | (y < 0) | (x + w > NIH_IMAGE_SIDE) | (y + h > NIH_IMAGE_SIDE)
    for mask, problem in ((empty, "width and height must be positive and finite"),
                          (outside, f"the box leaves the {NIH_IMAGE_SIDE}x{NIH_IMAGE_SIDE} image")):  # fmt: skip
        if mask.any():
            row = int(np.flatnonzero(mask.to_numpy())[0])
            raise NIHMetadataError(
                f"{path}: row {row + 2} ({boxes['Image Index'].iloc[row]}, box x={x.iloc[row]}, y={y.iloc[row]}, "
                f"w={w.iloc[row]}, h={h.iloc[row]}): {problem} ({int(mask.sum())} such rows)"
            )
    return boxes


def three_class_label(findings: str, keep_mixed: bool = False) -> Optional[int]:
    """The project's label of one `Finding Labels` string; None for a removed mixed-Atelectasis image."""
    names = {normalize_finding(name) for name in findings.split("|") if name.strip()}
    if names == {"No Finding"}:
        return NO_FINDING
    if "Atelectasis" in names:
        if len(names) == 1 or keep_mixed:
            return ATELECTASIS
        return None
    return OTHER


def read_official_lists(directory: str | Path) -> Optional[dict[str, set[str]]]:
    """`train_val_list.txt` and `test_list.txt` from `directory`, when both exist."""
    directory = Path(directory)
    files = {"train_val": directory / "train_val_list.txt", "test": directory / "test_list.txt"}
    if not all(path.is_file() for path in files.values()):
        return None
    return {
        name: {line.strip() for line in path.read_text().splitlines() if line.strip()} for name, path in files.items()
    }


def _assign_splits(
    table: pd.DataFrame, ratios: Sequence[float], seed: int, official: Optional[Mapping[str, set[str]]]
) -> pd.Series:
    if official is None:
        return patient_splits(table["Patient ID"], ratios, seed)
    # Official lists are patient-wise: test is theirs; train/validation split train_val by patient hash.
    train, validation = float(ratios[0]), float(ratios[1])
    within = patient_splits(table["Patient ID"], (train, validation, 0.0), seed)
    split = within.where(~table["Image Index"].isin(official["test"]), "test")
    unlisted = ~table["Image Index"].isin(official["test"] | official["train_val"])
    if unlisted.any():
        logger.warning("%d images are in neither official list; split by patient hash", int(unlisted.sum()))
    return split


def build_bbox_table(metadata: pd.DataFrame, boxes: pd.DataFrame) -> pd.DataFrame:
    """One row per boxed image: boxes (list of xyxy), findings, and the image's three-class label."""
    grouped = boxes.groupby("Image Index", sort=True)
    table = pd.DataFrame(
        {
            "boxes": grouped.apply(lambda g: g[["x0", "y0", "x1", "y1"]].to_numpy().tolist(), include_groups=False),
            "findings": grouped["finding"].apply(list),
        }
    ).reset_index()
    table = table.merge(metadata, on="Image Index", how="left")
    unknown = table["Patient ID"].isna()
    if unknown.any():
        logger.warning("%d boxed images are not in the metadata; dropped", int(unknown.sum()))
        table = table[~unknown]
    table["label"] = table["Finding Labels"].map(lambda f: three_class_label(f, keep_mixed=True))
    table["split"] = "test"
    return table.reset_index(drop=True)


def _labelled_table(
    metadata: pd.DataFrame, view: str, keep_mixed: bool, max_age: int, removals: dict[str, int]
) -> pd.DataFrame:
    """The metadata labelled by the class rule, filtered by view and plausible age; what each step
    removed is counted in `removals`."""
    labels = metadata["Finding Labels"].map(lambda f: three_class_label(f, keep_mixed))
    removals["mixed_atelectasis"] = int(labels.isna().sum())
    table = metadata.assign(label=labels)[labels.notna()].copy()
    table["label"] = table["label"].astype(int)
    if view.upper() != "ALL":
        keep = table["view"] == view.upper()
        removals[f"view_not_{view.upper()}"] = int((~keep).sum())
        table = table[keep]
    implausible = table["age"].isna() | (table["age"] < 0) | (table["age"] > max_age)
    removals["implausible_age"] = int(implausible.sum())
    if implausible.any():
        logger.warning(
            "dropping %d images with implausible ages: %s",
            int(implausible.sum()),
            table.loc[implausible, "age"].tolist()[:10],
        )
    table = table[~implausible].copy()
    table["age"] = table["age"].astype(int)
    return table


def build_manifest(
    metadata_csv: str | Path,
    bbox_csv: Optional[str | Path] = None,
    view: str = "all",
    per_class: Optional[Mapping[int, int]] = None,
    total: Optional[int] = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    keep_mixed: bool = False,
    max_age: int = 120,
    official_lists_dir: Optional[str | Path] = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The three-class table with splits, and a summary of what was built and what was removed.

    Steps: label by the class rule (mixed Atelectasis removed unless `keep_mixed`), view filter
    (`"PA"`, `"AP"` or `"all"`), implausible ages (missing, negative or over `max_age`) dropped, balancing
    by age bin and sex within each class (`per_class` {label: n} or `total`), patient-wise splits (official
    lists when `official_lists_dir` has them, else a hash of the patient id). When `bbox_csv` is given, the
    boxed images' patients are taken out of the train split (they are the localization test set).
    """
    metadata = read_metadata(metadata_csv)
    removals: dict[str, int] = {}
    table = _labelled_table(metadata, view, keep_mixed, max_age, removals)
    before = len(table)
    table = stratified_sample(table, per_class=per_class, total=total, seed=seed)
    removals["balancing"] = before - len(table)
    official = read_official_lists(official_lists_dir) if official_lists_dir else None
    table["split"] = _assign_splits(table, ratios, seed, official)
    bbox_table = None
    if bbox_csv is not None:
        bbox_table = build_bbox_table(metadata, read_boxes(bbox_csv))
        boxed_patients = set(bbox_table["Patient ID"])
        in_train = (table["split"] == "train") & table["Patient ID"].isin(boxed_patients)
        removals["boxed_patient_in_train"] = int(in_train.sum())
        logger.info("removed %d train images of patients with expert boxes", int(in_train.sum()))
        table = table[~in_train]
    assert_no_patient_leakage(table)
    table = table.assign(
        label_name=table["label"].map(dict(enumerate(CLASS_NAMES))),
        age_bin=age_bin(table["age"]).astype(str),
        findings=table["Finding Labels"],
    )[MANIFEST_COLUMNS].reset_index(drop=True)
    summary = summarize(table, removals, bbox_table, official is not None)
    return table, summary


def summarize(
    table: pd.DataFrame, removals: Mapping[str, int], bbox_table: Optional[pd.DataFrame], official: bool
) -> dict[str, Any]:
    """Counts per split x class x sex x age bin, patient overlap between splits, removals."""
    counts: dict[str, Any] = {}
    for (split, label, sex, bin_name), group in table.groupby(["split", "label_name", "sex", "age_bin"], observed=True):
        counts.setdefault(split, {}).setdefault(label, {}).setdefault(sex, {})[bin_name] = int(len(group))
    patients = {split: set(table.loc[table["split"] == split, "Patient ID"]) for split in SPLITS}
    overlap = {f"{a}&{b}": len(patients[a] & patients[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]}
    summary = {
        "images": int(len(table)),
        "patients": int(table["Patient ID"].nunique()),
        "per_split": {split: int((table["split"] == split).sum()) for split in SPLITS},
        "per_split_class": {
            split: {
                name: int(((table["split"] == split) & (table["label_name"] == name)).sum()) for name in CLASS_NAMES
            }
            for split in SPLITS
        },
        "counts": counts,
        "age_bins": list(AGE_BIN_NAMES),
        "patient_overlap": overlap,
        "removed": dict(removals),
        "official_split_lists": official,
    }
    if bbox_table is not None:
        summary["bbox"] = {
            "images": int(len(bbox_table)),
            "boxes": int(bbox_table["boxes"].map(len).sum()),
            "per_finding": {
                k: int(v) for k, v in pd.Series([f for fs in bbox_table["findings"] for f in fs]).value_counts().items()
            },
            "per_class": {CLASS_NAMES[int(k)]: int(v) for k, v in bbox_table["label"].value_counts().items()},
        }
    return summary


def index_images(data_dir: str | Path) -> dict[str, Path]:
    """File name -> path for every PNG under `data_dir` (flat, or the `images_*/images` folders).

    A name found in two places is refused unless both files are byte-identical (an archive extracted
    twice): the metadata names images by file name alone, so two different files would make the label
    belong to whichever the walk met last."""
    index: dict[str, Path] = {}
    copies = 0
    for path in sorted(Path(data_dir).rglob("*.png")):
        first = index.setdefault(path.name, path)
        if first is path:
            continue
        if first.stat().st_size != path.stat().st_size or first.read_bytes() != path.read_bytes():
            raise NIHMetadataError(
                f"{data_dir}: two different files named {path.name}: {first} and {path}; keep one"
            )
        copies += 1
    if copies:
        logger.warning("%s: %d images appear twice (identical copies); the first of each is used", data_dir, copies)
    return index


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # any decoder failure means the file cannot be used
        return False


def _records(rows: pd.DataFrame, images: Mapping[str, Path], problems: list[tuple[str, str]]) -> Iterable[dict]:
    for row in rows.itertuples(index=False):
        path = images.get(row.image_id)
        if path is None:
            problems.append((row.image_id, "missing"))
            continue
        if not _readable(path):
            problems.append((row.image_id, "unreadable"))
            continue
        yield {
            "image": {"path": str(path), "bytes": None},
            "label": int(row.label),
            "boxes": list(row.boxes),
            "findings": list(row.box_findings),
            "image_id": row.image_id,
            "patient_id": str(row.patient_id),
            "age": int(row.age),
            "sex": row.sex,
            "view": row.view,
        }


def build_dataset_dict(
    data_dir: str | Path,
    config: str = "three_class",
    report_dir: Optional[str | Path] = None,
    **manifest_kwargs: Any,
):
    """A `datasets.DatasetDict` of the images in `data_dir` (three_class: train/validation/test;
    bbox: test). Images are referenced by path. Missing or unreadable files are skipped, counted in the
    log and, when `report_dir` is given, listed in `report_dir/problem_images_<config>.csv` (never in
    `data_dir`, which may be a read-only mount)."""
    from datasets import DatasetDict

    data_dir = Path(data_dir)
    metadata_files = sorted(data_dir.glob("Data_Entry_2017*.csv"))
    if not metadata_files:
        raise NIHMetadataError(f"{data_dir}: no Data_Entry_2017*.csv")
    bbox_csv = data_dir / "BBox_List_2017.csv"
    images = index_images(data_dir)
    problems: list[tuple[str, str]] = []
    if config == "bbox":
        if not bbox_csv.is_file():
            raise NIHMetadataError(f"{bbox_csv}: no such box file")
        table = build_bbox_table(read_metadata(metadata_files[-1]), read_boxes(bbox_csv))
        table = table.dropna(subset=["label"])
        table["age"] = table["age"].fillna(-1)
        splits = {"test": table.assign(box_findings=table["findings"])}
    elif config == "three_class":
        manifest, _ = build_manifest(
            metadata_files[-1],
            bbox_csv if bbox_csv.is_file() else None,
            official_lists_dir=data_dir,
            **manifest_kwargs,
        )
        table = manifest.assign(
            boxes=[[] for _ in range(len(manifest))], box_findings=[[] for _ in range(len(manifest))]
        )
        splits = {split: table[table["split"] == split] for split in SPLITS}
    else:
        raise ValueError(f"config must be 'three_class' or 'bbox', got {config!r}")
    result = {}
    for split, rows in splits.items():
        rows = rows.rename(columns={"Image Index": "image_id", "Patient ID": "patient_id"})
        result[split] = records_to_dataset(list(_records(rows, images, problems)))
    if problems:
        counts = pd.Series([p for _, p in problems]).value_counts().to_dict()
        where = write_problem_list(problems, report_dir, config, id_column="Image Index")
        logger.warning("skipped %d images of %s (%s); list: %s", len(problems), data_dir, counts, where)
    return DatasetDict(result)


def build_pretraining_dataset(data_dir: str | Path, seed: int = 0, report_dir: Optional[str | Path] = None):
    """Every image of `data_dir` that the three-class fine-tuning never evaluates on, with its 14 labels
    in an `image_labels` column (a list of `NIH_FINDINGS` names; empty for No Finding).

    Excluded: every patient of the fine-tuning validation and test splits (same seed and official lists
    as `build_dataset_dict`) and every patient with an expert box (the localization data), so that a
    backbone pretrained here has seen none of the images it is later chosen or scored on."""
    data_dir = Path(data_dir)
    metadata_files = sorted(data_dir.glob("Data_Entry_2017*.csv"))
    if not metadata_files:
        raise NIHMetadataError(f"{data_dir}: no Data_Entry_2017*.csv")
    metadata = read_metadata(metadata_files[-1])
    bbox_csv = data_dir / "BBox_List_2017.csv"
    manifest, _ = build_manifest(
        metadata_files[-1], bbox_csv if bbox_csv.is_file() else None, official_lists_dir=data_dir, seed=seed
    )
    held_out = set(manifest.loc[manifest["split"] != "train", "Patient ID"])
    if bbox_csv.is_file():
        held_out |= set(metadata.loc[metadata["Image Index"].isin(read_boxes(bbox_csv)["Image Index"]), "Patient ID"])
    rows = metadata[~metadata["Patient ID"].isin(held_out)].copy()
    rows["label"] = rows["Finding Labels"].map(lambda f: three_class_label(f, keep_mixed=True))
    rows["age"] = rows["age"].fillna(-1).astype(int)
    labels = [
        [name for name in NIH_FINDINGS if name in {normalize_finding(n) for n in text.split("|")}]
        for text in rows["Finding Labels"]
    ]
    rows = rows.assign(boxes=[[] for _ in range(len(rows))], box_findings=[[] for _ in range(len(rows))], labels=labels)
    rows = rows.rename(columns={"Image Index": "image_id", "Patient ID": "patient_id"})
    images = index_images(data_dir)
    problems: list[tuple[str, str]] = []
    records = list(_records(rows, images, problems))
    if problems:
        where = write_problem_list(problems, report_dir, "pretrain", id_column="Image Index")
        logger.warning("skipped %d images of %s for pretraining; list: %s", len(problems), data_dir, where)
    by_id = dict(zip(rows["image_id"], rows["labels"]))
    dataset = records_to_dataset(records)
    return dataset.add_column("image_labels", [by_id[record["image_id"]] for record in records])


def _per_class(text: Optional[str]) -> Optional[dict[int, int]]:
    if not text:
        return None
    values = [int(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError("--per_class takes three counts: Atelectasis,Other,No")
    return dict(enumerate(values))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="NIH ChestX-ray14 three-class manifest and dataset builder")
    parser.add_argument("--metadata_csv", help="Data_Entry_2017*.csv (manifest mode)")
    parser.add_argument("--bbox_csv", help="BBox_List_2017.csv")
    parser.add_argument("--official_lists_dir", help="folder with train_val_list.txt and test_list.txt")
    parser.add_argument("--manifest_csv", help="write the table here")
    parser.add_argument("--summary_json", help="write the summary here")
    parser.add_argument("--data_dir", help="build the image dataset from this folder")
    parser.add_argument("--config", default="three_class", choices=("three_class", "bbox"))
    parser.add_argument("--output_dir", help="with --data_dir: write Parquet files (images embedded) here")
    parser.add_argument("--view", default="all", choices=("all", "PA", "AP"))
    parser.add_argument("--per_class", type=_per_class, help="target counts Atelectasis,Other,No")
    parser.add_argument("--total", type=int)
    parser.add_argument("--ratios", default="0.8,0.1,0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep_mixed", action="store_true", help="keep Atelectasis + other findings as Atelectasis")
    return parser


def _write_manifest(
    metadata_csv: str,
    bbox_csv: Optional[str],
    official_lists_dir: Optional[str],
    manifest_csv: Optional[str],
    summary_json: Optional[str],
    options: dict[str, Any],
) -> None:
    manifest, summary = build_manifest(metadata_csv, bbox_csv, official_lists_dir=official_lists_dir, **options)
    if manifest_csv:
        manifest.to_csv(manifest_csv, index=False)
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary, indent=2))
    logger.info("manifest: %s", summary["per_split_class"])


def _write_dataset(data_dir: str, config: str, output_dir: Optional[str], options: dict[str, Any]) -> None:
    dataset = build_dataset_dict(data_dir, config, **(options if config == "three_class" else {}))
    logger.info("dataset: %s", {split: len(part) for split, part in dataset.items()})
    if output_dir:
        from datasets.table import embed_table_storage

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for split, part in dataset.items():
            embedded = part.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
            embedded.to_parquet(str(Path(output_dir) / f"{split}.parquet"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.metadata_csv and not args.data_dir:
        parser.error("give --metadata_csv (manifest mode) or --data_dir")
    ratios = [float(v) for v in args.ratios.split(",")]
    options = dict(view=args.view, per_class=args.per_class, total=args.total, ratios=ratios, seed=args.seed,
                   keep_mixed=args.keep_mixed)  # fmt: skip
    try:
        if args.metadata_csv:
            _write_manifest(args.metadata_csv, args.bbox_csv, args.official_lists_dir, args.manifest_csv,
                            args.summary_json, options)  # fmt: skip
        if args.data_dir:
            _write_dataset(args.data_dir, args.config, args.output_dir, options)
    except NIHMetadataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
