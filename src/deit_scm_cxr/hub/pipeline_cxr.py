"""The `chest-xray-localization` pipeline: a radiograph in, calibrated class scores, a heatmap and boxes
out, in one call.

    from transformers import pipeline

    detector = pipeline(model="org/deit-scm-cxr", trust_remote_code=True)
    result = detector("patient.dcm")  # a path, bytes, a PIL image, a numpy array or a DICOM; or a list
    result["label"], result["score"], result["boxes"]

Uploaded next to the weights and registered in the model's config (`custom_pipelines`), so the task is
found without naming it. Every input goes through the model's own `CXRImageProcessor`, which reads DICOM
with pydicom (modality and VOI LUTs, MONOCHROME1), never through PIL, and refuses an image it cannot use
with a `CXRImageError` naming it. This file imports only installed packages (remote code).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch
from transformers import Pipeline

logger = logging.getLogger(__name__)

TASK = "chest-xray-localization"
# What the model's config.json records so that `pipeline(model=..., trust_remote_code=True)` finds this class.
PIPELINE_ENTRY = {
    TASK: {
        "impl": "pipeline_cxr.ChestXrayLocalizationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "type": "image",
        "default": {},
    }
}


class ChestXrayLocalizationPipeline(Pipeline):
    """Per image: `label` and `score` (calibrated probability: the model's temperature scaling), `scores`
    for every class, `heatmap` (float32, original pixels, 0-1) of the released map, `boxes` (K x 4
    inclusive xyxy, original pixels) and `box_scores`; `out_of_distribution` (True when the image is unlike
    the training data: its `ood_score`, the model's Mahalanobis score of the pooled features, is above
    `ood_threshold`, which let `ood_false_alarm_rate` of the validation images through; None for a model
    saved without the statistics). Scores and boxes of such an image mean little, however confident.

    Call options: `threshold` (a fraction of the heatmap's maximum; default: the one calibrated on the
    validation boxes and stored in the processor), `localization_map` (`"coupled_maps"` F0*S0,
    `"semantic_maps"` S0 or `"attention_maps"` F0; default: the released one), `multi_contour` (a box
    per region above the threshold, default True; False keeps the largest region's box only),
    `return_maps` (also return `maps`: every map at the model's grid, {output name: (C, h, w)}, with the
    `logits` and the processor's `geometry` row, to redraw another map or threshold without rerunning the
    model, as the demo does), `on_error` (`"raise"` or `"record"`: see `__call__`), and the pipelines'
    `batch_size`. Any other option is refused (`TypeError`), so that a misspelled one cannot be ignored.
    """

    # Which processors transformers loads for this pipeline (its base class declares them as None).
    _load_image_processor = True  # type: ignore[assignment]
    _load_processor = False  # type: ignore[assignment]
    _load_feature_extractor = False  # type: ignore[assignment]
    _load_tokenizer = False  # type: ignore[assignment]
    # The model outputs the pipeline keeps, batched along dim 0 (a ModelOutput is not unbatched by transformers).
    _OUTPUTS = ("logits", "probabilities", "coupled_maps", "semantic_maps", "attention_maps", "ood_scores")

    @property
    def processor_(self) -> Any:
        """The model's `CXRImageProcessor` (the base class types it as any image processor, or None)."""
        return self.image_processor

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """One result per image: a dict for one input, a list of dicts for a list (an empty list gives []).

        `on_error` says what a file the processor refuses (`CXRImageError`) does: `"raise"` (the default for
        one input) raises it; `"record"` (the default for a list) gives that item `{"error": message}` and
        keeps every other result."""
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                return []
            kwargs.setdefault("on_error", "record")
        self._failures: list[str] = []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        threshold: Optional[float] = None,
        localization_map: Optional[str] = None,
        multi_contour: Optional[bool] = None,
        return_maps: Optional[bool] = None,
        on_error: Optional[str] = None,
        smoothing: Optional[float] = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        if kwargs:  # a misspelled option would otherwise be ignored without a word
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {sorted(kwargs)}; it takes threshold, "
                "localization_map, smoothing, multi_contour, return_maps, on_error, batch_size and num_workers"
            )
        pre: dict[str, Any] = {}
        if on_error is not None:
            if on_error not in ("raise", "record"):
                raise ValueError(f'on_error must be "raise" or "record", got {on_error!r}')
            pre["on_error"] = on_error
        post: dict[str, Any] = {}
        if return_maps is not None:
            post["return_maps"] = bool(return_maps)
        if threshold is not None:
            post["threshold"] = float(threshold)
        if localization_map is not None:
            post["localization_map"] = localization_map
        if smoothing is not None:
            post["smoothing"] = smoothing
        if multi_contour is not None:
            post["multi_contour"] = bool(multi_contour)
        return pre, {}, post

    def preprocess(self, image: Any, on_error: str = "raise") -> dict[str, Any]:  # type: ignore[override]
        try:
            inputs = self.processor_([image])
        except ValueError as error:  # CXRImageError and the processor's other typed refusals
            if on_error == "raise":
                raise
            # A placeholder of the batch's shape, so that it batches with the others; the message is kept
            # here and handed back by postprocess in this item's place.
            self._failures.append(f"{type(error).__name__}: {error}")
            size = self.processor_.size
            return {
                "pixel_values": torch.zeros(1, 3, int(size["height"]), int(size["width"])),
                "geometry": torch.zeros(1, 8, dtype=torch.int64),
                "failure": torch.tensor([len(self._failures)]),
            }
        return {"pixel_values": inputs["pixel_values"], "geometry": torch.as_tensor(inputs["geometry"]),
                "failure": torch.tensor([0])}  # fmt: skip

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        outputs = self.model(model_inputs["pixel_values"])
        kept = {name: outputs[name] for name in self._OUTPUTS if outputs.get(name) is not None}
        return {**kept, "geometry": model_inputs["geometry"], "failure": model_inputs["failure"]}

    def postprocess(  # type: ignore[override]
        self,
        model_outputs: dict[str, Any],
        threshold: Optional[float] = None,
        localization_map: Optional[str] = None,
        multi_contour: bool = True,
        return_maps: bool = False,
        smoothing: Optional[float] = None,
    ) -> dict[str, Any]:
        failure = int(model_outputs["failure"].reshape(-1)[0])
        if failure:
            return {"error": self._failures[failure - 1]}
        outputs = model_outputs
        id2label = {int(k): v for k, v in (self.model.config.id2label or {}).items()}
        geometry = np.asarray(model_outputs["geometry"]).reshape(-1, 8)
        result = self.processor_.post_process_localization(
            outputs,
            geometry=geometry,
            threshold=threshold,
            multi_contour=multi_contour,
            id2label=id2label,
            localization_map=localization_map,
            smoothing=smoothing,
        )[0]
        probabilities = outputs["probabilities"][0].detach().float().cpu().numpy()
        extra: dict[str, Any] = {}
        if return_maps:
            classes = outputs["logits"].shape[-1]
            extra["maps"] = {
                name: outputs[name][0].detach().float().cpu().expand(classes, -1, -1).numpy()
                if outputs[name].ndim == 3
                else outputs[name][0].detach().float().cpu().numpy()
                for name in ("coupled_maps", "semantic_maps", "attention_maps")
            }
            extra["logits"] = outputs["logits"][0].detach().float().cpu().numpy()
            extra["geometry"] = geometry[0]
        return {
            **self._out_of_distribution(outputs),
            "label": result["label_name"],
            "score": float(result["score"]),
            "scores": {id2label[i]: float(p) for i, p in enumerate(probabilities)},
            "heatmap": np.asarray(result["heatmap"], dtype=np.float32),
            "boxes": result["boxes"],
            "box_scores": result["box_scores"],
            # what the processor applied: the map, tau and the Gaussian width (tokens) on its grid
            "localization_map": result["localization_map"],
            "threshold": result["threshold"],
            "smoothing": result["smoothing"],
            **extra,
        }

    def _out_of_distribution(self, outputs: Any) -> dict[str, Any]:
        config = self.model.config
        scores = outputs.get("ood_scores")
        if scores is None or getattr(config, "ood_threshold", None) is None:
            return {"out_of_distribution": None, "ood_score": None, "ood_threshold": None}
        score, threshold = float(scores[0]), float(config.ood_threshold)
        flagged = not score <= threshold  # a NaN score is an alarm too
        if flagged:
            logger.warning(
                "the image is unlike the model's training data (out-of-distribution score %.1f > %.1f): its "
                "class scores and boxes are not reliable", score, threshold,
            )
        return {"out_of_distribution": flagged, "ood_score": score, "ood_threshold": threshold}


__all__ = ["ChestXrayLocalizationPipeline", "PIPELINE_ENTRY", "TASK"]
