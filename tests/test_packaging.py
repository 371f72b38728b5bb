"""Issue 32: the package as a user gets it — one declaration per setting, recipes as data, entry points, the
wheel's contents, the README's first screen and its inference example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import deit_scm_cxr.data.prepare as data_prepare
import deit_scm_cxr.evaluation.evaluator as evaluator
import deit_scm_cxr.outputs.card as card
import deit_scm_cxr.training.loop as loop
import deit_scm_cxr.training.run as run_wsol
from deit_scm_cxr.training.arguments import ARGUMENT_CLASSES, OptimizationArguments, RunArguments
from remote_code import run_outside_repo
from tiny_run import TINY

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(SRC)}


# ----------------------------------------------------------------------------- one declaration per setting


def test_every_flag_is_declared_once_and_the_settings_repeat_no_default():
    names = [f.name for cls in ARGUMENT_CLASSES for f in fields(cls)]
    assert len(names) == len(set(names)), "a flag declared in two argument classes"
    for settings in (data_prepare.DataSettings, evaluator.EvaluationSettings, loop.TrainingSettings,
                     card.CardSettings, run_wsol.ModelSettings):  # fmt: skip
        flags = [f for f in fields(settings) if f.name in names]
        with_default = [f.name for f in flags if f.default is not MISSING or f.default_factory is not MISSING]
        assert not with_default, f"{settings.__name__} repeats the default of {with_default}"
    assert RunArguments().seed == 42 and run_wsol.settings_for("--output_dir", "o").data.seed == 42


def test_help_shows_the_value_a_run_will_use():
    def help_of(*flags: str) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "run_wsol.py"), *flags, "--help"], env=_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return " ".join(done.stdout.split())

    default = help_of()
    assert "--num_train_epochs NUM_TRAIN_EPOCHS, --num-train-epochs NUM_TRAIN_EPOCHS epochs (default: 50)" in default
    assert "(default: 42)" in default and "(default: 96)" in default  # the seed and the image size a run uses
    official = help_of("--recipe", "official")
    assert "epochs (default: 30)" in official and "(default: 5e-05)" in official and "(default: step)" in official


def test_a_typed_flag_wins_over_the_recipe_file_and_the_recipe_over_the_default(tmp_path):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"training": {"num_train_epochs": 7, "weight_decay": 0.2, "learning_rate": 1e-3},
                                  "model_config": {"conv_stem_kernel_size": 3}}))  # fmt: skip
    args = run_wsol.parse_args(["--recipe", str(recipe), "--weight_decay", "0.3", "--output_dir", str(tmp_path / "a")])
    assert args.weight_decay == 0.3  # typed: wins over the recipe
    assert args.num_train_epochs == 7 and args.learning_rate == 1e-3  # the recipe: wins over the defaults
    assert args.per_device_train_batch_size == OptimizationArguments().per_device_train_batch_size  # default
    assert run_wsol.model_settings(args).config_fields["conv_stem_kernel_size"] == 3
    assert args.recipe_values["training"]["weight_decay"] == 0.3  # recorded as used
    typed = run_wsol.parse_args(["--recipe", str(recipe), "--config_overrides", "conv_stem_kernel_size=4",
                                 "--output_dir", str(tmp_path / "b")])  # fmt: skip
    assert run_wsol.model_settings(typed).config_fields["conv_stem_kernel_size"] == 4


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("{not json", "not a readable JSON recipe"), ('{"training": {"learning_rat": 1}}', "unknown key(s) learning_rat"),
     ('{"training": {"output_dir": "x"}}', "unknown key(s) output_dir"), ("[1, 2]", "a recipe is a JSON object")],
)
def test_a_bad_recipe_file_is_one_line_naming_it(content, fragment, tmp_path):
    recipe = tmp_path / "bad.json"
    recipe.write_text(content)
    done = subprocess.run([sys.executable, str(ROOT / "run_wsol.py"), "--recipe", str(recipe), "--output_dir",
                           str(tmp_path / "x")], env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0] and str(recipe) in lines[0]


def test_a_runs_recipe_json_reproduces_its_training_values(tmp_path):
    output = tmp_path / "run"
    flags = [*TINY, "--max_train_steps", "1", "--weight_decay", "0.07"]
    run_wsol.main([*flags, "--output_dir", str(output)])
    written = json.loads((output / "recipe.json").read_text())
    assert written["training"]["weight_decay"] == 0.07 and written["model_config"]["patch_embedding"] == "conv_stem"
    again = run_wsol.parse_args(["--recipe", str(output / "recipe.json"), "--output_dir", str(tmp_path / "again")])
    first = run_wsol.parse_args([*flags, "--output_dir", str(tmp_path / "first")])
    for name in written["training"]:
        assert getattr(again, name) == getattr(first, name), name


def test_legacy_checkpoint_flags_compare_equal_to_todays(tmp_path):
    """0.1 recorded `config_overrides` as None when not given and had no `--scm_warmup_fraction`."""
    from deit_scm_cxr.training import checkpoints

    now = vars(run_wsol.parse_args(["--output_dir", str(tmp_path / "x")]))
    old = {k: v for k, v in now.items() if k not in ("scm_warmup_fraction", "recipe_values")}
    recorded = checkpoints.run_settings({**old, "config_overrides": None})
    checkpoints.check_resumed_settings(recorded, {k: v for k, v in now.items() if k != "recipe_values"}, tmp_path)


# ----------------------------------------------------------------------------- entry points and the wheel


@pytest.mark.parametrize(
    "module",
    ["deit_scm_cxr.training", "deit_scm_cxr.pretraining", "deit_scm_cxr.predict", "deit_scm_cxr.convert",
     "deit_scm_cxr.export_onnx", "deit_scm_cxr.demo"],
)
def test_every_python_m_entry_point_answers_help(module, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "--help"], env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_console_scripts_point_at_functions_that_exist():
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"deit-scm-train", "deit-scm-pretrain", "deit-scm-predict", "deit-scm-convert",
                            "deit-scm-export-onnx", "deit-scm-demo"}  # fmt: skip
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_the_wheel_holds_one_package_with_its_data(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"deit_scm_cxr", next(t for t in top if t.endswith(".dist-info"))}
    for data in ("training/recipes/official.json", "training/recipes/scratch.json", "demo/README.md", "py.typed"):
        assert f"deit_scm_cxr/{data}" in names, data
    assert not [n for n in names if "/datasets/" in n or n.startswith("datasets")]


# ----------------------------------------------------------------------------- the README


def test_readme_first_screen_says_what_a_newcomer_needs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_screen = "\n".join(text.splitlines()[:60])
    assert "pip install" in first_screen and "Research use only" in first_screen and "clinical" in first_screen
    example = re.search(r"```python\n(.*?)```", first_screen, re.S)
    assert example and len(example.group(1).strip().splitlines()) <= 5 and "pipeline(" in example.group(1)


def test_readme_inference_example_runs_as_written(tmp_path):
    from pydicom.data import get_testdata_file

    output = tmp_path / "run"
    run_wsol.main([*TINY, "--max_train_steps", "1", "--output_dir", str(output)])
    example = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert '"outputs/wsol"' in example and '"patient.dcm"' in example
    example = example.replace('"outputs/wsol"', repr(str(output))).replace('"patient.dcm"',
                                                                         repr(get_testdata_file("RG1_UNCR.dcm")))
    done = run_outside_repo(example, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] in {"Atelectasis", "Other_pathologies", "No_pathologies"}
