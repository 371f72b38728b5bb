"""What a user sees: boxes that frame heat, the coupled map that keeps F0's peak, the pointing game, the
out-of-distribution score, titled pictures, and the peer the ablation measures the model against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deit_scm_cxr.evaluation.evaluator import epoch_localization
from deit_scm_cxr.evaluation.metrics import EvaluationSplit, pointing_game_per_finding, pointing_hits
from deit_scm_cxr.evaluation.reporting import fit_ood_statistics, mahalanobis_scores
from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
from deit_scm_cxr.hub.localization import (
    GROUND_TRUTH_BOX_COLOR,
    PREDICTED_BOX_COLOR,
    LocalizationInputError,
    boxes_with_scores,
    overlay_heatmap,
    scoremap_to_boxes,
)
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification, couple

ROOT = Path(__file__).resolve().parents[1]


def _ring(size: int = 64, inner: float = 10, outer: float = 20) -> np.ndarray:
    """A hot ring (0.9) around a cold centre (0.1) on a zero background."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    heat = np.zeros((size, size), dtype=np.float32)
    heat[(radius > inner) & (radius < outer)] = 0.9
    heat[radius <= inner] = 0.1
    return heat


# ----------------------------------------------------------------------------- boxes for people


def test_a_ring_gives_one_user_box_while_the_metric_keeps_the_hole():
    heat = _ring()
    boxes, scores = boxes_with_scores(heat, 0.5, multi_contour=True)
    # The ring spans radius 20 around (32, 32): pixels 13..51 are above 0.5 x max; the box ends one past
    # them, as wsolevaluation's x + w does (kept for users too, so that both box kinds share one convention).
    assert boxes.tolist() == [[13, 13, 52, 52]]
    assert scores[0] == pytest.approx(0.9, abs=1e-6)  # the ring's heat, not diluted by the cold centre
    # The metric code keeps wsolevaluation's RETR_TREE contours: the ring's outline and the hole's.
    metric = scoremap_to_boxes(heat, 0.5, multi_contour=True, normalized=True)
    assert len(metric) == 2
    hole = [box for box in metric.tolist() if box != [13, 13, 52, 52]]
    assert len(hole) == 1 and hole[0][0] > 13 and hole[0][2] < 52


def test_user_boxes_merge_nested_boxes_and_come_sorted_by_score():
    heat = np.zeros((80, 80), dtype=np.float32)
    # A C-shaped region (score 0.6) whose bounding box holds a separate hot blob (0.95) in its mouth,
    # and a third region elsewhere (0.8).
    heat[10:40, 10:14] = 0.6
    heat[10:14, 10:40] = 0.6
    heat[36:40, 10:40] = 0.6
    heat[22:28, 24:30] = 0.95
    heat[60:70, 60:70] = 0.8
    boxes, scores = boxes_with_scores(heat, 0.3, multi_contour=True)
    # The blob's box lies inside the C's box: merged into it, which keeps the higher score.
    assert boxes.tolist() == [[10, 10, 40, 40], [60, 60, 70, 70]]
    assert scores.tolist() == pytest.approx([0.95, 0.8])
    largest, _ = boxes_with_scores(heat, 0.3, multi_contour=False)
    assert largest.tolist() == [[10, 10, 40, 40]]
    nothing, none_scores = boxes_with_scores(np.zeros((8, 8), np.float32), 0.5, multi_contour=True)
    assert nothing.shape == (0, 4) and none_scores.shape == (0,)


def test_overlay_titles_and_legend():
    image = np.full((50, 60), 100, dtype=np.uint8)
    heat = np.zeros((50, 60), dtype=np.float32)
    plain = overlay_heatmap(image, heat, boxes=np.array([[5, 5, 20, 20]]), gt_boxes=np.array([[30, 30, 50, 45]]))
    assert plain.shape == (50, 60, 3)
    titled = overlay_heatmap(image, heat, boxes=np.array([[5, 5, 20, 20]]), gt_boxes=np.array([[30, 30, 50, 45]]),
                             title=["S0 (semantic, CAM)", "boxes at 0.42 x max", "pred. Atelectasis 91%"])  # fmt: skip
    # Enlarged to stay legible, a strip on top; the picture itself below it, unchanged but for the scale.
    assert titled.shape[1] == 384 and titled.shape[0] > round(50 * 384 / 60)
    strip = titled[: titled.shape[0] - round(50 * 384 / 60)]
    assert (strip == 255).all(axis=-1).any()  # white title text
    colours = {tuple(int(v) for v in pixel) for pixel in strip.reshape(-1, 3)}
    # The legend names each box colour in that colour (anti-aliasing blends edges; the stroke cores are pure).
    assert tuple(PREDICTED_BOX_COLOR) in colours and tuple(GROUND_TRUTH_BOX_COLOR) in colours


# ----------------------------------------------------------------------------- the coupled map


def test_coupled_map_keeps_the_attention_peak_when_the_class_map_is_negative():
    attention = torch.zeros(1, 1, 6, 6)
    attention[0, 0, 2, 4] = 1.0  # F0 peaks on the finding
    attention[0, 0, 5, 0] = 0.3
    semantic = torch.full((1, 2, 6, 6), -4.0)  # S0 negative everywhere, as under log-sum-exp pooling
    semantic[0, 0, 2, 4] = -0.5  # and least negative on the finding
    semantic[0, 1] = torch.linspace(-3, -1, 36).view(6, 6)
    official = couple(attention, semantic, "product")
    assert torch.equal(official, attention * semantic)
    # The official product turns the peak into a cold spot, below the map's mean: the inversion the pictures showed.
    assert official[0, 0, 2, 4] < official[0, 0].mean() and int(official[0, 0].argmax()) != 2 * 6 + 4
    fixed = couple(attention, semantic, "minmax")
    assert int(fixed[0, 0].argmax()) == 2 * 6 + 4
    assert fixed.min() >= 0 and fixed.max() <= 1


def test_paper_variant_keeps_the_official_product_and_cxr_the_minmax_coupling():
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "image_size": 32, "patch_size": 8}  # fmt: skip
    for variant, coupling in (("paper", "product"), ("cxr", "minmax")):
        config = DeiTSCMConfig.from_preset("deit-small", variant, **tiny)
        assert config.scm_coupling == coupling
        model = DeiTSCMForImageClassification(config).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        attention = out.attention_maps[:, None]
        if coupling == "product":
            assert torch.equal(out.coupled_maps, attention * out.semantic_maps)
        else:
            flat = out.semantic_maps.flatten(2)
            low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
            expected = attention * (out.semantic_maps - low) / (high - low)
            torch.testing.assert_close(out.coupled_maps, expected)
    with pytest.raises(ValueError, match="scm_coupling"):
        DeiTSCMConfig(scm_coupling="sum")


# ----------------------------------------------------------------------------- the pointing game


def test_pointing_game_on_hand_made_maps():
    boxes = [np.array([[10, 10, 20, 20]]), np.array([[0, 0, 5, 5], [30, 30, 39, 39]]), np.array([[10, 10, 20, 20]])]
    inside = np.zeros((40, 40))
    inside[15, 12] = 1.0  # row 15, column 12: inside the first box
    second = np.zeros((40, 40))
    second[35, 31] = 2.0  # inside the second image's second box
    outside = np.zeros((40, 40))
    outside[25, 5] = 1.0
    assert pointing_hits([inside, second, outside], boxes).tolist() == [True, True, False]
    # A box edge counts (inclusive boxes); a column outside by one does not.
    edge, beyond = np.zeros((40, 40)), np.zeros((40, 40))
    edge[20, 20], beyond[20, 21] = 1.0, 1.0
    assert pointing_hits([edge, beyond], boxes[:1] * 2).tolist() == [True, False]
    # A constant map points at the image centre (19.5 -> 20 after rounding): a hit only for a central box.
    constant = np.ones((40, 40))
    assert pointing_hits([constant, constant], [np.array([[18, 18, 22, 22]]), np.array([[0, 0, 10, 10]])]).tolist() == [
        True, False]  # fmt: skip


def test_pointing_game_per_finding_counts_a_hit_only_in_that_findings_box():
    def peak_at(x: int, y: int) -> np.ndarray:
        scoremap = np.zeros((40, 40))
        scoremap[y, x] = 1.0
        return scoremap

    boxes = [np.array([[0, 0, 9, 9], [20, 20, 39, 39]]), np.array([[0, 0, 9, 9]]), np.array([[10, 0, 30, 5]])]
    findings = [["Nodule", "Mass"], ["Nodule"], ["Atelectasis"]]
    # Image 0 points into its Mass box, not its Nodule box: a hit for Mass only.
    per_finding = pointing_game_per_finding([peak_at(30, 30), peak_at(5, 5), peak_at(20, 20)], boxes, findings)
    assert per_finding == {
        "Atelectasis": {"images": 1, "pointing_game": 0.0},
        "Mass": {"images": 1, "pointing_game": 100.0},
        "Nodule": {"images": 2, "pointing_game": 50.0},
    }
    with pytest.raises(LocalizationInputError, match="image 0: 2 boxes, 1 findings"):
        pointing_game_per_finding([peak_at(0, 0)], boxes[:1], [["Nodule"]])


def test_each_epoch_scores_the_map_that_points_best():
    """The per-epoch localization (issue 31): every map's pointing game, and the boxes of the map that points
    best, the coupled map on ties; not always the coupled map, which the scratch recipe does not release."""
    box = np.array([[0, 0, 19, 19]], dtype=np.float64)  # the top-left quarter of a 40 x 40 frame
    block = np.zeros((4, 4))
    block[:2, :2] = 1.0  # heat exactly on the box: its boxes match it
    plateau = np.full((4, 4), 0.8)
    plateau[1, 1], plateau[3, 3] = 1.0, 0.7  # peaks in the box, but no threshold gives a box with IoU >= 0.5
    far = np.zeros((4, 4))
    far[3, 3] = 1.0  # peaks in the opposite corner
    maps = {"coupled": np.stack([far, far]), "semantic": np.stack([block, block]), "attention": np.stack([block, far])}
    split = EvaluationSplit(maps, [box, box], (40, 40), np.ones(2, dtype=bool))
    scores = epoch_localization(split)
    assert (scores["pointing_game_coupled"], scores["pointing_game_semantic"], scores["pointing_game_attention"]) == (
        0.0, 100.0, 50.0)  # fmt: skip
    assert scores["pointing_game"] == 100.0 and scores["max_box_acc"] == 100.0  # S0's boxes, not F0*S0's
    # A tie between S0 and F0*S0 goes to F0*S0: its pointing game, and its boxes (none right here).
    split.maps["coupled"] = np.stack([plateau, plateau])
    scores = epoch_localization(split)
    assert scores["pointing_game_coupled"] == scores["pointing_game_semantic"] == 100.0
    assert scores["pointing_game"] == 100.0 and scores["max_box_acc"] == 0.0


# ----------------------------------------------------------------------------- out-of-distribution score


def test_mahalanobis_score_and_threshold_on_gaussian_features():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    scale = np.array([1.0, 0.5, 2.0])
    labels = rng.integers(0, 2, 4000)
    train = means[labels] + rng.normal(size=(4000, 3)) * scale
    validation = means[rng.integers(0, 2, 1000)] + rng.normal(size=(1000, 3)) * scale
    fitted = fit_ood_statistics(train, labels, 2, validation, false_alarm_rate=0.05)
    np.testing.assert_allclose(fitted["ood_class_means"], means, atol=0.15)
    # The shrunk precision is close to the true inverse covariance diag(1, 4, 0.25).
    np.testing.assert_allclose(fitted["ood_precision"], np.diag(1 / scale**2), atol=0.2)
    assert fitted["validation_false_alarm_rate"] <= 0.05
    # A squared Mahalanobis distance in 3 dimensions: the 95 % quantile of chi-square(3) is 7.81.
    assert fitted["ood_threshold"] == pytest.approx(7.81, rel=0.15)
    far = np.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    # (3, 0, 0) is 3 from both means: 9; (0, 4, 0) is 4 / 0.5 = 8 sigma: 64; (0, 0, 1) is half a sigma: 0.25.
    scores = mahalanobis_scores(far, np.asarray(means), np.diag(1 / scale**2))
    np.testing.assert_allclose(scores, [9.0, 64.0, 0.25])


def test_model_ood_scores_follow_its_config():
    torch.manual_seed(0)
    config = DeiTSCMConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                           image_size=16, patch_size=8)  # fmt: skip
    model = DeiTSCMForImageClassification(config).eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        plain = model(pixels)
        asked = model(pixels, output_pooled_features=True)
    # No statistics: no score, and the features only when asked for (inference spends nothing on them).
    assert plain.ood_scores is None and plain.pooled_features is None
    assert asked.ood_scores is None and asked.pooled_features.shape == (3, 8)
    means = [[0.0] * 8, [1.0] * 8, [-1.0] * 8]
    model.config.update({"ood_class_means": means, "ood_precision": np.eye(8).tolist(), "ood_threshold": 5.0})
    with torch.no_grad():
        scored = model(pixels)
    features = scored.pooled_features.numpy().astype(np.float64)
    expected = np.min([((features - np.asarray(m)) ** 2).sum(axis=1) for m in means], axis=0)
    np.testing.assert_allclose(scored.ood_scores.numpy(), expected, rtol=1e-5)
    # New statistics replace the cached ones.
    model.config.update({"ood_precision": (2 * np.eye(8)).tolist()})
    with torch.no_grad():
        np.testing.assert_allclose(model(pixels).ood_scores.numpy(), 2 * expected, rtol=1e-5)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"ood_threshold": 3.0}, "given together"),
        ({"ood_threshold": float("nan"), "ood_class_means": [[0.0] * 8] * 3, "ood_precision": [[0.0] * 8] * 8},
         "finite number"),
        ({"ood_threshold": 1.0, "ood_class_means": [[0.0] * 7] * 3, "ood_precision": [[0.0] * 8] * 8},
         "3 x 8"),
        ({"ood_threshold": 1.0, "ood_class_means": [[0.0] * 8] * 3, "ood_precision": [[float("inf")] * 8] * 8},
         "not a finite number"),
    ],
)  # fmt: skip
def test_config_refuses_broken_ood_statistics(fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        DeiTSCMConfig(hidden_size=8, num_attention_heads=2, **fields)


def test_a_run_fits_the_score_and_the_pipeline_flags_a_real_film(tmp_path):
    from pydicom.data import get_testdata_file
    from transformers import pipeline

    from tiny_run import train_tiny

    run = train_tiny(tmp_path / "run", 3)
    results = json.loads((run / "all_results.json").read_text())
    ood = results["out_of_distribution"]
    config = json.loads((run / "config.json").read_text())
    assert config["ood_threshold"] == ood["threshold"] and ood["target_false_alarm_rate"] == 0.05
    assert ood["validation_false_alarm_rate"] <= 0.05
    assert len(config["ood_precision"]) == config["hidden_size"] == 32
    detector = pipeline(model=str(run), trust_remote_code=True)
    film = detector(get_testdata_file("RG1_UNCR.dcm"))
    assert film["out_of_distribution"] is True and film["ood_score"] > film["ood_threshold"] == ood["threshold"]
    card = (run / "README.md").read_text()
    assert "Images unlike the training data" in card and "Mahalanobis" in card


# ----------------------------------------------------------------------------- the peer


def test_peer_cam_maps_are_the_classifier_over_the_features():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import peer_cam

    torch.manual_seed(0)
    model = peer_cam.build_peer("resnet10t", 3, output_stride=8, width=0.25).eval()
    pixels = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([2, 0])
    out = peer_cam.class_maps(model, pixels, labels)
    features = model.forward_features(pixels).detach()
    assert out["cam"].shape == (2, 8, 8)  # output stride 8: the DeiT's grid at patch 8
    weight = model.get_classifier().weight.detach()
    for image, label in enumerate(labels.tolist()):
        by_hand = (weight[label][:, None, None] * features[image]).sum(0)
        torch.testing.assert_close(out["cam"][image], by_hand, rtol=1e-4, atol=1e-5)
    assert (out["gradcam"] >= 0).all()


def test_peer_smoke_run_writes_what_the_ablation_reads(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import ablation
    import peer_cam

    folder = tmp_path / "resnet_cam-seed0"
    peer_cam.main(["--output_dir", str(folder), "--seed", "0", "--num_phantoms", "48", "--image_size", "64",
                   "--epochs", "1", "--width", "0.25", "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
    results = ablation.load_run(folder)
    row = ablation.measures(results)
    for name in ("cam", "gradcam", "random", "released"):
        assert 0.0 <= row[f"{name}/pointing_game"] <= 100.0 and 0.0 <= row[f"{name}/PxAP"] <= 100.0
        low, high = row[f"{name}/pointing_game_ci_low"], row[f"{name}/pointing_game_ci_high"]
        assert low <= row[f"{name}/pointing_game"] <= high
    assert results["localization"]["localization_map"] in ("cam", "gradcam")
    assert results["training"]["epochs"] == 1


def test_peer_refuses_a_negative_smoothing_width_before_training(tmp_path, capsys):
    """A bad width is a usage error at once, not a ValueError after the whole training budget is spent."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import peer_cam

    folder = tmp_path / "peer"
    with pytest.raises(SystemExit) as exit_info:
        peer_cam.main(["--output_dir", str(folder), "--map_smoothing_sigmas", "0", "-1"])
    assert exit_info.value.code == 2
    assert "--map_smoothing_sigmas must be a finite number >= 0" in capsys.readouterr().err
    assert not (folder / "peer_weights.pt").exists()


def test_a_peer_is_handed_the_deit_arms_data_and_batch(tmp_path):
    """In another regime (the GPU's 224/16 on more phantoms) the peer must see the DeiT arms' images and batch:
    the ablation hands it those flags, and it honours them."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import ablation
    import peer_cam

    extra = ["--preset", "deit-tiny", "--num_phantoms", "48", "--num_eval_phantoms", "80", "--phantom_size", "128",
             "--num_train_epochs", "30", "--per_device_train_batch_size", "16", "--image_size", "64"]  # fmt: skip
    shared = ablation.data_flags(extra)
    assert shared == ["--num_phantoms", "48", "--num_eval_phantoms", "80", "--phantom_size", "128",
                      "--per_device_train_batch_size", "16", "--image_size", "64"]  # fmt: skip
    folder = tmp_path / "resnet_cam-seed0"
    peer_cam.main([*shared, "--output_dir", str(folder), "--seed", "0", "--epochs", "1", "--width", "0.25",
                   "--device", "cpu", "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
    results = ablation.load_run(folder)
    assert results["classification"]["test"]["num_samples"] == 20  # a quarter of the 80 evaluation phantoms
    assert results["training"]["steps"] == 3  # 48 training phantoms in batches of 16
    assert results["environment"]["device"] == "cpu"
