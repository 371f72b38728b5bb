"""Run-level fault campaign (issue 22): runs and `--overwrite_output_dir`, resume with changed flags,
damaged checkpoints and caches, broken saved-model folders, prediction outputs, NIH folders and the demo,
tried as a tired user and a hostile one would. One JSON line per category on stdout:

    {"category": ..., "tried": n, "handled": n, "typed_error": n, "other_exception": n, "silent_wrong": n,
     "data_lost": n, "examples": {...}}

The outcomes are `fault_campaign.py`'s. `data_lost` is counted beside them: a case loses data when a file it
protects (a user's notes, the model being fine-tuned, a finished run, the files being predicted) is gone or
changed afterwards, whatever the outcome. A case may also carry a check of its result (the right arrays, a
row per predicted file, a line saying a damaged checkpoint was skipped): a result that fails it is
silent_wrong. Every case runs `run_wsol.py` in its own process as a user would (the log is what a check
reads), training or predicting with a tiny model on the CPU (about 10 minutes in all).

    python bench/fault_runs.py [--categories runs_overwrite resume_changed_flags ...]

Besides the command line it uses only entry points older than issue 22, so it runs on an older checkout too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("handled", "typed_error", "other_exception", "silent_wrong")
TINY = ["--num_phantoms", "48", "--phantom_size", "96", "--image_size", "64", "--config_overrides",
        "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,patch_size=8",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8"]  # fmt: skip
MODEL_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


@dataclass
class Case:
    """One attempt: `call` runs it; `protected` files and folders must hold the same bytes afterwards."""

    name: str
    call: Callable[[], Any]
    must_fail: bool = False
    protected: list[Path] = field(default_factory=list)
    check: Optional[Callable[[Any, str], bool]] = None  # (result, the run's stderr: its log) -> result is right


def _digests(paths: Iterable[Path]) -> dict[str, Optional[str]]:
    state: dict[str, Optional[str]] = {}
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            state[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
    return state


def run_case(case: Case, typed: tuple[type, ...]) -> tuple[str, bool, str]:
    """The case's outcome, whether it lost data, and the first line of what went wrong."""
    before = _digests(case.protected)
    stderr, detail = io.StringIO(), ""
    try:
        with contextlib.redirect_stderr(stderr):
            result = case.call()
    except typed:
        outcome = "typed_error"
    except SystemExit as error:
        outcome = "typed_error" if error.code == 2 else "other_exception"
        detail = f"exit {error.code}"
    except Exception as error:  # the campaign's point: anything else is counted, not raised
        outcome, detail = "other_exception", f"{type(error).__name__}: {str(error)[:160]}"
    else:
        wrong = case.must_fail or (case.check is not None and not case.check(result, stderr.getvalue()))
        outcome = "silent_wrong" if wrong else "handled"
        if wrong:
            detail = "a result for an input that must be refused" if case.must_fail else "the result fails its check"
    lost = _digests(before_path for before_path in map(Path, before)) != before
    return outcome, lost, detail


def tally_cases(category: str, cases: Iterable[Case], typed: tuple[type, ...] = ()) -> dict:
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    for case in cases:
        outcome, lost, detail = run_case(case, typed)
        counts[outcome] += 1
        counts["data_lost"] += lost
        if outcome in ("other_exception", "silent_wrong"):
            examples.setdefault(outcome, f"{case.name}: {detail}")
        if lost:
            examples.setdefault("data_lost", case.name)
    return {"category": category, "tried": sum(counts[k] for k in OUTCOMES), **{k: counts[k] for k in OUTCOMES},
            "data_lost": counts["data_lost"], "examples": examples}  # fmt: skip


class Workshop:
    """A scratch folder, a tiny trained model and a checkpointed run, each built once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._count = 0
        self._trained: Optional[Path] = None
        self._checkpointed: Optional[Path] = None

    def fresh(self, stem: str) -> Path:
        self._count += 1
        return self.folder / f"{self._count:03d}-{stem}"

    @staticmethod
    def train(output: Path, *extra: str) -> Path:
        run_cli(*TINY, "--output_dir", str(output), "--do_eval", "false", *extra)
        return output

    @property
    def trained(self) -> Path:
        if self._trained is None:
            self._trained = self.train(self.folder / "trained", "--max_train_steps", "2")
        return self._trained

    @property
    def checkpointed(self) -> Path:
        """A run of 4 steps with checkpoints after steps 2 and 4."""
        if self._checkpointed is None:
            self._checkpointed = self.train(self.folder / "checkpointed", *self.checkpoint_flags)
        return self._checkpointed

    checkpoint_flags = ("--max_train_steps", "4", "--checkpointing_steps", "2")

    def model_copy(self, stem: str) -> Path:
        folder = self.fresh(stem)
        folder.mkdir(parents=True)
        for name in MODEL_FILES:
            shutil.copy2(self.trained / name, folder / name)
        for extra in self.trained.glob("*.py"):  # remote code saved beside the weights, where there is any
            shutil.copy2(extra, folder / extra.name)
        return folder

    def run_copy(self, stem: str) -> Path:
        folder = self.fresh(stem)
        shutil.copytree(self.checkpointed, folder)
        return folder

    def image(self, path: Path, seed: int = 0, size: tuple[int, int] = (70, 80)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).random(size) * 255
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        return path


class RunFailed(RuntimeError):
    """`run_wsol.py` ended with a traceback (an exit status other than 0 and 2)."""


def run_process(command: list[str], timeout: float = 900, **popen: Any) -> str:
    """A command as a user runs it, in its own process: exit status 2 is re-raised as `SystemExit(2)` (the
    one-line refusal), any other failure as `RunFailed` with the last stderr line; returns its stdout. Its
    stderr (the log) goes to this process's stderr, where a case's check reads it."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)
    sys.stderr.write(done.stderr)
    if done.returncode == 2:
        raise SystemExit(2)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise RunFailed(lines[-1][:300])
    return done.stdout


def run_cli(*argv: str, timeout: float = 900) -> None:
    """`python run_wsol.py ARGV` (`run_process`)."""
    run_process([sys.executable, str(ROOT / "run_wsol.py"), *argv], timeout=timeout)


def _main(*argv: str) -> Callable[[], Any]:
    return lambda: run_cli(*argv)


def _checkpoints(run: Path) -> list[Path]:
    found = [p for p in (run / "checkpoints").glob("step_*") if p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]))


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _predictions(output: Path) -> list[dict]:
    return json.loads((output / "predictions" / "predictions.json").read_text())


# --- categories ----------------------------------------------------------------------------------------------


def overwrite_cases(shop: Workshop) -> Iterator[Case]:
    """What a run may delete: only what a run of ours wrote, whatever `--output_dir` names."""
    train = [*TINY, "--max_train_steps", "1", "--do_eval", "false"]
    out = shop.fresh("user-files")
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    shop.image(out / "scans" / "ct.png")
    yield Case("user files beside the run, --overwrite_output_dir", _main(*train, "--output_dir", str(out),
               "--overwrite_output_dir"), protected=[out / "notes.txt", out / "scans"])  # fmt: skip

    out = shop.fresh("notes-in-checkpoints")
    shutil.copytree(shop.trained, out)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "README.txt").write_text("which checkpoint went to the clinic")
    yield Case("a user's note inside checkpoints/, --overwrite_output_dir",
               _main(*train, "--output_dir", str(out), "--overwrite_output_dir"),
               protected=[out / "checkpoints" / "README.txt"])  # fmt: skip

    model = shop.model_copy("in-place")
    yield Case("fine-tune in place (--model_name_or_path = --output_dir), --overwrite_output_dir",
               _main(*TINY[:4], "--max_train_steps", "1", "--do_eval", "false", "--model_name_or_path", str(model),
                     "--output_dir", str(model),
                     "--overwrite_output_dir"), protected=[model])  # fmt: skip

    out = shop.fresh("predict-inside")
    scan = shop.image(out / "scans" / "patient.png")
    yield Case("--predict_files inside --output_dir, --overwrite_output_dir",
               _main("--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(shop.trained),
                     "--output_dir", str(out), "--overwrite_output_dir", "--predict_files", str(scan)),
               protected=[scan])  # fmt: skip

    yield from _foreign_folder_cases(shop, train)
    yield from _finished_run_cases(shop, train)


def _foreign_folder_cases(shop: Workshop, train: list[str]) -> Iterator[Case]:
    """Folders that are not a run's: a project, a repository with files of our names, a symlinked folder."""
    out = shop.fresh("project")
    (out / "src").mkdir(parents=True)
    (out / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    (out / "src" / "mine.py").write_text("print('mine')\n")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    yield Case("--output_dir is a project folder, --overwrite_output_dir",
               _main(*train, "--output_dir", str(out), "--overwrite_output_dir"),
               protected=[out / "pyproject.toml", out / "src", out / ".git"])  # fmt: skip

    for flag in ((), ("--overwrite_output_dir",)):
        out = shop.fresh("repository")
        out.mkdir(parents=True)
        (out / "README.md").write_text("# My project\n")
        (out / "modeling_deit_scm.py").write_text("# my edited model\n")
        (out / "config.json").write_text(json.dumps({"model_type": "bert"}))
        yield Case(f"--output_dir a repository with its own README.md, config.json and code {' '.join(flag)}",
                   _main(*train, "--output_dir", str(out), *flag), protected=[out])  # fmt: skip

    target = shop.fresh("link-target")
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("kept")
    link = shop.fresh("link")
    link.symlink_to(target, target_is_directory=True)
    yield Case("--output_dir a symlink to a user's folder, --overwrite_output_dir",
               _main(*train, "--output_dir", str(link), "--overwrite_output_dir"),
               protected=[target / "notes.txt"])  # fmt: skip


def _finished_run_cases(shop: Workshop, train: list[str]) -> Iterator[Case]:
    """A finished run, a file where a folder should be, and a resume from an older checkpoint."""
    out = shop.fresh("finished")
    shutil.copytree(shop.trained, out)
    yield Case("a finished run, trained again without --overwrite_output_dir",
               _main(*train, "--output_dir", str(out)), protected=[out / "model.safetensors"])  # fmt: skip

    out = shop.model_copy("finished-no-checkpoints")
    yield Case("--resume_from_checkpoint latest in a finished run without checkpoints",
               _main(*train, "--output_dir", str(out), "--resume_from_checkpoint", "latest"),
               must_fail=True, protected=[out])  # fmt: skip

    out = shop.fresh("a-file")
    out.write_text("a report, not a folder")
    yield Case("--output_dir names a file", _main(*train, "--output_dir", str(out), "--overwrite_output_dir"),
               must_fail=True, protected=[out])  # fmt: skip

    run = shop.run_copy("older-checkpoint")
    step_2 = _checkpoints(run)[0]
    started = time.time()

    def newest_written(result: Any, text: str) -> bool:  # the resumed timeline's last checkpoint is kept
        newest = _checkpoints(run)
        return bool(newest) and (newest[-1] / "model.safetensors").stat().st_mtime >= started

    yield Case("resume from an older checkpoint with --checkpoints_total_limit 1",
               _main(*TINY, "--do_eval", "false", *shop.checkpoint_flags, "--output_dir", str(run),
                     "--checkpoints_total_limit", "1", "--resume_from_checkpoint", str(step_2)),
               check=newest_written)  # fmt: skip


def changed_flag_cases(shop: Workshop) -> Iterator[Case]:
    """Resuming a checkpoint with flags that change what is trained must be refused; output flags may change."""
    base = [*TINY, "--do_eval", "false", *shop.checkpoint_flags]
    training_changes = {
        "--learning_rate": "1e-3", "--seed": "5", "--per_device_train_batch_size": "4", "--num_phantoms": "40",
        "--max_train_steps": "6", "--label_smoothing": "0.2", "--weight_decay": "0.1", "--image_size": "96",
    }  # fmt: skip
    for flag, value in training_changes.items():
        run = shop.run_copy("changed")
        step_2 = _checkpoints(run)[0]
        yield Case(f"resume with {flag} {value}",
                   _main(*base, flag, value, "--output_dir", str(run), "--resume_from_checkpoint", str(step_2)),
                   must_fail=True, protected=[step_2])  # fmt: skip
    for flag, value in {"--num_workers": "0", "--per_device_eval_batch_size": "4", "--report_to": "none"}.items():
        run = shop.run_copy("output-flag")
        step_2 = _checkpoints(run)[0]
        yield Case(f"resume with {flag} {value} (not a training flag)",
                   _main(*base, flag, value, "--output_dir", str(run), "--resume_from_checkpoint", str(step_2)),
                   protected=[step_2])  # fmt: skip


def checkpoint_damage_cases(shop: Workshop) -> Iterator[Case]:
    """A damaged checkpoint is never resumed: 'latest' falls back with a line saying so; a named one is refused."""
    base = [*TINY, "--do_eval", "false", *shop.checkpoint_flags]

    def says_skipped(result: Any, text: str) -> bool:
        return "step_4" in text and "damaged" in text.lower()

    damages: dict[str, Callable[[Path], None]] = {
        "one flipped bit in the weights": lambda c: _flip_bit(c / "model.safetensors"),
        "truncated optimizer state": lambda c: _truncate(c / "optimizer.bin", 100),
        "the weights of the checkpoint before": lambda c: shutil.copy2(c.parent / "step_2" / "model.safetensors",
                                                                       c / "model.safetensors"),
        "a file deleted": lambda c: (c / "model.safetensors").unlink(),
    }  # fmt: skip
    for name, damage in damages.items():
        run = shop.run_copy("damaged")
        damage(_checkpoints(run)[-1])
        yield Case(f"resume latest, newest checkpoint with {name}",
                   _main(*base, "--output_dir", str(run), "--resume_from_checkpoint", "latest"),
                   check=says_skipped)  # fmt: skip
        run = shop.run_copy("damaged-named")
        newest = _checkpoints(run)[-1]
        damage(newest)
        yield Case(f"resume the named checkpoint with {name}",
                   _main(*base, "--output_dir", str(run), "--resume_from_checkpoint", str(newest)), must_fail=True)
    run = shop.run_copy("all-damaged")
    for checkpoint in _checkpoints(run):
        _flip_bit(checkpoint / "model.safetensors")
    yield Case("resume latest, every checkpoint damaged",
               _main(*base, "--output_dir", str(run), "--resume_from_checkpoint", "latest"), must_fail=True)


def _prepared_pixels(paths: list[str], processor: Any, cache: Optional[Path]) -> Any:
    """The training pixels `wsol_data.prepare_split` gives for these files (through `cache` when given)."""
    import deit_scm_cxr.data.prepare as wsol_data
    from deit_scm_cxr.data.cxr import records_to_dataset

    fixed = {"boxes": [], "findings": [], "age": 40, "sex": "F", "view": "PA"}
    records = [{"image": {"path": path, "bytes": None}, "label": i % 3, "image_id": f"img{i}", "patient_id": str(i),
                **fixed} for i, path in enumerate(paths)]  # fmt: skip
    return wsol_data.prepare_split("train", records_to_dataset(records), processor, None, cache).pixels


def cache_cases(shop: Workshop) -> Iterator[Case]:
    """A preprocessed cache gives the arrays of its images and settings, or is rebuilt: never stale bytes."""
    import torch

    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor

    processor = CXRImageProcessor(size={"height": 32, "width": 32})
    images = shop.fresh("cache-images")
    paths = [str(shop.image(images / f"img{i}.png", seed=i, size=(48, 48))) for i in range(4)]

    def truth() -> torch.Tensor:
        return _prepared_pixels(paths, processor, None)

    def prepared(cache: Path) -> Callable[[], Any]:
        return lambda: _prepared_pixels(paths, processor, cache)

    def equal_to_truth(result: Any, text: str) -> bool:
        return bool(torch.equal(result, truth()))

    def built(stem: str) -> tuple[Path, Path]:
        cache = shop.fresh(stem)
        prepared(cache)()
        (arrow,) = cache.glob("train-*.arrow")
        return cache, arrow

    def other_settings(arrow: Path) -> None:  # another setting's arrays under this setting's name
        other_cache = shop.fresh("cache-other")
        _prepared_pixels(paths, CXRImageProcessor(size={"height": 32, "width": 32}, do_clahe=False), other_cache)
        shutil.copy2(next(other_cache.glob("train-*.arrow")), arrow)

    damages: dict[str, Callable[[Path], Any]] = {
        "flipped bit in the cache": _flip_bit,
        "truncated cache": lambda arrow: _truncate(arrow, arrow.stat().st_size // 2),
        "cache overwritten with zeros": lambda arrow: arrow.write_bytes(bytes(arrow.stat().st_size)),
        "bytes appended to the cache": lambda arrow: arrow.write_bytes(arrow.read_bytes() + bytes(64)),
        "another setting's cache copied over this one": other_settings,
    }
    for name, damage in damages.items():
        cache, arrow = built("cache")
        damage(arrow)
        yield Case(name, prepared(cache), check=equal_to_truth)
    cache, arrow = built("cache-image-replaced")

    def replace_then_prepare() -> Any:
        shop.image(Path(paths[1]), seed=99, size=(48, 48))  # the same name, other pixels
        return prepared(cache)()

    yield Case("an image replaced on disk under its name", replace_then_prepare, check=equal_to_truth)


def _edit_config(folder: Path, **values: Any) -> None:
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **values}))


def _drop_weights(folder: Path, fragment: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights = {k: v for k, v in weights.items() if fragment not in k}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _pickle_only(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


# Damage done to a copy of a good model folder -> what it is called in the report.
BROKEN_MODEL_FOLDERS: dict[str, Callable[[Path], None]] = {
    "no weights file": lambda f: (f / "model.safetensors").unlink(),
    "pickle weights only": _pickle_only,
    "truncated weights": lambda f: _truncate(f / "model.safetensors", 4000),
    "the head's weights missing": lambda f: _drop_weights(f, "head"),
    "the position embeddings missing": lambda f: _drop_weights(f, "position_embeddings"),
    "layer_norm_eps -1": lambda f: _edit_config(f, layer_norm_eps=-1),
    "scm_lse_r 1e9": lambda f: _edit_config(f, scm_lse_r=1e9),
    "num_labels 5 against 3 trained classes": lambda f: _edit_config(
        f, id2label={str(i): f"c{i}" for i in range(5)}, label2id={f"c{i}": i for i in range(5)}),
    "config.json not JSON": lambda f: (f / "config.json").write_text("{ not json"),
    "no config.json": lambda f: (f / "config.json").unlink(),
    "no preprocessor_config.json": lambda f: (f / "preprocessor_config.json").unlink(),
    "hidden_size changed in the config": lambda f: _edit_config(f, hidden_size=64),
}  # fmt: skip


def saved_model_cases(shop: Workshop) -> Iterator[Case]:
    """A model folder that cannot give right answers is refused in one line when loaded for prediction."""
    def predicting(folder: Path) -> Callable[[], Any]:
        out = shop.fresh("predicted")
        scan = shop.image(out.parent / f"{out.name}-scan.png")
        run = _main("--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(folder),
                    "--output_dir", str(out), "--predict_files", str(scan))  # fmt: skip
        return lambda: (run(), _predictions(out))[1]

    def finite_rows(result: Any, text: str) -> bool:
        return bool(result) and all(np.isfinite(row.get("score", np.nan)) for row in result)

    folder = shop.model_copy("intact")
    yield Case("an intact model folder", predicting(folder), protected=[folder], check=finite_rows)
    for name, damage in BROKEN_MODEL_FOLDERS.items():
        folder = shop.model_copy("broken")
        damage(folder)
        yield Case(f"model folder with {name}", predicting(folder), must_fail=True, protected=[folder])


def prediction_cases(shop: Workshop) -> Iterator[Case]:
    """`--predict_files`: one row per input file, written whatever happens to the others; inputs untouched."""

    def predict(out: Path, *files: Path) -> Callable[[], Any]:
        run = _main("--do_train", "false", "--do_eval", "false", "--model_name_or_path", str(shop.trained),
                    "--output_dir", str(out), "--predict_files", *map(str, files))  # fmt: skip
        return lambda: (run(), _predictions(out))[1]

    def rows_for(count: int, distinct_overlays: bool = False) -> Callable[[Any, str], bool]:
        def check(result: Any, text: str) -> bool:
            overlays = [row["overlay"] for row in result if "overlay" in row]
            distinct = not distinct_overlays or len(set(overlays)) == len(overlays) == count
            return len(result) == count and distinct and all(Path(o).is_file() for o in overlays)

        return check

    inputs = shop.fresh("inputs")
    good = shop.image(inputs / "good.png")
    long_name = shop.image(inputs / ("p" * 240 + ".png"), seed=1)
    yield Case("a 240-character file name beside a good file", predict(shop.fresh("out"), long_name, good),
               protected=[inputs], check=rows_for(2))  # fmt: skip
    failing = inputs / "failing"
    failing.mkdir()
    for name in ("a.png", "b.dcm", "c.jpg"):
        (failing / name).write_bytes(b"garbage " + name.encode())
    yield Case("a folder where every file fails", predict(shop.fresh("out"), failing), protected=[inputs],
               check=rows_for(3))  # fmt: skip
    yield Case("a garbage file between two good ones", predict(shop.fresh("out"), good, failing / "a.png", long_name),
               protected=[inputs], check=rows_for(3))  # fmt: skip
    first = shop.image(inputs / "ward1" / "chest.png", seed=2)
    second = shop.image(inputs / "ward2" / "chest.png", seed=3)
    yield Case("two files with one name in two folders", predict(shop.fresh("out"), first, second),
               protected=[inputs], check=rows_for(2, distinct_overlays=True))  # fmt: skip
    spaced = shop.image(inputs / "Patient Ö 01 (copy).png", seed=4)
    yield Case("spaces, brackets and non-ASCII in a name", predict(shop.fresh("out"), spaced), protected=[inputs],
               check=rows_for(1))  # fmt: skip
    out = shop.fresh("out")

    def overlay_of_earlier_prediction() -> Any:
        predict(out, good)()
        return predict(out, *(out / "predictions").glob("*.png"))()

    yield Case("an earlier prediction's overlay predicted into the same folder", overlay_of_earlier_prediction,
               check=rows_for(1))


def nih_cases(shop: Workshop) -> Iterator[Case]:
    """NIH metadata, box lists and image folders that cannot be right are refused when read, naming them."""
    import pandas as pd

    from deit_scm_cxr.data import load_dataset_module

    nih = load_dataset_module("nih")
    fixtures = ROOT / "tests" / "fixtures" / "nih"  # real NIH metadata rows and the published box list
    metadata = pd.read_csv(fixtures / "Data_Entry_2017_sample.csv").head(30)
    boxes = pd.read_csv(fixtures / "BBox_List_2017.csv").head(20)

    def table(stem: str, frame: pd.DataFrame) -> Path:
        path = shop.fresh(stem).with_suffix(".csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        return path

    def unique_images(result: Any, text: str) -> bool:
        return bool(result["Image Index"].is_unique)

    yield Case("the metadata as published", lambda: nih.read_metadata(table("meta", metadata)))
    repeated = pd.concat([metadata, metadata.head(3)])
    yield Case("identical repeated rows", lambda: nih.read_metadata(table("meta", repeated)), check=unique_images)
    conflict = metadata.head(1).assign(**{"Finding Labels": "Atelectasis|Mass"})
    yield Case("one image with two different label rows",
               lambda: nih.read_metadata(table("meta", pd.concat([metadata, conflict]))), must_fail=True)  # fmt: skip
    empty = metadata.copy()
    empty.loc[3, "Finding Labels"] = None
    yield Case("an empty Finding Labels cell", lambda: nih.read_metadata(table("meta", empty)), must_fail=True)
    yield Case("the Patient ID column missing",
               lambda: nih.read_metadata(table("meta", metadata.drop(columns=["Patient ID"]))), must_fail=True)
    coordinates = list(boxes.columns[2:6])
    yield Case("the box list as published", lambda: nih.read_boxes(table("boxes", boxes)))
    for name, column, value in (("a negative width", 2, -40.0), ("a box leaving the image", 0, 1000.0),
                                ("a NaN coordinate", 1, np.nan), ("a zero height", 3, 0.0)):  # fmt: skip
        broken = boxes.copy()
        broken.loc[2, coordinates[column]] = value
        yield Case(f"box list with {name}", lambda b=broken: nih.read_boxes(table("boxes", b)), must_fail=True)
    folder = shop.fresh("nih-images")
    for sub, seed in (("images_001/images", 0), ("images_002/images", 0)):
        shop.image(folder / sub / "00000001_000.png", seed=seed, size=(16, 16))
    yield Case("identical copies of an image in two folders", lambda: len(nih.index_images(folder)))
    clash = shop.fresh("nih-clash")
    for sub, seed in (("images_001/images", 0), ("images_002/images", 1)):
        shop.image(clash / sub / "00000001_000.png", seed=seed, size=(16, 16))
    yield Case("two different images with one name", lambda: len(nih.index_images(clash)), must_fail=True)


def demo_cases(shop: Workshop) -> Iterator[Case]:
    """The demo's predictor: every upload is its own result or its own message; no server path is shown."""
    legacy = ROOT / "demo" / "app.py"  # before the package (0.1): by file path, so older checkouts run too
    if legacy.is_file():
        spec = importlib.util.spec_from_file_location("fault_runs_demo_app", legacy)
        sys.modules[spec.name] = app = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
        spec.loader.exec_module(app)
    else:
        app = importlib.import_module("deit_scm_cxr.demo.app")
    predictor = app.Predictor(str(shop.trained))
    uploads = shop.fresh("uploads")
    first, second = shop.image(uploads / "a" / "chest.png", seed=5), shop.image(uploads / "b" / "chest.png", seed=6)

    def same_name_apart(result: Any, text: str) -> bool:
        results, _ = result
        names = [r.name for r in results]
        different = not np.array_equal(results[0].image, results[1].image)
        return len(set(names)) == 2 and different

    yield Case("two uploads with one name", lambda: predictor.predict([str(first), str(second)]),
               check=same_name_apart)  # fmt: skip
    garbage = uploads / "c" / "broken.dcm"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not a dicom")

    def no_server_path(result: Any, text: str) -> bool:
        results, errors = result
        return not results and len(errors) == 1 and str(uploads) not in errors[0] and "broken.dcm" in errors[0]

    yield Case("an unreadable upload", lambda: predictor.predict([str(garbage)]), check=no_server_path)
    blank = uploads / "blank.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(blank)
    yield Case("a constant image", lambda: predictor.predict([str(blank)]),
               check=lambda result, text: not result[0] and len(result[1]) == 1)  # fmt: skip
    many = [str(shop.image(uploads / "many" / f"{i}.png", seed=i, size=(40, 40))) for i in range(40)]
    yield Case("40 files in one upload (a limit, and a message saying so)", lambda: predictor.predict(many),
               check=lambda result, text: len(result[0]) < 40 and bool(result[1]))  # fmt: skip


CATEGORIES: dict[str, Callable[[Workshop], Iterable[Case]]] = {
    "runs_overwrite": overwrite_cases,
    "resume_changed_flags": changed_flag_cases,
    "checkpoint_damage": checkpoint_damage_cases,
    "cache_corruption": cache_cases,
    "saved_model_folders": saved_model_cases,
    "prediction_outputs": prediction_cases,
    "nih_folders": nih_cases,
    "demo": demo_cases,
}


def tally_categories(categories: dict[str, Callable[[Workshop], Iterable[Case]]], names: Iterable[str],
                     typed: Callable[[str], tuple[type, ...]], prefix: str, folder: Optional[Path] = None,
                     ) -> list[dict]:  # fmt: skip
    """Tally each named category (`typed(name)`: the errors that count as typed there) in a scratch folder,
    removed afterwards unless given; a JSON line per category on stdout."""
    scratch = folder or Path(tempfile.mkdtemp(prefix=prefix))
    shop = Workshop(scratch)
    rows = []
    try:
        for name in names:
            row = tally_cases(name, categories[name](shop), typed(name))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if folder is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return rows


def run_categories(names: Iterable[str], folder: Optional[Path] = None) -> list[dict]:
    """Tally each named category in a scratch folder (removed afterwards unless given)."""
    from deit_scm_cxr.data import load_dataset_module

    def typed(name: str) -> tuple[type, ...]:
        return (load_dataset_module("nih").NIHMetadataError,) if name == "nih_folders" else ()

    return tally_categories(CATEGORIES, names, typed, "fault-runs-", folder)


def campaign_main(description: str, categories: dict, run: Callable[[list[str]], list[dict]],
                  argv: Optional[list[str]] = None) -> list[dict]:  # fmt: skip
    """A campaign's command line: `--categories` (default all), third-party logs quietened."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--categories", nargs="+", choices=list(categories), default=list(categories))
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("transformers", "accelerate", "datasets", "PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return run(args.categories)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    return campaign_main(__doc__.split("\n\n")[0], CATEGORIES, run_categories, argv)


if __name__ == "__main__":
    main()
