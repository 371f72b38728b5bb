"""Tests of CXRImageProcessor: decoding, the pipeline, geometry, bad input, post-processing, remote code."""

from __future__ import annotations

import io
import json
import os
import re

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from deit_scm_cxr.hub.image_processing_cxr import (
    GEOMETRY_FIELDS,
    CXRImageError,
    CXRImageProcessor,
    Geometry,
    overlay_heatmap,
)
from remote_code import run_outside_repo

pydicom = pytest.importorskip("pydicom", reason="DICOM tests need pydicom")


def _real_radiograph() -> str:
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG1_UNCR.dcm")
    except Exception:  # pydicom-data not installed or file not in this version
        path = None
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    return path


def _regions(pixel_values: torch.Tensor) -> tuple[float, float]:
    """Mean of the lung fields (outer thirds at mid height) and of the central column."""
    image = pixel_values[0, 0].numpy()
    h, w = image.shape
    band = image[h // 3 : 2 * h // 3]
    lungs = np.concatenate([band[:, : w // 3].ravel(), band[:, 2 * w // 3 :].ravel()]).mean()
    centre = band[:, 2 * w // 5 : 3 * w // 5].mean()
    return float(lungs), float(centre)


# ----------------------------------------------------------------------------- real radiograph


def test_monochrome1_radiograph_has_dark_lungs_and_bright_mediastinum():
    path = _real_radiograph()
    dataset = pydicom.dcmread(path)
    assert dataset.PhotometricInterpretation == "MONOCHROME1" and int(dataset.BitsStored) > 8
    lungs, centre = _regions(CXRImageProcessor()(path)["pixel_values"])
    assert lungs < centre - 0.3
    lungs_raw, centre_raw = _regions(CXRImageProcessor(dicom_invert_monochrome1=False)(path)["pixel_values"])
    assert lungs_raw > centre_raw + 0.3


def test_decoding_keeps_bit_depth_until_normalization():
    path = _real_radiograph()
    raw = CXRImageProcessor().decode(path)
    assert raw.dtype != np.uint8 and raw.ndim == 2
    assert len(np.unique(raw)) > 256  # more levels than 8 bits could hold


def test_same_image_as_16_bit_png_gives_nearly_the_same_pixels(tmp_path):
    path = _real_radiograph()
    processor = CXRImageProcessor()
    decoded = processor.decode(path)
    as_uint16 = np.round((decoded - decoded.min()) / (decoded.max() - decoded.min()) * 65535).astype(np.uint16)
    png = tmp_path / "rg1.png"
    assert cv2.imwrite(str(png), as_uint16)
    from_dicom = processor(path)["pixel_values"]
    from_png = processor(str(png))["pixel_values"]
    from_array = processor(as_uint16)["pixel_values"]
    torch.testing.assert_close(from_png, from_array, atol=0, rtol=0)
    difference = (from_png - from_dicom).abs()
    # One 8-bit level is 1 / 255 / 0.225 ~ 0.017 after normalization; CLAHE may move a few pixels by more.
    assert difference.mean() < 0.01
    assert torch.quantile(difference.flatten(), 0.99) < 0.05


# ----------------------------------------------------------------------------- inputs


def test_every_input_kind_in_one_mixed_batch(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (64, 48), dtype=np.uint8)
    gray16 = rng.integers(0, 4096, (64, 48), dtype=np.uint16)
    png = tmp_path / "a.png"
    Image.fromarray(gray8).save(png)
    jpeg = io.BytesIO()
    Image.fromarray(gray8).convert("RGB").save(jpeg, format="JPEG", quality=95)
    inputs = [
        str(png),
        png,
        png.read_bytes(),
        jpeg.getvalue(),
        Image.fromarray(gray8),
        Image.fromarray(gray8).convert("RGB"),
        Image.fromarray(gray16),
        gray8,
        gray8[..., None],
        np.repeat(gray8[..., None], 3, axis=2),
        np.concatenate([np.repeat(gray8[..., None], 3, axis=2), np.full((64, 48, 1), 255, np.uint8)], axis=2),
        gray16,
        gray8.astype(np.float64) / 255.0,
        torch.from_numpy(gray8)[None],
        torch.from_numpy(np.repeat(gray8[None], 3, axis=0)),
    ]
    out = CXRImageProcessor()(inputs)
    assert out["pixel_values"].shape == (len(inputs), 3, 224, 224)
    assert out["pixel_values"].dtype == torch.float32
    assert out["original_sizes"].tolist() == [[64, 48]] * len(inputs)
    # Lossless 8-bit inputs of the same picture give identical pixels whatever their container.
    reference = out["pixel_values"][0]
    for index in (1, 2, 4, 5, 7, 8, 9, 10, 12, 13, 14):
        torch.testing.assert_close(out["pixel_values"][index], reference, atol=1e-6, rtol=0, msg=str(index))


def test_uint16_percentile_window_matches_numpy():
    rng = np.random.default_rng(1)
    image = rng.normal(2000, 300, (128, 96)).clip(0, 4095).astype(np.uint16)
    image[0, :5] = 65000  # outliers a min-max window would be ruined by
    processor = CXRImageProcessor(intensity_normalization="percentile", intensity_percentiles=(1, 99))
    ours = processor.normalize_intensity(image).astype(int)
    low, high = np.percentile(image, (1, 99))
    expected = np.clip((image.astype(float) - low) / (high - low) * 255, 0, 255)
    assert np.abs(ours - expected).max() <= 1.5


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_constant_image_is_refused(dtype):
    """No contrast, nothing to classify: a typed error naming the input, not a confident answer."""
    constant = np.full((40, 30), 7, dtype=dtype)
    with pytest.raises(CXRImageError, match=r"image\[0\].*no contrast: every pixel is 7"):
        CXRImageProcessor(do_clahe=False)(constant)
    # PIL reads a DICOM as an all-white image: refused too.
    with pytest.raises(CXRImageError, match="no contrast"):
        CXRImageProcessor()(Image.fromarray(np.full((64, 64), 255, np.uint8)).convert("RGB"))
    # One grey level of difference is an image.
    constant[0, 0] = 8
    assert torch.isfinite(CXRImageProcessor()(constant)["pixel_values"]).all()


def test_steps_can_be_switched_off():
    image = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    processor = CXRImageProcessor(
        do_normalize_intensity=False, do_clahe=False, do_resize=False, do_normalize=False, num_channels=1
    )
    out = processor(image)["pixel_values"]
    assert out.shape == (1, 1, 100, 200)
    torch.testing.assert_close(out[0, 0], torch.from_numpy(image.astype(np.float32) / 255))
    # Per-call overrides do not change the processor.
    assert processor(image, do_clahe=True)["pixel_values"].shape == (1, 1, 100, 200)
    assert processor.do_clahe is False


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", ["squash", "pad"])
@pytest.mark.parametrize("shape", [(300, 420), (520, 330)])
def test_box_survives_the_round_trip_within_one_pixel(mode, shape):
    height, width = shape
    x0, y0, x1, y1 = int(width * 0.31), int(height * 0.22), int(width * 0.67), int(height * 0.58)
    image = np.full((height, width), 40, dtype=np.uint8)
    image[y0 : y1 + 1, x0 : x1 + 1] = 220
    processor = CXRImageProcessor(resize_mode=mode, do_clahe=False)
    inputs = processor(image)
    geometry = dict(zip(GEOMETRY_FIELDS, inputs["geometry"][0].tolist()))
    if mode == "pad":
        assert geometry["pad_top"] > 0 or geometry["pad_left"] > 0
    # A fake score map in the model's input space: the brightness itself, with the padding at 0.
    fake = inputs["pixel_values"][:, :1] - inputs["pixel_values"].min()
    outputs = {"logits": torch.tensor([[0.0, 3.0, 0.0]]), "coupled_maps": fake.repeat(1, 3, 1, 1)}
    result = processor.post_process_localization(outputs, geometry=inputs, threshold=0.5)[0]
    assert result["heatmap"].shape == (height, width)
    assert result["label"] == 1 and result["boxes"].shape == (1, 4)
    assert np.abs(result["boxes"][0] - np.array([x0, y0, x1, y1])).max() <= 1


def test_geometry_rows_and_boxes_to_input():
    processor = CXRImageProcessor(resize_mode="pad", do_clahe=False)
    inputs = processor(np.tile(np.arange(420, dtype=np.uint16) % 256, (300, 1)).astype(np.uint8))
    geometry = Geometry.of(inputs["geometry"][0])
    assert geometry._fields == GEOMETRY_FIELDS and (geometry.original_height, geometry.original_width) == (300, 420)
    assert (geometry.height, geometry.width) == (224, 224) and geometry.pad_top > 0 and geometry.pad_left == 0
    # The whole original image lands on the content rectangle of the padded input.
    whole = CXRImageProcessor.boxes_to_input([[0, 0, 420, 300]], inputs["geometry"][0])
    top, height = geometry.pad_top, geometry.content_height
    assert whole.tolist() == [[0, top, 224, top + height]]
    # Stretched to another frame, as the evaluation does (224 x 224 here, so the same numbers).
    assert (CXRImageProcessor.boxes_to_input([[0, 0, 420, 300]], geometry, (224, 224)) == whole).all()
    with pytest.raises(ValueError, match="8 values"):
        Geometry.of([300, 420, 160])


def test_post_processing_outputs_and_multi_contour():
    processor = CXRImageProcessor()
    grid = torch.zeros(1, 3, 14, 14)
    grid[0, 2, 2:5, 2:5] = 1.0
    grid[0, 2, 9:12, 8:12] = 0.9
    outputs = {"logits": torch.tensor([[0.1, 0.2, 2.0]]), "coupled_maps": grid}
    single = processor.post_process_localization(outputs, target_sizes=[(280, 280)], threshold=0.3)[0]
    multi = processor.post_process_localization(
        outputs, target_sizes=[(280, 280)], threshold=0.3, multi_contour=True, id2label={2: "No_pathologies"}
    )[0]
    assert single["label"] == 2 and abs(single["score"] - torch.softmax(outputs["logits"], -1)[0, 2].item()) < 1e-6
    assert single["heatmap"].dtype == np.float32 and single["heatmap"].shape == (280, 280)
    assert single["heatmap"].min() == 0 and single["heatmap"].max() == 1
    assert len(single["boxes"]) == 1 and len(multi["boxes"]) == 2
    assert multi["label_name"] == "No_pathologies"
    assert multi["box_scores"].shape == (2,) and (multi["box_scores"] > 0.3).all()
    # The largest contour is the 3x4-cell blob, bottom right.
    x0, y0, x1, y1 = single["boxes"][0]
    assert x0 > 140 and y0 > 160 and x1 > x0 and y1 > y0
    # Given labels select another class's map: class 0 is empty, so no box.
    empty = processor.post_process_localization(outputs, target_sizes=[(280, 280)], labels=[0])[0]
    assert empty["boxes"].shape == (0, 4) and empty["score"] < 0.2
    with pytest.raises(ValueError, match="geometry"):
        processor.post_process_localization(outputs)


def test_post_processing_localizes_with_the_configured_map(tmp_path):
    grid = torch.zeros(1, 3, 14, 14)
    grid[0, 1, 2:5, 2:5] = 1.0  # F0*S0 says top left
    semantic = torch.zeros(1, 3, 14, 14)
    semantic[0, 1, 9:12, 9:12] = 1.0  # S0 says bottom right
    attention = torch.zeros(1, 14, 14)
    attention[0, 2:5, 9:12] = 1.0  # F0 (no class axis) says top right
    outputs = {
        "logits": torch.tensor([[0.0, 2.0, 0.0]]),
        "coupled_maps": grid,
        "semantic_maps": semantic,
        "attention_maps": attention,
    }
    corners = {}
    for key in ("coupled_maps", "semantic_maps", "attention_maps"):
        processor = CXRImageProcessor(localization_map=key)
        box = processor.post_process_localization(outputs, target_sizes=[(280, 280)], threshold=0.5)[0]["boxes"][0]
        corners[key] = (box[0] > 140, box[1] > 140)
        # The argument overrides the setting, which survives a save and load.
        other = CXRImageProcessor().post_process_localization(
            outputs, target_sizes=[(280, 280)], threshold=0.5, localization_map=key
        )[0]["boxes"][0]
        assert (other == box).all()
        processor.save_pretrained(tmp_path / key)
        assert CXRImageProcessor.from_pretrained(tmp_path / key).localization_map == key
    assert corners == {
        "coupled_maps": (False, False),
        "semantic_maps": (True, True),
        "attention_maps": (True, False),
    }
    # A configuration saved before the maps were renamed names F0 * S0 "localization_maps": read, not written.
    legacy = tmp_path / "legacy"
    CXRImageProcessor().save_pretrained(legacy)
    config = json.loads((legacy / "preprocessor_config.json").read_text())
    (legacy / "preprocessor_config.json").write_text(json.dumps({**config, "localization_map": "localization_maps"}))
    loaded = CXRImageProcessor.from_pretrained(legacy)
    assert loaded.localization_map == "coupled_maps"
    loaded.save_pretrained(legacy)
    assert json.loads((legacy / "preprocessor_config.json").read_text())["localization_map"] == "coupled_maps"
    with pytest.raises(ValueError, match="localization_map"):
        CXRImageProcessor(localization_map="cam")
    with pytest.raises(ValueError, match="localization_map"):
        CXRImageProcessor().post_process_localization(outputs, target_sizes=[(280, 280)], localization_map="cam")


def test_real_dicom_through_model_and_back_to_original_pixels():
    from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    path = _real_radiograph()
    processor = CXRImageProcessor(resize_mode="pad")
    inputs = processor([path, path])
    torch.manual_seed(0)
    config = DeiTSCMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = DeiTSCMForImageClassification(config).eval()
    with torch.no_grad():
        outputs = model(inputs["pixel_values"])
    results = processor.post_process_localization(outputs, geometry=inputs, id2label=config.id2label)
    assert len(results) == 2
    for result in results:
        assert result["heatmap"].shape == (1955, 1841)
        assert result["label_name"] in config.id2label.values()
        boxes = result["boxes"]
        assert boxes.ndim == 2 and boxes.shape[1] == 4
        assert (boxes[:, 2] < 1841).all() and (boxes[:, 3] < 1955).all() and (boxes[:, :2] >= 0).all()
    np.testing.assert_array_equal(results[0]["heatmap"], results[1]["heatmap"])


def test_overlay_draws_both_box_kinds_in_distinct_colours():
    image = np.random.default_rng(0).integers(0, 4096, (120, 160)).astype(np.uint16)
    heat = np.zeros((14, 14), dtype=np.float32)
    heat[4:8, 4:8] = 1
    out = overlay_heatmap(image, heat, boxes=np.array([[10, 10, 60, 60]]), gt_boxes=np.array([[80, 20, 150, 100]]))
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    assert tuple(out[10, 30]) == (0, 255, 0)
    assert tuple(out[20, 100]) == (255, 40, 40)
    with pytest.raises(ValueError):
        overlay_heatmap(np.zeros((2, 3, 4, 5)), heat)


# ----------------------------------------------------------------------------- bad input


def _dicom_bytes(**changes) -> bytes:
    dataset = pydicom.dcmread(_real_radiograph())
    for key, value in changes.items():
        setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_bad_inputs_raise_typed_errors_naming_the_input(tmp_path):
    processor = CXRImageProcessor()
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    cases = [
        (str(truncated), "truncated.png"),
        (str(tmp_path / "missing.png"), "no such file"),
        (b"", "empty file"),
        (b"\x00" * 128 + b"DICM" + b"garbage" * 10, "image[0]"),
        (np.zeros((0, 10)), "empty"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.full((8, 8), np.inf, dtype=np.float32), "infinite"),
        (np.zeros((2, 8, 8, 3)), "4-D"),
        (np.zeros((8, 8, 2)), "shape"),
        (np.array([["a"]]), "dtype"),
        (object(), "unsupported input type"),
    ]
    for item, fragment in cases:
        with pytest.raises(CXRImageError, match=re.escape(fragment)):
            processor(item)
    with pytest.raises(CXRImageError, match="photometric"):
        processor(_dicom_bytes(PhotometricInterpretation="PALETTE COLOR"))
    assert issubclass(CXRImageError, ValueError)


def test_modality_warning_or_strict_error(caplog):
    data = _dicom_bytes(Modality="CT")
    with caplog.at_level("WARNING"):
        assert CXRImageProcessor()(data)["pixel_values"].shape == (1, 3, 224, 224)
    assert "not a radiograph" in caplog.text
    with pytest.raises(CXRImageError, match="strict"):
        CXRImageProcessor(strict=True)(data)


def test_skip_keeps_the_rest_of_the_batch():
    good = np.random.default_rng(0).integers(0, 256, (50, 50), dtype=np.uint8)
    out = CXRImageProcessor()([good, np.full((5, 5), np.nan), b"not an image", good], on_error="skip")
    assert out["pixel_values"].shape == (2, 3, 224, 224)
    assert out["indices"].tolist() == [0, 3]
    assert [index for index, _ in out["skipped"]] == [1, 2]
    assert "image[1]" in out["skipped"][0][1]
    torch.testing.assert_close(out["pixel_values"][0], out["pixel_values"][1])


@pytest.mark.parametrize(
    "setting, field",
    [
        ({"clahe_tile_grid_size": (0, 0)}, "clahe_tile_grid_size"),  # SIGFPE inside OpenCV before
        ({"clahe_tile_grid_size": (8,)}, "clahe_tile_grid_size"),
        ({"clahe_clip_limit": -1.0}, "clahe_clip_limit"),
        ({"clahe_max_size": 0}, "clahe_max_size"),
        ({"image_std": [0.0, 0.2, 0.2]}, "image_std"),
        ({"image_mean": [float("nan"), 0.5, 0.5]}, "image_mean"),
        ({"rescale_factor": float("inf")}, "rescale_factor"),
        ({"size": {"height": 0, "width": 32}}, "size"),
        ({"size": {"height": 32.5, "width": 32}}, "size"),
        ({"intensity_percentiles": (99.0, 1.0)}, "intensity_percentiles"),
        ({"dicom_voi_percentiles": (0.0, 101.0)}, "dicom_voi_percentiles"),
        ({"localization_threshold": 1.5}, "localization_threshold"),
        ({"pad_value": 300}, "pad_value"),
    ],
)
def test_every_numeric_setting_is_validated_on_construction_and_load(setting, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        CXRImageProcessor(**setting)
    # The same value in a saved preprocessor_config.json (any Hub repo) is refused on load.
    CXRImageProcessor().save_pretrained(tmp_path)
    config_file = tmp_path / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()})
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        CXRImageProcessor.from_pretrained(tmp_path)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="resize_mode"):
        CXRImageProcessor(resize_mode="crop")
    with pytest.raises(ValueError, match="dicom_voi"):
        CXRImageProcessor(dicom_voi="maybe")


_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64, np.bool_])
_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=40),
    st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 5)),
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arbitrary_arrays_give_valid_output_or_the_typed_error(data):
    dtype = data.draw(_DTYPES)
    shape = data.draw(_SHAPES)
    array = data.draw(hnp.arrays(dtype, shape))
    processor = CXRImageProcessor(size={"height": 32, "width": 32})
    try:
        out = processor(array)
    except CXRImageError:
        return
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()


def _saved(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _ct_small():
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _set(**values):
    def change(dataset):
        for key, value in values.items():
            setattr(dataset, key, value)

    return change


@pytest.mark.parametrize(
    "change, fragment",
    [
        (_set(WindowCenter=100, WindowWidth=0), "Window Width"),
        (_set(WindowCenter=100, WindowWidth=-100), "Window Width"),
        (_set(WindowCenter=100, WindowWidth=200, VOILUTFunction="BOGUS"), "VOI LUT Function"),
        (_set(RescaleSlope=float("nan")), "NaN or infinite"),
        (_set(RescaleSlope=float("inf")), "NaN or infinite"),
        (_set(RescaleSlope=1e308), "NaN or infinite"),
        (_set(PhotometricInterpretation="RGB"), "SamplesPerPixel"),
        (_set(Rows=20000, Columns=20000), "max_image_pixels"),
    ],
)
def test_malformed_dicom_is_a_typed_error_and_a_batch_keeps_the_rest(change, fragment):
    """Issue 12 items 4 and 5: library exceptions and silent black images become `CXRImageError`."""
    bad = _ct_small()
    change(bad)
    good = _saved(_ct_small())
    processor = CXRImageProcessor(size={"height": 32, "width": 32}, max_image_pixels=50_000_000)
    with pytest.raises(CXRImageError, match=f"image\\[0\\]: .*{fragment}"):
        processor([_saved(bad)])
    out = processor([good, _saved(bad), good], on_error="skip")
    assert out["indices"].tolist() == [0, 2] and out["skipped"][0][0] == 1
    assert torch.isfinite(out["pixel_values"]).all()


def test_malformed_uncompressed_pixel_data_does_not_blame_a_missing_decoder():
    dataset = _ct_small()
    dataset.PixelData = dataset.PixelData[:100]
    with pytest.raises(CXRImageError) as raised:
        CXRImageProcessor()([_saved(dataset)])
    assert "malformed" in str(raised.value) and "decoder" not in str(raised.value)


def test_non_finite_pixels_are_refused_on_every_path(tmp_path):
    values = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    values[3, 3] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    for item in (buffer.getvalue(), Image.fromarray(values, mode="F"), values, torch.from_numpy(values)):
        with pytest.raises(CXRImageError, match="NaN or infinite"):
            CXRImageProcessor()([item])


def test_bfloat16_tensor_is_read_as_float32():
    tensor = torch.rand(48, 40)
    processor = CXRImageProcessor(size={"height": 32, "width": 32})
    half = processor([tensor.to(torch.bfloat16)])["pixel_values"]
    full = processor([tensor.to(torch.bfloat16).float()])["pixel_values"]
    torch.testing.assert_close(half, full, atol=0, rtol=0)


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    with pytest.raises(CXRImageError, match="image\\[0\\]: .*too large|max_image_pixels"):
        CXRImageProcessor()([_png_header_only(30000, 30000)])
    with pytest.raises(CXRImageError, match="max_image_pixels"):
        CXRImageProcessor(max_image_pixels=1000)([_png_header_only(40, 40)])
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(path)
    with pytest.raises(CXRImageError, match="2,500 pixels, more than max_image_pixels"):
        CXRImageProcessor(max_image_pixels=2499)([str(path)])
    with pytest.raises(ValueError, match="max_image_pixels"):
        CXRImageProcessor(max_image_pixels=0)


def test_messages_say_what_is_wrong(tmp_path):
    with pytest.raises(CXRImageError, match="is a folder"):
        CXRImageProcessor()([str(tmp_path)])
    # A DICOM data set without preamble and without a .dcm name is sniffed, not called undecodable.
    from pydicom.data import get_testdata_file

    raw = open(get_testdata_file("CT_small.dcm"), "rb").read()
    bare = tmp_path / "scan_export"
    bare.write_bytes(raw[132:])
    out = CXRImageProcessor(size={"height": 32, "width": 32})([str(bare)])
    assert out["pixel_values"].shape == (1, 3, 32, 32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=2048),
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"\x02\x00", b"\x00" * 128 + b"DICM"]
    ),
)
def test_random_bytes_give_an_image_or_the_typed_error(payload, prefix):
    processor = CXRImageProcessor(size={"height": 16, "width": 16})
    try:
        out = processor([prefix + payload])
    except CXRImageError:
        return
    assert torch.isfinite(out["pixel_values"]).all()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(0, 40),
    columns=st.integers(0, 40),
    bits=st.sampled_from([1, 8, 12, 16, 32, 64]),
    signed=st.integers(0, 1),
    samples=st.sampled_from([1, 3]),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR"]),
    slope=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(1.0)),
    window=st.one_of(st.none(), st.tuples(st.floats(-1e6, 1e6), st.floats(-10, 1e6))),
    pixel_bytes=st.binary(max_size=4096),
)
def test_random_dicom_datasets_give_an_image_or_the_typed_error(
    rows, columns, bits, signed, samples, photometric, slope, window, pixel_bytes
):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.BitsAllocated = bits
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = signed
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = photometric
    dataset.RescaleSlope = slope
    dataset.RescaleIntercept = 0
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    dataset.PixelData = pixel_bytes
    processor = CXRImageProcessor(size={"height": 16, "width": 16})
    try:
        data = _saved(dataset)
    except Exception:  # pydicom cannot even write this combination: nothing to feed
        return
    try:
        out = processor([data])
    except CXRImageError:
        return
    assert out["pixel_values"].shape == (1, 3, 16, 16)
    assert torch.isfinite(out["pixel_values"]).all()


# ----------------------------------------------------------------------------- save / load


def test_round_trip_through_auto_image_processor_with_remote_code(tmp_path):
    processor = CXRImageProcessor(resize_mode="pad", intensity_normalization="percentile", localization_threshold=0.37)
    saved, elsewhere = tmp_path / "saved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    processor.save_pretrained(saved)
    config = json.loads((saved / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_cxr.CXRImageProcessor"}
    assert {"image_processing_cxr.py", "cxr_decoding.py", "localization.py"} <= set(os.listdir(saved))
    image = np.random.default_rng(0).integers(0, 4096, (90, 70)).astype(np.uint16)
    np.save(tmp_path / "image.npy", image)
    expected = processor(image)["pixel_values"]
    torch.save(expected, tmp_path / "expected.pt")
    from pydicom.data import get_testdata_file

    radiograph = get_testdata_file("RG1_UNCR.dcm")
    torch.save(processor(radiograph)["pixel_values"], tmp_path / "expected_dicom.pt")
    script = f"""
import sys
import numpy as np, torch
from transformers import AutoImageProcessor
processor = AutoImageProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
assert type(processor).__name__ == "CXRImageProcessor", type(processor)
assert "transformers_modules" in type(processor).__module__
assert processor.resize_mode == "pad" and processor.localization_threshold == 0.37
out = processor(np.load({str(tmp_path / "image.npy")!r}))["pixel_values"]
assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r}))
# DICOM decoding is the remote copy of cxr_decoding.py, imported relatively beside the processor.
dicom = processor({radiograph!r})["pixel_values"]
assert torch.equal(dicom, torch.load({str(tmp_path / "expected_dicom.pt")!r}))
assert any(name.startswith("transformers_modules") and name.endswith("cxr_decoding") for name in sys.modules)
assert "cxr_decoding" not in sys.modules
print("REMOTE_OK")
"""
    result = run_outside_repo(script, elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout
    reloaded = CXRImageProcessor.from_pretrained(saved)
    assert reloaded.to_dict() == processor.to_dict()


def test_post_processing_smooths_each_map_with_its_stored_width(tmp_path):
    """A class map that rings a finding (8 hot neighbours around a cooler centre token): with the width training
    stored for that map, the heatmap peaks on the centre; the raw map (width 0, or another map's setting) peaks on
    the ring. The setting survives a save and load; bad settings are refused when the processor is built."""
    semantic = torch.zeros(1, 3, 12, 12)
    semantic[0, 1, 4:7, 6:9] = 1.0
    semantic[0, 1, 5, 7] = 0.6
    outputs = {"logits": torch.tensor([[0.0, 2.0, 0.0]]), "semantic_maps": semantic}
    size = [(96, 96)]  # one token = 8 x 8 pixels; the centre token covers rows 40-47, columns 56-63

    def peak(processor: CXRImageProcessor, **kwargs: object) -> tuple[int, int]:
        heatmap = processor.post_process_localization(outputs, target_sizes=size, **kwargs)[0]["heatmap"]
        y, x = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
        return int(y), int(x)

    def on_centre(point: tuple[int, int]) -> bool:
        return 40 <= point[0] <= 47 and 56 <= point[1] <= 63

    smoothing = {"semantic_maps": 1.0, "coupled_maps": 0.0}
    processor = CXRImageProcessor(localization_map="semantic_maps", localization_smoothing=smoothing)
    assert on_centre(peak(processor))
    assert not on_centre(peak(processor, smoothing=0.0))  # the argument overrides the stored width
    assert not on_centre(peak(CXRImageProcessor(localization_map="semantic_maps")))  # no width stored: raw
    processor.save_pretrained(tmp_path)
    loaded = CXRImageProcessor.from_pretrained(tmp_path)
    assert loaded.localization_smoothing == smoothing and on_centre(peak(loaded))
    bad_settings = (({"semantic_maps": -1.0}, "smoothing"), ({"cam": 1.0}, "localization_smoothing"),
                    ({"semantic_maps": float("nan")}, "smoothing"), ([1.0], "localization_smoothing"))  # fmt: skip
    for bad, fragment in bad_settings:
        with pytest.raises(ValueError, match=fragment):
            CXRImageProcessor(localization_smoothing=bad)
    with pytest.raises(ValueError, match="smoothing"):
        processor.post_process_localization(outputs, target_sizes=size, smoothing=-2.0)
