"""What the two datasets in `datasets/` share: the sample contract, the features, balancing by age and
sex, patient-wise splits. The dataset modules (`phantoms`, `nih_cxr14`) import this file.

Every sample, whatever its source, is a dict with
    image (PIL or encoded), label (0 Atelectasis, 1 Other_pathologies, 2 No_pathologies),
    boxes (K x 4 xyxy floats in original pixels), findings (K names, one per box),
    image_id, patient_id, age, sex ("M"/"F"), view ("PA"/"AP"/...),
so training and evaluation never branch on where the data came from.

This package is `deit_scm_cxr.data`, never a top-level `datasets` (which would shadow the library).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from deit_scm_cxr.hub.configuration_deit_scm import DEFAULT_ID2LABEL

logger = logging.getLogger(__name__)

# The classes are the model's (its config's default id2label): defined once, there.
CLASS_NAMES = list(DEFAULT_ID2LABEL.values())
SPLITS = ("train", "validation", "test")
AGE_BINS = (0, 20, 40, 60, 80, 121)
AGE_BIN_NAMES = ("0-19", "20-39", "40-59", "60-79", "80+")
def write_problem_list(
    problems: Sequence[tuple[str, str]], report_dir: Optional[Path], name: str, id_column: str = "image_id"
) -> str:
    """`report_dir/problem_images_<name>.csv` listing each unusable image and why; returns where it went
    ("not written" without a folder: a dataset folder may be read-only, so nothing goes there by default)."""
    if report_dir is None:
        return "not written (no report folder)"
    report = Path(report_dir) / f"problem_images_{name}.csv"
    report.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(problems), columns=[id_column, "problem"]).to_csv(report, index=False)
    return str(report)


def sample_features():  # -> datasets.Features
    """Typed features of the shared sample contract."""
    from datasets import ClassLabel, Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "label": ClassLabel(names=CLASS_NAMES),
            "boxes": List(List(Value("float32"), length=4)),
            "findings": List(Value("string")),
            "image_id": Value("string"),
            "patient_id": Value("string"),
            "age": Value("int32"),
            "sex": Value("string"),
            "view": Value("string"),
        }
    )


def records_to_dataset(records: list[dict]):  # -> datasets.Dataset
    """A `datasets.Dataset` with the shared features from sample dicts; an empty list gives an empty
    split with the right schema (`Dataset.from_list` cannot infer one)."""
    from datasets import Dataset

    features = sample_features()
    columns = {name: [record[name] for record in records] for name in features}
    return Dataset.from_dict(columns, features=features)


def age_bin(ages: pd.Series) -> pd.Series:
    """Age in years -> one of `AGE_BIN_NAMES`."""
    return pd.cut(ages, bins=list(AGE_BINS), right=False, labels=list(AGE_BIN_NAMES))


def _allocate(shares: pd.Series, total: int) -> pd.Series:
    """Split `total` over strata proportionally to `shares`, largest remainders first (sums exactly)."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    remainder = int(total - counts.sum())
    if remainder:
        order = (exact - counts).sort_values(ascending=False, kind="stable").index[:remainder]
        counts.loc[order] += 1
    return counts


def stratified_sample(
    table: pd.DataFrame,
    per_class: Optional[Mapping[int, int]] = None,
    total: Optional[int] = None,
    seed: int = 0,
    label_column: str = "label",
) -> pd.DataFrame:
    """Sample each class to a target size while keeping its age-bin x sex distribution.

    Targets are `per_class` ({label: count}) or `total` split in proportion to the class sizes. A class
    with fewer rows than its target is kept whole (logged). Within a class, each age x sex stratum
    gets its proportional share (largest-remainder rounding), sampled with a seeded generator, so the
    result is deterministic for a seed and the input order does not matter.
    """
    if per_class is None and total is None:
        return table
    table = table.sort_values("Image Index" if "Image Index" in table else "image_id", kind="stable")
    sizes = table[label_column].value_counts().sort_index()
    if per_class is None:
        per_class = _allocate(sizes.astype(float), min(int(total), int(sizes.sum()))).to_dict()
    rng = np.random.default_rng(seed)
    strata = age_bin(table["age"]).astype(str) + "|" + table["sex"].astype(str)
    parts = []
    for label, target in sorted(per_class.items()):
        rows = table[table[label_column] == label]
        if target >= len(rows):
            if target > len(rows):
                logger.warning("class %s has %d rows, fewer than the %d asked for", label, len(rows), target)
            parts.append(rows)
            continue
        groups = strata.loc[rows.index]
        counts = _allocate(groups.value_counts().sort_index().astype(float), int(target))
        for stratum, count in counts.items():
            members = rows.index[groups == stratum]
            chosen = rng.choice(len(members), size=int(count), replace=False)
            parts.append(rows.loc[members[np.sort(chosen)]])
    return pd.concat(parts).sort_values("Image Index" if "Image Index" in table else "image_id", kind="stable")


def patient_bucket(patient_id: object, seed: int = 0) -> float:
    """A deterministic number in [0, 1) for a patient, the same on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def patient_splits(patient_ids: pd.Series, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> pd.Series:
    """Assign each row a split by hashing its patient id: every image of a patient lands together."""
    ratios = np.asarray(ratios, dtype=float)
    if len(ratios) != 3 or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {list(ratios)}")
    edges = np.cumsum(ratios / ratios.sum())
    buckets = patient_ids.map(lambda pid: patient_bucket(pid, seed))
    index = np.minimum(np.searchsorted(edges, buckets.to_numpy(), side="right"), 2)
    return pd.Series(np.asarray(SPLITS)[index], index=patient_ids.index)


def assert_no_patient_leakage(
    table: pd.DataFrame, split_column: str = "split", patient_column: str = "Patient ID"
) -> None:
    """Raise if any patient appears in two splits."""
    per_patient = table.groupby(patient_column)[split_column].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        raise AssertionError(f"{len(leaking)} patients appear in more than one split, e.g. {list(leaking.index[:5])}")


__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "AGE_BIN_NAMES",
    "sample_features",
    "records_to_dataset",
    "age_bin",
    "stratified_sample",
    "patient_bucket",
    "patient_splits",
    "assert_no_patient_leakage",
]
