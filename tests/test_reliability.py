"""Regression tests of the data-loss cases: what a run may delete, what a bad input may cost, what a resume
may prune, what a failing prediction file may lose (tiny model, CPU)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deit_scm_cxr.data.prepare as wsol_data
import deit_scm_cxr.hub.cxr_decoding as cxr_decoding
import deit_scm_cxr.hub.image_processing_cxr as image_processing_cxr
import deit_scm_cxr.outputs.writer as wsol_outputs
import deit_scm_cxr.training.checkpoints as wsol_checkpoints
import deit_scm_cxr.training.run as run_wsol
from deit_scm_cxr import predict
from deit_scm_cxr.data import load_dataset_module
from deit_scm_cxr.errors import RunInputError
from deit_scm_cxr.training.arguments import ModelArguments
from tiny_run import TINY, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("reliability") / "run", 2, "--do_eval", "false")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. --overwrite_output_dir removes only what a run wrote ---------------------------------------------


def test_overwrite_keeps_a_users_files_and_replaces_the_run(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "notes.txt").write_text("my notes")
    (output / "scans").mkdir()
    (output / "scans" / "ct.bin").write_bytes(b"\x00\x01")
    common = [*TINY, "--output_dir", str(output), "--max_train_steps", "2", "--do_eval", "false"]
    run_wsol.main(common)
    assert (output / "model.safetensors").is_file() and (output / "checkpoints").is_dir()
    (output / "checkpoints" / "step_999").mkdir()  # a leftover of the earlier run: must go with it
    run_wsol.main([*common, "--overwrite_output_dir"])
    assert (output / "notes.txt").read_text() == "my notes"
    assert (output / "scans" / "ct.bin").read_bytes() == b"\x00\x01"
    assert (output / "model.safetensors").is_file()
    assert not (output / "checkpoints" / "step_999").exists()


def test_overwrite_refuses_to_delete_the_model_it_fine_tunes(trained, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (folder / name).write_bytes((trained / name).read_bytes())
    before = _tree(folder)
    with pytest.raises(SystemExit) as raised:
        run_wsol.main([*TINY[:4], "--model_name_or_path", str(folder), "--output_dir", str(folder),
                       "--overwrite_output_dir", "--max_train_steps", "1", "--do_eval", "false"])  # fmt: skip
    assert raised.value.code == 2
    assert "nothing was deleted" in capsys.readouterr().err
    assert _tree(folder) == before


def test_overwrite_refuses_to_delete_files_it_predicts(trained, tmp_path):
    output = tmp_path / "run"
    (output / "predictions").mkdir(parents=True)
    (output / "all_results.json").write_text("{}")
    image = output / "predictions" / "patient.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(image)
    with pytest.raises(RunInputError, match="nothing was deleted"):
        wsol_checkpoints.clear_run_outputs(output, [image])
    assert image.is_file() and (output / "all_results.json").is_file()
    # Without inputs inside, exactly the run's entries go.
    (output / "keep.me").write_text("x")
    removed = wsol_checkpoints.clear_run_outputs(output, [])
    assert sorted(p.name for p in removed) == ["all_results.json", "predictions"]
    # Set aside, not deleted, until the replacement completes (issue 33).
    assert sorted(p.name for p in output.iterdir()) == [".previous_run", "keep.me"]
    assert (output / ".previous_run" / "predictions" / "patient.png").is_file()
    wsol_checkpoints.discard_previous_run(output)
    assert sorted(p.name for p in output.iterdir()) == ["keep.me"]


def test_a_finished_run_survives_a_replacement_that_fails(trained, tmp_path, monkeypatch):
    """Issue 33: with --overwrite_output_dir the finished run was deleted before the new one failed (a full
    disk). It is now set aside and removed only once the replacement is complete."""
    import deit_scm_cxr.training.run as run_module

    output = tmp_path / "run"
    shutil.copytree(trained, output)
    weights = (output / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "train_and_save", disk_full)
    with pytest.raises(SystemExit):
        run_wsol.main([*TINY, "--output_dir", str(output), "--overwrite_output_dir", "--max_train_steps", "1"])
    assert (output / ".previous_run" / "model.safetensors").read_bytes() == weights
    monkeypatch.undo()
    # The next replacement completes: the set-aside run goes, the new one is in place.
    run_wsol.main([*TINY, "--output_dir", str(output), "--overwrite_output_dir", "--max_train_steps", "1"])
    assert not (output / ".previous_run").exists() and (output / "model.safetensors").is_file()


def test_a_model_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """Issue 33: safetensors' and torch's own write errors (a file-size limit, a full disk) ended in a traceback."""
    from safetensors import SafetensorError

    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    def too_large(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })")

    monkeypatch.setattr(DeiTSCMForImageClassification, "save_pretrained", too_large)
    with pytest.raises(SystemExit) as raised:
        run_wsol.main([*TINY, "--max_train_steps", "1", "--do_eval", "false", "--output_dir", str(tmp_path / "run")])
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "could not write the model to" in lines[-1] and "FileTooLarge" in lines[-1]


def test_a_write_error_message_survives_a_folder_that_is_gone(tmp_path):
    """The free space a write error quotes is read from the folder's disk; a folder removed meanwhile gives
    NaN, not a second exception that would hide the first."""
    from deit_scm_cxr.errors import free_mib

    assert free_mib(tmp_path) > 0
    assert np.isnan(free_mib(tmp_path / "gone"))


# --- 2. bad boxes are refused before training; the model is saved before evaluation ----------------------


def test_an_inverted_box_is_refused_when_the_box_list_is_read(tmp_path):
    nih = load_dataset_module("nih")
    # The published list, as the fixture copies it (no file outside the checkout is needed).
    source = Path(__file__).resolve().parent / "fixtures" / "nih" / "BBox_List_2017.csv"
    lines = source.read_text().splitlines()
    fields = lines[5].split(",")
    fields[4] = str(-abs(float(fields[4])))  # negative width: an inverted box
    lines[5] = ",".join(fields)
    broken = tmp_path / "BBox_List_2017.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(nih.NIHMetadataError, match=r"row 6 .*width and height must be positive"):
        nih.read_boxes(broken)
    fields[4] = "5000"  # a box that leaves the 1024 x 1024 image
    lines[5] = ",".join(fields)
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(nih.NIHMetadataError, match="leaves the 1024x1024 image"):
        nih.read_boxes(broken)
    assert len(nih.read_boxes(source)) == 984  # the published list passes


def test_the_trained_model_is_on_disk_when_evaluation_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("evaluation failed")

    monkeypatch.setattr(run_wsol, "final_evaluation", broken)
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="evaluation failed"):
        run_wsol.main([*TINY, "--max_train_steps", "2", "--output_dir", str(output)])
    assert (output / "model.safetensors").is_file() and (output / "preprocessor_config.json").is_file()


# --- 3. resume "latest" never trains over a finished run ------------------------------------------------


def test_resume_latest_refuses_a_finished_run_without_checkpoints(trained, tmp_path, capsys):
    folder = tmp_path / "finished"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((trained / name).read_bytes())
    with pytest.raises(RunInputError, match="finished run"):
        wsol_checkpoints.resolve_checkpoint("latest", folder)
    # An empty folder is a first start: nothing to protect, training starts from scratch.
    assert wsol_checkpoints.resolve_checkpoint("latest", tmp_path / "new") is None


# --- 4. resuming from an older checkpoint keeps the new timeline ------------------------------------------


def test_resume_from_an_older_checkpoint_with_a_limit(tmp_path):
    output = tmp_path / "run"
    common = [*TINY, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--do_eval", "false",
              "--max_train_steps", "6", "--output_dir", str(output)]  # fmt: skip
    run_wsol.main(common)
    assert [c.name for c in wsol_checkpoints.completed_checkpoints(output)] == ["step_4", "step_6"]
    run_wsol.main([*common, "--resume_from_checkpoint", str(output / "checkpoints" / "step_4")])
    # The new step_6 is written and kept; step_4, older, stays within the limit of two.
    assert [c.name for c in wsol_checkpoints.completed_checkpoints(output)] == ["step_4", "step_6"]
    # The abandoned timeline's step_6 is kept aside, never "latest".
    assert (output / "checkpoints" / "abandoned_step_6" / wsol_checkpoints.COMPLETE_MARKER).is_file()
    assert wsol_checkpoints.resolve_checkpoint("latest", output).name == "step_6"


def test_a_damaged_checkpoint_is_never_resumed(tmp_path, capsys, caplog):
    output = tmp_path / "run"
    common = [*TINY, "--checkpointing_steps", "2", "--do_eval", "false", "--max_train_steps", "4",
              "--output_dir", str(output)]  # fmt: skip
    run_wsol.main(common)
    step_2, step_4 = wsol_checkpoints.completed_checkpoints(output)
    assert wsol_checkpoints.checkpoint_damage(step_4) is None
    weights = step_4 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    assert "model.safetensors does not match" in wsol_checkpoints.checkpoint_damage(step_4)
    with caplog.at_level("WARNING"):
        assert wsol_checkpoints.resolve_checkpoint("latest", output) == step_2
    assert "step_4 is damaged" in caplog.text and "falling back" in caplog.text
    with pytest.raises(RunInputError, match="is damaged"):
        wsol_checkpoints.resolve_checkpoint(str(step_4), output)
    (step_2 / "train_state.json").unlink()
    with pytest.raises(RunInputError, match="every checkpoint"):
        wsol_checkpoints.resolve_checkpoint("latest", output)


def test_resume_with_changed_flags_is_refused(tmp_path, capsys):
    output = tmp_path / "run"
    common = [*TINY, "--checkpointing_steps", "2", "--do_eval", "false", "--max_train_steps", "4",
              "--output_dir", str(output)]  # fmt: skip
    run_wsol.main(common)
    checkpoint = str(output / "checkpoints" / "step_2")
    for changed in (["--learning_rate", "1e-3"], ["--seed", "5"], ["--per_device_train_batch_size", "4"]):
        with pytest.raises(SystemExit) as raised:
            run_wsol.main([*common, *changed, "--resume_from_checkpoint", checkpoint])
        assert raised.value.code == 2
        assert f"--{changed[0][2:]}" in capsys.readouterr().err
    # Where outputs go and what runs after training may change.
    run_wsol.main([*common, "--output_dir", str(tmp_path / "elsewhere"), "--num_workers", "0",
                   "--resume_from_checkpoint", checkpoint])  # fmt: skip


# --- 5. prediction: a failed file is a row, never an abort ------------------------------------------------


def _predict(model_dir: Path, output: Path, files) -> list[dict]:
    run_wsol.main(["--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(model_dir),
                   "--output_dir", str(output), "--predict_files", *map(str, files)])  # fmt: skip
    records = json.loads((output / "predictions" / "predictions.json").read_text())
    streamed = [json.loads(line) for line in (output / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert streamed == records
    return records


def test_prediction_survives_long_names_and_failed_overlays(trained, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    long_name = tmp_path / ("p" * 240 + ".png")
    other = tmp_path / "other.png"
    for file in (long_name, other):
        Image.fromarray((rng.random((70, 80)) * 255).astype(np.uint8)).save(file)
    records = _predict(trained, tmp_path / "out", [long_name, other])
    assert all(Path(r["overlay"]).is_file() for r in records)
    assert len(Path(records[0]["overlay"]).name) < 120

    real_save = predict.save_png

    def fail_for_other(path, rgb):
        if "other" in path.name:
            raise OSError(28, "No space left on device")
        real_save(path, rgb)

    monkeypatch.setattr(predict, "save_png", fail_for_other)
    records = _predict(trained, tmp_path / "out2", [long_name, other])
    assert "overlay" in records[0] and records[1]["label"] and "No space" in records[1]["overlay_error"]


def test_prediction_of_a_folder_where_every_file_fails_writes_rows(trained, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.png", "b.dcm", "c.jpg"):
        (folder / name).write_bytes(b"garbage " + name.encode())
    records = _predict(trained, tmp_path / "out", [folder])
    assert [Path(r["file"]).name for r in records] == ["a.png", "b.dcm", "c.jpg"]
    assert all(Path(r["file"]).name in r["error"] for r in records)


def test_prediction_reads_each_file_once(trained, tmp_path, monkeypatch):
    image = tmp_path / "patient.png"
    Image.fromarray((np.random.default_rng(3).random((70, 80)) * 255).astype(np.uint8)).save(image)
    opened: list[str] = []

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(cxr_decoding, "open", counting_open, raising=False)
    records = _predict(trained, tmp_path / "out", [image])
    assert opened.count(str(image)) == 1
    # The single read gives the processor path's answer.
    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    processor = CXRImageProcessor.from_pretrained(trained)
    model = DeiTSCMForImageClassification.from_pretrained(trained).eval()
    inputs = processor([str(image)])
    expected = processor.post_process_localization(model(inputs["pixel_values"]), geometry=inputs,
                                                   id2label=model.config.id2label)[0]  # fmt: skip
    assert records[0]["label"] == expected["label_name"]
    assert records[0]["score"] == pytest.approx(expected["score"], abs=1e-6)
    assert records[0]["boxes"] == expected["boxes"].tolist()


# --- 6. the main job checkpoints by default -------------------------------------------------------------


def test_training_checkpoints_every_epoch_by_default(trained):
    args = run_wsol.parse_args([])
    assert args.checkpointing_steps == "epoch" and args.checkpoints_total_limit == 2
    done = wsol_checkpoints.completed_checkpoints(trained)
    assert done, "a default run wrote no checkpoint"
    assert json.loads((done[-1] / "train_state.json").read_text())["global_step"] == 2
    assert run_wsol.parse_args(["--checkpointing_steps", "none"]).checkpointing_steps is None


# --- refused instead of silently wrong ---------------------------------------------------------------


def test_exif_orientation_is_honoured(tmp_path):
    """A photo of a film stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)
    decodes upright, as viewers show it: the bright marker lands on the viewer's right."""
    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor

    stored = np.zeros((40, 60), np.uint8)
    stored[0:8, 0:8] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = CXRImageProcessor().decode(str(path))
    assert upright.shape == (60, 40)
    assert upright[:8, -8:].mean() > 200 and upright[:8, :8].mean() < 50  # stored top-left -> viewed top-right


def test_processor_takes_an_int_size():
    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor

    assert CXRImageProcessor(size=96).size == {"height": 96, "width": 96}


@pytest.mark.parametrize(
    "field, value, fragment",
    [("layer_norm_eps", -1.0, "layer_norm_eps"), ("layer_norm_eps", 0.0, "layer_norm_eps"),
     ("scm_lse_r", 1e6, "scm_lse_r"), ("calibration_temperature", 0.0, "calibration_temperature")],
)  # fmt: skip
def test_config_values_that_make_nan_are_refused(field, value, fragment):
    from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig

    with pytest.raises(ValueError, match=fragment):
        DeiTSCMConfig(**{field: value})


def test_a_model_folder_without_its_processor_is_refused(trained, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((trained / name).read_bytes())
    image = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(image)
    with pytest.raises(SystemExit) as raised:
        run_wsol.main(["--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(folder),
                       "--output_dir", str(tmp_path / "out"), "--predict_files", str(image)])  # fmt: skip
    assert raised.value.code == 2 and "preprocessor_config.json" in capsys.readouterr().err


def test_an_empty_finding_labels_cell_is_refused(tmp_path):
    nih = load_dataset_module("nih")
    source = Path(__file__).resolve().parent / "fixtures" / "nih" / "Data_Entry_2017_sample.csv"
    import pandas as pd

    table = pd.read_csv(source).head(20)
    table.loc[3, "Finding Labels"] = None
    table.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(nih.NIHMetadataError, match=r"row 5 .*empty Finding Labels"):
        nih.read_metadata(tmp_path / "Data_Entry_2017.csv")


def test_a_large_rescale_intercept_keeps_every_grey_level():
    """Intercept 1e6, slope 1e-3: 241 stored levels lie 1e-3 apart at 1e6, closer than float32's spacing
    there (0.0625); a float32 cast before the window merged them into 34."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file

    dataset = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    rows, columns = 241, 32
    dataset.Rows, dataset.Columns = rows, columns
    ramp = np.repeat(np.arange(rows, dtype=np.uint16)[:, None], columns, axis=1)
    dataset.PixelData = ramp.tobytes()
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.RescaleIntercept, dataset.RescaleSlope = 1e6, 1e-3
    for tag in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        if tag in dataset:
            delattr(dataset, tag)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    processor = image_processing_cxr.CXRImageProcessor(intensity_normalization="minmax")
    gray = processor.normalize_intensity(processor.decode(buffer.getvalue(), "intercept.dcm"))
    assert len(np.unique(gray)) == rows
    assert np.all(np.diff(gray[:, 0].astype(int)) > 0)  # still a ramp, level by level


def _deflated(dataset) -> bytes:
    import io

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_deflated_dicom_is_measured_before_it_is_inflated():
    import tracemalloc

    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    processor = image_processing_cxr.CXRImageProcessor(max_image_pixels=4_000_000)
    plain = processor.decode(path)
    # A real deflated radiograph decodes as before.
    np.testing.assert_array_equal(processor.decode(_deflated(pydicom.dcmread(path)), "deflated.dcm"), plain)
    # 64 x 64 declared, 48 MiB of pixel data: 90 kB on disk, refused without inflating it.
    bomb = pydicom.dcmread(path)
    bomb.Rows, bomb.Columns = 64, 64
    bomb.PixelData = bytes(48 << 20)
    data = _deflated(bomb)
    assert len(data) < 200_000
    small = image_processing_cxr.CXRImageProcessor(max_image_pixels=1_000_000)
    tracemalloc.start()
    with pytest.raises(image_processing_cxr.CXRImageError, match="bomb.dcm: deflated DICOM inflates to more than"):
        small.decode(data, "bomb.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # pydicom would hold the 48 MiB
    with pytest.raises(image_processing_cxr.CXRImageError, match="corrupt.dcm: deflated DICOM is corrupt"):
        small.decode(data[:400] + b"\xff" * 64 + data[464:], "corrupt.dcm")


def test_a_deflated_dicom_too_large_by_its_header_is_refused_before_it_is_inflated():
    """Issue 33: a deflated file whose pixel data fits the inflate limit but whose Rows x Columns do not was
    inflated whole (twice: once counted, once by pydicom) before its header was read."""
    import tracemalloc

    import pydicom
    from pydicom.data import get_testdata_file

    big = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    big.Rows, big.Columns = 4000, 4000  # 16 MP, over the limit below; its 32 MB of pixels within the byte limit
    big.PixelData = bytes(4000 * 4000 * 2)
    data = _deflated(big)
    processor = image_processing_cxr.CXRImageProcessor(max_image_pixels=10_000_000)
    tracemalloc.start()
    with pytest.raises(image_processing_cxr.CXRImageError, match="big.dcm: 16,000,000 pixels, more than max_image"):
        processor.decode(data, "big.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # the first inflated chunks at most, not the 32 MB of pixels


def test_nih_rows_that_disagree_about_an_image_are_refused(tmp_path):
    import pandas as pd

    nih = load_dataset_module("nih")
    source = Path(__file__).resolve().parent / "fixtures" / "nih" / "Data_Entry_2017_sample.csv"
    table = pd.read_csv(source).head(20)
    # An exact repeat (a file concatenated twice) is dropped: one row per image remains.
    pd.concat([table, table.head(3)]).to_csv(tmp_path / "repeated.csv", index=False)
    read = nih.read_metadata(tmp_path / "repeated.csv")
    assert len(read) == 20 and read["Image Index"].is_unique
    # The same image with other labels: refused, naming it.
    other = table.head(1).assign(**{"Finding Labels": "Atelectasis"})
    pd.concat([table, other]).to_csv(tmp_path / "conflict.csv", index=False)
    image = table["Image Index"].iloc[0]
    with pytest.raises(nih.NIHMetadataError, match=rf"conflict.csv: image {image} has 2 rows that disagree"):
        nih.read_metadata(tmp_path / "conflict.csv")


def test_nih_images_with_one_name_in_two_folders(tmp_path):
    nih = load_dataset_module("nih")
    for folder in ("images_001/images", "images_002/images"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images_001/images/a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images_002/images/a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "images_002/images/b.png")
    index = nih.index_images(tmp_path)  # identical copies: accepted, the first kept
    assert index == {"a.png": tmp_path / "images_001/images/a.png", "b.png": tmp_path / "images_002/images/b.png"}
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(tmp_path / "images_002/images/a.png")
    with pytest.raises(nih.NIHMetadataError, match=r"two different files named a.png"):
        nih.index_images(tmp_path)


def _campaign(name: str = "fault_campaign"):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bad_metric_and_post_processing_arguments_raise_typed_errors():
    """Before: 15 untyped crashes and 32 silent results out of 52 cases (bench/RESULTS.md)."""
    from deit_scm_cxr.evaluation.metrics import ClassificationInputError
    from deit_scm_cxr.hub.localization import LocalizationInputError

    campaign = _campaign()
    row = campaign.tally("metric_arguments", campaign.metric_argument_cases(),
                         (LocalizationInputError, ClassificationInputError))  # fmt: skip
    assert row["other_exception"] == 0 and row["silent_wrong"] == 0, row["examples"]
    assert row["handled"] == 5 and row["typed_error"] == row["tried"] - 5


def test_a_huge_box_is_measured_on_a_bounded_outline():
    from deit_scm_cxr.evaluation.metrics import MAX_OUTLINE_POINTS, box_measures, box_outline

    huge = np.array([[0.0, 0.0, 1e7, 10.0]])
    assert len(box_outline(huge)) <= 4 * MAX_OUTLINE_POINTS
    measures = box_measures(huge, np.array([[0.0, 0.0, 1e7, 20.0]]), (10, int(1e7) + 1))
    assert measures["hausdorff"] == pytest.approx(10.0)  # the far sides are 10 pixels apart everywhere
    # Up to MAX_OUTLINE_POINTS per side the outline is exact: one point per unit step.
    assert len(box_outline(np.array([[0.0, 0.0, 99.0, 49.0]]))) == 2 * 100 + 2 * 50 - 4


def _path_dataset(folder: Path, count: int = 4):
    from deit_scm_cxr.data.cxr import records_to_dataset

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(path)
        records.append({"image": {"path": str(path), "bytes": None}, "label": index % 3, "boxes": [],
                        "findings": [], "image_id": f"img{index}", "patient_id": str(index), "age": 40,
                        "sex": "F", "view": "PA"})  # fmt: skip
    return records_to_dataset(records)


def test_the_preprocessed_cache_is_verified_and_keyed_on_content_and_code(tmp_path, monkeypatch, caplog):

    processor = image_processing_cxr.CXRImageProcessor(size={"height": 32, "width": 32})
    cache = tmp_path / "cache"
    dataset = _path_dataset(tmp_path / "images")
    first = wsol_data.prepare_split("train", dataset, processor, None, cache).pixels.clone()
    (arrow,) = cache.glob("train-*.arrow")
    assert (arrow.parent / (arrow.name + ".sha256")).is_file()
    # Flipped bytes in the cache: detected, rebuilt, the same arrays as before.
    data = bytearray(arrow.read_bytes())
    data[-200] ^= 0xFF
    arrow.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = wsol_data.prepare_split("train", dataset, processor, None, cache).pixels
    assert "does not match its checksum" in caplog.text
    assert torch_equal(again, first)
    # An image replaced on disk under the same name: a new cache, not the old arrays.
    replacement = np.random.default_rng(9).random((48, 48)) * 255
    Image.fromarray(replacement.astype(np.uint8)).save(tmp_path / "images" / "img1.png")
    changed = wsol_data.prepare_split("train", _reloaded(dataset), processor, None, cache).pixels
    assert not torch_equal(changed[1], first[1]) and torch_equal(changed[0], first[0])
    # Edited preprocessing code: a new cache file.
    before = set(cache.glob("train-*.arrow"))
    monkeypatch.setattr(wsol_data, "processor_code_digest", lambda: "edited")
    wsol_data.prepare_split("train", dataset, processor, None, cache)
    assert len(set(cache.glob("train-*.arrow")) - before) == 1


def _reloaded(dataset):
    return dataset.select(range(len(dataset)))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# --- found by the run-level campaign (bench/fault_runs.py) ----------------------------------------------------


def test_overwrite_keeps_a_users_file_inside_a_run_folder(trained, tmp_path):
    output = tmp_path / "run"
    common = [*TINY, "--output_dir", str(output), "--max_train_steps", "1", "--do_eval", "false"]
    run_wsol.main(common)
    (output / "checkpoints" / "README.txt").write_text("which checkpoint went to the clinic")
    (output / "predictions").mkdir()
    (output / "predictions" / "notes.md").write_text("mine")
    run_wsol.main([*common, "--overwrite_output_dir"])
    assert (output / "checkpoints" / "README.txt").read_text() == "which checkpoint went to the clinic"
    assert (output / "predictions" / "notes.md").read_text() == "mine"
    assert [c.name for c in wsol_checkpoints.completed_checkpoints(output)] == ["step_1"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_its_own_readme_config_and_code_is_refused(tmp_path, capsys, overwrite):
    """`--output_dir .` in a repository: its README.md would become the model card, its code our code."""
    folder = tmp_path / "repository"
    folder.mkdir()
    (folder / "README.md").write_text("# My project\n")
    (folder / "modeling_deit_scm.py").write_text("# my edited model\n")
    (folder / "config.json").write_text('{"model_type": "bert"}')
    before = _tree(folder)
    with pytest.raises(SystemExit) as raised:
        run_wsol.main([*TINY, "--output_dir", str(folder), "--max_train_steps", "1", "--do_eval", "false",
                       *(["--overwrite_output_dir"] if overwrite else [])])  # fmt: skip
    assert raised.value.code == 2 and "no run wrote" in capsys.readouterr().err
    assert _tree(folder) == before


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    report = tmp_path / "report.txt"
    report.write_text("kept")
    with pytest.raises(SystemExit) as raised:
        run_wsol.main([*TINY, "--output_dir", str(report), "--overwrite_output_dir", "--max_train_steps", "1"])
    assert raised.value.code == 2 and "is a file" in capsys.readouterr().err and report.read_text() == "kept"


def test_resume_with_another_image_size_is_refused_before_loading(tmp_path, capsys):
    output = tmp_path / "run"
    common = [*TINY, "--checkpointing_steps", "2", "--do_eval", "false", "--max_train_steps", "2",
              "--output_dir", str(output)]  # fmt: skip
    run_wsol.main(common)
    with pytest.raises(SystemExit) as raised:  # was a size mismatch from load_state_dict
        run_wsol.main([*common, "--image_size", "96", "--resume_from_checkpoint", "latest"])
    assert raised.value.code == 2 and "--image_size" in capsys.readouterr().err


def test_model_folders_that_cannot_predict_right_are_one_line():
    """Before: 7 untyped crashes and 5 predictions from incomplete or inconsistent folders (bench/RESULTS.md)."""
    row = _campaign("fault_runs").run_categories(["saved_model_folders"])[0]
    assert row["other_exception"] == row["silent_wrong"] == row["data_lost"] == 0, row["examples"]
    assert row["handled"] == 1 and row["typed_error"] == row["tried"] - 1


def test_damaged_caches_and_nih_folders_in_the_campaign():
    rows = _campaign("fault_runs").run_categories(["cache_corruption", "nih_folders"])
    for row in rows:
        assert row["other_exception"] == row["silent_wrong"] == row["data_lost"] == 0, row


def test_flags_a_saved_model_fixes_are_refused_with_it(trained, tmp_path, capsys):
    """--image_size, --label_smoothing and --drop_path_rate were dropped without a word with a model folder."""
    for flags in (["--image_size", "128"], ["--label_smoothing", "0.3"], ["--drop_path_rate", "0.2"]):
        with pytest.raises(SystemExit) as raised:
            run_wsol.parse_args(["--model_name_or_path", str(trained), "--output_dir", str(tmp_path / "x"), *flags])
        assert raised.value.code == 2 and f"{flags[0]} cannot apply" in capsys.readouterr().err
    args = run_wsol.parse_args(["--output_dir", str(tmp_path / "x")])
    assert args.image_size == ModelArguments().image_size  # a new model still gets the default size


def test_a_checkpoint_recorded_before_the_renames_resumes(tmp_path):
    """Flags a checkpoint recorded before `--config_overrides` was parsed at the command line (its text) and
    before the recipes were renamed ("cxr") compare equal to today's; a flag really changed is still refused."""
    now = {"config_overrides": {"hidden_size": 32, "num_hidden_layers": 2}, "recipe": "cxr_finetune", "seed": 1,
           "scm_warmup_fraction": 0.0}  # fmt: skip
    # Recorded before --scm_warmup_fraction was a flag: the recipe's share (none for cxr_finetune) stands in.
    old = {k: v for k, v in now.items() if k != "scm_warmup_fraction"}
    recorded = wsol_checkpoints.run_settings({**old, "config_overrides": "hidden_size=32,num_hidden_layers=2",
                                              "recipe": "cxr"})  # fmt: skip
    wsol_checkpoints.check_resumed_settings(recorded, now, tmp_path)
    with pytest.raises(RunInputError, match="config_overrides"):
        wsol_checkpoints.check_resumed_settings(recorded, {**now, "config_overrides": {"hidden_size": 64}}, tmp_path)
    with pytest.raises(RunInputError, match="recipe"):
        wsol_checkpoints.check_resumed_settings(recorded, {**now, "recipe": "official"}, tmp_path)



def test_a_run_killed_while_saving_its_model_can_resume(tmp_path, monkeypatch):
    """transformers copies the remote-code files before it writes config.json: a run killed between the two
    used to leave code files that no config.json claimed, and its resume refused them as no run's. The run's
    config.json is now on disk before any code file."""
    import transformers

    from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    class Killed(BaseException):
        pass

    def killed(self, *args, **kwargs):
        raise Killed

    model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-micro", "cxr", image_size=32))
    accelerator = type("Accelerator", (), {"unwrap_model": staticmethod(lambda m: m)})()
    monkeypatch.setattr(transformers.PretrainedConfig, "save_pretrained", killed)
    with pytest.raises(Killed):
        wsol_outputs.save_model(accelerator, model, CXRImageProcessor(), tmp_path)
    assert (tmp_path / "modeling_deit_scm.py").is_file()  # the kill came after the code copy
    assert wsol_checkpoints.foreign_outputs(tmp_path) == []


# ----------------------------------------------------------------------------- weights checked at load (issue 33)


def _tiny_model():
    from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    torch.manual_seed(0)
    return DeiTSCMForImageClassification(DeiTSCMConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    ))  # fmt: skip


def _saved_tiny_model(folder):
    model = _tiny_model()
    model.save_pretrained(folder)
    return model


def test_nan_weights_and_retyped_headers_are_refused_at_load(tmp_path):
    import struct

    from safetensors.torch import load_file, save_file

    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    good = tmp_path / "good"
    _saved_tiny_model(good)
    DeiTSCMForImageClassification.from_pretrained(good)  # a sound folder loads
    # A NaN in one weight.
    broken = tmp_path / "nan"
    shutil.copytree(good, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["head.bias"][1] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"nan: weight head\.bias holds NaN or infinite values"):
        DeiTSCMForImageClassification.from_pretrained(broken)
    # The header of one weight retyped F32 -> I32 (same size: the file stays readable).
    retyped = tmp_path / "retyped"
    shutil.copytree(good, retyped)
    raw = (retyped / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header["head.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    (retyped / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + length :])
    with pytest.raises(ValueError, match=r"weight head\.weight is stored as I32"):
        DeiTSCMForImageClassification.from_pretrained(retyped)


def test_an_edited_config_is_refused_at_load_naming_the_problem(tmp_path):
    """Issue 33: a saved model whose config.json was edited (fewer or more layers, another model type, JSON
    nested too deeply to parse) loaded and predicted without a word, or ended in RecursionError."""
    from transformers import AutoModelForImageClassification

    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    good = tmp_path / "good"
    _saved_tiny_model(good)
    saved = json.loads((good / "config.json").read_text())
    layers, blocks = saved["num_hidden_layers"], saved["scm_num_blocks"]
    assert blocks >= 1
    for name, edit, fragment in (
        ("fewer", {"scm_num_blocks": blocks - 1}, "holds weights this configuration has no place for"),
        ("more", {"num_hidden_layers": layers + 1}, "lacks weights this configuration needs"),
        ("other_type", {"model_type": "vit"}, "model_type 'vit', not 'deit_scm'"),
    ):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        config = {**json.loads((folder / "config.json").read_text()), **edit}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=fragment):
            DeiTSCMForImageClassification.from_pretrained(folder)
        if name != "other_type":  # as remote code too (the Auto classes map model types before our code runs)
            with pytest.raises(ValueError, match=fragment):
                AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
        with pytest.raises(RunInputError):  # and through the main job's --model_name_or_path, in one line
            wsol_checkpoints.load_model_folder(str(folder), DeiTSCMForImageClassification, {})
    nested = tmp_path / "nested"
    shutil.copytree(good, nested)
    (nested / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(ValueError, match="nests too deeply"):
        DeiTSCMForImageClassification.from_pretrained(nested)


def test_nan_in_converted_timm_weights_is_refused():
    from deit_scm_cxr.convert import WeightConversionError, load_backbone_weights

    model = _tiny_model()
    timm_state = {  # a timm-named checkpoint of the backbone, with one NaN
        "cls_token": torch.zeros(1, 1, 16), "pos_embed": torch.zeros(1, 5, 16),
        "patch_embed.proj.weight": torch.zeros(16, 3, 8, 8), "patch_embed.proj.bias": torch.full((16,), float("nan")),
    }  # fmt: skip
    with pytest.raises(WeightConversionError, match="NaN or infinite"):
        load_backbone_weights(model, timm_state, allow_missing=True)


@pytest.mark.parametrize(
    "field, value",
    [("class_weights", [1.0, float("nan"), 1.0]), ("scm_lambda_init", float("nan")), ("scm_beta_init", float("inf")),
     ("initializer_range", float("nan"))],
)  # fmt: skip
def test_config_refuses_non_finite_constants(field, value):
    from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig

    with pytest.raises(ValueError, match=field):
        DeiTSCMConfig(**{field: value})


# ---------------------------------------------------------------- one run per folder, I/O faults (issue 33)


def test_a_folder_being_written_refuses_a_second_run_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    import os
    import socket

    output = tmp_path / "run"
    output.mkdir()
    lock = output / wsol_checkpoints.LOCK_FILE
    # A live holder (this very process stands in for the other run): the second run is refused, nothing written.
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(SystemExit) as refused:
        train_tiny(output, 1)
    assert refused.value.code == 2 and "being written by another run" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == [wsol_checkpoints.LOCK_FILE]
    # A holder that no longer exists (kill -9): its lock is taken over, the run completes and frees the folder.
    dead = 2**22 + 12345
    while wsol_checkpoints._process_alive(dead):
        dead += 1
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    train_tiny(output, 1)
    assert (output / "model.safetensors").is_file() and not lock.exists()


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import os

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "model.safetensors"))

    monkeypatch.setattr(wsol_outputs, "save_model", full)
    with pytest.raises(SystemExit) as failed:
        train_tiny(tmp_path / "run", 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert failed.value.code == 2 and err[-1].startswith("run_wsol.py: error: cannot write")
    assert "No space left on device" in err[-1] and "model.safetensors" in err[-1]
    assert not (tmp_path / "run" / wsol_checkpoints.LOCK_FILE).exists()  # the folder is free again
