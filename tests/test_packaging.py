"""What a regular (non-editable) install holds: the wheel `pip install .` builds, as the
cluster image installs it, run from outside the sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raypurify.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of what the image copies and installed
    (without dependencies: the test's own environment has them) into a folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("raypurify", "tune_spaces"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(root / "dist")],
        cwd=src,
        check=True,
    )
    (wheel,) = (root / "dist").glob("raypurify-*.whl")
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def raypurify(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {str(target)!r}); from raypurify.cli import main; "
    code += f"sys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_an_installed_package_has_its_sweep_spaces_presets_and_sample(installed, tmp_path):
    listed = raypurify(installed, "spaces", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert names == {p.stem for p in (ROOT / "tune_spaces").glob("*.yaml")}
    presets = raypurify(installed, "presets", cwd=tmp_path)
    assert "cifar10-mini" in presets.stdout, presets.stderr
    code = (
        f"import sys; sys.path.insert(0, {str(installed)!r}); "
        "from raypurify.sweeps.space import load_space; "
        "s = load_space('demo', datasets=False); print(s.attack.released.paths[0])"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    poison = Path(found.stdout.strip())
    assert poison.is_relative_to(installed) and poison.is_file(), found.stderr  # not the repo's


def test_spaces_says_so_when_an_install_has_none(monkeypatch, tmp_path, capsys):
    import raypurify.sweeps.space as space

    monkeypatch.setattr(space, "SPACE_DIR", tmp_path / "tune_spaces")
    assert main(["spaces"]) == 2
    assert "no sweep spaces in" in capsys.readouterr().err
