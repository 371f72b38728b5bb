"""Phantom generation rate on one core. Prints one JSON object on the last line of stdout:
{"size": 256, "images": N, "images_per_s": ..., "ms_per_image": ..., "target_images_per_s": 200, ...}."""

from __future__ import annotations

import argparse
import json
import time

import cv2

from deit_scm_cxr.data import load_dataset_module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    phantoms = load_dataset_module("phantoms")
    phantoms.generate_phantom(0, size=args.size, bits=args.bits)  # warm-up
    start = time.perf_counter()
    for index in range(args.images):
        phantoms.generate_phantom(index, size=args.size, bits=args.bits)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    dataset = phantoms.build_phantom_dataset(num_train=args.images, num_validation=0, num_test=0, size=args.size)
    build_seconds = time.perf_counter() - start
    report = {
        "size": args.size,
        "bits": args.bits,
        "images": args.images,
        "images_per_s": round(args.images / seconds, 1),
        "ms_per_image": round(seconds / args.images * 1000, 3),
        "dataset_build_images_per_s": round(len(dataset["train"]) / build_seconds, 1),
        "target_images_per_s": 200,
        "target_met": args.images / seconds >= 200,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
