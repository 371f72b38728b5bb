"""Repository contracts: README's commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "README must start with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]


def test_readme_starts_with_setup_and_test_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert any("pytest" in c for c in commands)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    setup = next(c for c in _readme_commands() if "pytest" not in c)
    assert setup.split("&&")[0].strip() in ci_lines


def test_the_root_holds_thin_scripts_and_the_package_everything_else():
    """The code lives in `src/deit_scm_cxr`; the root's `run_*.py` only call its entry points (so that
    `accelerate launch run_wsol.py` works from a checkout), and pyproject lists no loose modules."""
    import tomllib

    assert sorted(path.name for path in ROOT.glob("*.py")) == ["run_pretrain.py", "run_wsol.py"]
    for script in ROOT.glob("*.py"):
        text = script.read_text()
        assert len(text.splitlines()) <= 15 and "from deit_scm_cxr." in text and "def " not in text, script
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py-modules" not in setuptools and setuptools["packages"]["find"]["where"] == ["src"]


def test_each_test_runs_in_an_empty_directory_of_its_own():
    """What a user leaves in the checkout (`outputs/wsol/` after the README's first command, caches) or in the
    directory pytest starts from must not reach a test: relative defaults resolve in an empty folder."""
    import os

    here = Path.cwd()
    assert not here.is_relative_to(ROOT) and list(here.iterdir()) == []
    assert not Path(os.environ["HF_HOME"]).is_relative_to(ROOT)


def test_ci_runs_the_tests_after_the_main_job_has_written_its_outputs():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    main_job = next(i for i, line in enumerate(lines) if line.startswith("accelerate launch run_wsol.py"))
    tests = next(i for i, line in enumerate(lines) if "pytest" in line and not line.startswith("#"))
    assert main_job < tests and "test -f outputs/wsol/all_results.json" in lines[main_job:tests]
