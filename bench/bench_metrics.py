"""MaxBoxAccV2 over 1,000 score maps of 224x224 at 100 thresholds: ours against a plain per-image,
per-threshold loop written the way clovaai/wsolevaluation does it. Prints one JSON object on the last
line of stdout with both timings, their ratio and both results (which must be identical).

Maps are CAM-like: 14x14 grids with one to three blobs and noise, upsampled bicubically and min-max
normalized, as a DeiT-S/16 map would be; each image has one to two ground-truth boxes.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from deit_scm_cxr.evaluation.boxes import DEFAULT_THRESHOLDS
from deit_scm_cxr.evaluation.metrics import IOU_THRESHOLDS_V2, LocalizationScores


def cam_like_maps(count: int, seed: int, size: int = 224) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:14, 0:14]
    maps = []
    for _ in range(count):
        grid = rng.normal(0, 0.05, (14, 14))
        for _ in range(rng.integers(1, 4)):
            cy, cx, sigma = rng.uniform(0, 14), rng.uniform(0, 14), rng.uniform(1, 4)
            grid += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        up = cv2.resize(grid.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        maps.append((up - up.min()) / (up.max() - up.min()))
    return maps


def random_boxes(count: int, seed: int, size: int = 224) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    boxes = []
    for _ in range(count):
        rows = []
        for _ in range(rng.integers(1, 3)):
            w, h = rng.integers(20, 150, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            rows.append([x, y, x + w, y + h])
        boxes.append(np.array(rows))
    return boxes


# ---- the reference way: one OpenCV pass per threshold, boxes per contour, tiled IoU ---------------


def reference_boxes(scoremap: np.ndarray, thresholds, multi_contour: bool):
    height, width = scoremap.shape
    image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    boxes, counts = [], []
    for threshold in thresholds:
        _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            boxes.append(np.asarray([[0, 0, 0, 0]]))
            counts.append(1)
            continue
        if not multi_contour:
            contours = [max(contours, key=cv2.contourArea)]
        found = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            found.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        boxes.append(np.asarray(found))
        counts.append(len(contours))
    return boxes, counts


def reference_iou(box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    num_a, num_b = box_a.shape[0], box_b.shape[0]
    a = np.tile(box_a, num_b).reshape(num_a, num_b, -1)
    b = np.transpose(np.tile(box_b, num_a).reshape(num_b, num_a, -1), (1, 0, 2))
    min_x, min_y = np.maximum(a[:, :, 0], b[:, :, 0]), np.maximum(a[:, :, 1], b[:, :, 1])
    max_x, max_y = np.minimum(a[:, :, 2], b[:, :, 2]), np.minimum(a[:, :, 3], b[:, :, 3])
    inter = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
    area_a = (a[:, :, 2] - a[:, :, 0] + 1) * (a[:, :, 3] - a[:, :, 1] + 1)
    area_b = (b[:, :, 2] - b[:, :, 0] + 1) * (b[:, :, 3] - b[:, :, 1] + 1)
    denominator = area_a + area_b - inter
    degenerate = np.where(denominator <= 0)
    denominator[degenerate] = 1
    ious = inter / denominator
    ious[degenerate] = 0
    return ious


def reference_box_acc(maps, gt, thresholds, deltas, multi_contour: bool) -> dict[float, np.ndarray]:
    correct = {d: np.zeros(len(thresholds)) for d in deltas}
    for scoremap, truth in zip(maps, gt):
        boxes, counts = reference_boxes(scoremap, thresholds, multi_contour)
        ious = reference_iou(np.concatenate(boxes, axis=0), np.asarray(truth))
        sliced, start = [], 0
        for count in counts:
            sliced.append(max(ious.max(1)[start : start + count]))
            start += count
        for delta in deltas:
            correct[delta][np.where(np.asarray(sliced) >= delta)[0]] += 1
    return {d: correct[d] * 100.0 / len(maps) for d in deltas}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    maps, gt = cam_like_maps(args.maps, args.seed), random_boxes(args.maps, args.seed)
    thresholds = DEFAULT_THRESHOLDS

    start = time.perf_counter()
    reference_v2 = reference_box_acc(maps, gt, thresholds, IOU_THRESHOLDS_V2, multi_contour=True)
    reference_v2_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference_v1 = reference_box_acc(maps, gt, thresholds, (0.5,), multi_contour=False)
    reference_v1_seconds = time.perf_counter() - start

    timings, scores = {}, None
    for workers in (1, 2):
        start = time.perf_counter()
        scores = LocalizationScores.from_maps(maps, gt, thresholds=thresholds, workers=workers)
        ours_v2 = {d: scores.box_acc(d, multi_contour=True) for d in IOU_THRESHOLDS_V2}
        ours_v1 = scores.box_acc(0.5)
        timings[workers] = time.perf_counter() - start

    identical = all(np.array_equal(ours_v2[d], reference_v2[d]) for d in IOU_THRESHOLDS_V2) and np.array_equal(
        ours_v1, reference_v1[0.5]
    )
    report = {
        "maps": args.maps,
        "size": 224,
        "thresholds": len(thresholds),
        "reference_v2_seconds": round(reference_v2_seconds, 3),
        "reference_v1_plus_v2_seconds": round(reference_v2_seconds + reference_v1_seconds, 3),
        "ours_v1_and_v2_seconds_1_thread": round(timings[1], 3),
        "ours_v1_and_v2_seconds_2_threads": round(timings[2], 3),
        "speedup_v2_1_thread": round(reference_v2_seconds / timings[1], 2),
        "speedup_v2_2_threads": round(reference_v2_seconds / timings[2], 2),
        "speedup_v1_plus_v2_1_thread": round((reference_v2_seconds + reference_v1_seconds) / timings[1], 2),
        "speedup_v1_plus_v2_2_threads": round((reference_v2_seconds + reference_v1_seconds) / timings[2], 2),
        "MaxBoxAccV2_reference": float(np.mean([reference_v2[d].max() for d in IOU_THRESHOLDS_V2])),
        "MaxBoxAccV2_ours": float(np.mean([ours_v2[d].max() for d in IOU_THRESHOLDS_V2])),
        "MaxBoxAcc_reference": float(reference_v1[0.5].max()),
        "MaxBoxAcc_ours": float(ours_v1.max()),
        "identical_box_acc_at_every_threshold": bool(identical),
        "target_speedup": 5.0,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
