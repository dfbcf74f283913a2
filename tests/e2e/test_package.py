"""The package as users get it: a wheel built from the tree ships syncd/data/, and the
installed (non-editable) `syncd` writes a starting config that the rest of syncd accepts."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TREE = Path(__file__).parents[2]
DATA_FILES = ["syncd/data/config.example.toml", "syncd/data/config.init.toml",
              "syncd/data/systemd/syncd.service", "syncd/data/systemd/syncd-user.service"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree: an in-tree build would reuse a stale build/
    dir (files deleted from the tree still shipped) and write into the worktree."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(TREE / name, src / name)
    shutil.copytree(TREE / "syncd", src / "syncd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = base / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = out.glob("syncd-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (not editable) into its own directory: the `syncd` script it
    brings runs with this interpreter, whose site-packages provide the dependencies."""
    target = tmp_path_factory.mktemp("target")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return target


def run(installed: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SYNCD_") and k not in ("XDG_CONFIG_HOME", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONPATH=str(installed))
    # cwd: not the tree, whose syncd/ would be imported instead of the installed one.
    return subprocess.run([str(installed / "bin" / "syncd"), *args], capture_output=True,
                          text=True, env=env, timeout=120, cwd=home, stdin=subprocess.DEVNULL)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    h = tmp_path / "home"
    h.mkdir()
    yield h


def test_wheel_ships_the_config_files_and_units(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in DATA_FILES:
            assert f in names, f"{f} is not in {wheel.name}"
            assert z.read(f) == (TREE / f).read_bytes()


def test_installed_syncd_is_the_wheel_not_the_tree(installed: Path, home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    p = subprocess.run([sys.executable, "-c", "import syncd; print(syncd.__file__)"],
                       capture_output=True, text=True, env=env, cwd=home, timeout=60)
    assert Path(p.stdout.strip()).is_relative_to(installed), p.stdout + p.stderr


def test_config_init_then_check_and_dry_run(installed: Path, home: Path) -> None:
    p = run(installed, "config", "init", home=home)
    assert p.returncode == 0, p.stderr
    cfg = home / ".config" / "syncd" / "config.toml"
    assert f"wrote a starting config: {cfg}" in p.stdout
    assert "syncd config check " in p.stdout and "--config" not in p.stdout
    assert "syncd reconcile --dry-run" in p.stdout
    assert stat.S_IMODE(cfg.parent.stat().st_mode) == 0o700

    # As written, the config is valid (`config check` does not look at the disk), and
    # a dry run stops at the local root that does not exist.
    p = run(installed, "config", "check", "--config", str(cfg), home=home)
    assert p.returncode == 0, p.stderr
    assert f"local: {home}/Documents" in p.stdout
    p = run(installed, "reconcile", "--dry-run", "--config", str(cfg), home=home)
    assert p.returncode == 4, p.stdout + p.stderr
    assert "the local root does not exist" in p.stdout

    src, nas = home / "Documents", home / "nas"
    (src / "notes").mkdir(parents=True)
    (src / "notes" / "a.txt").write_text("hello")
    nas.mkdir()
    text = cfg.read_text()
    assert 'path = "/mnt/nas/backup"' in text
    cfg.write_text(text.replace('path = "/mnt/nas/backup"', f'path = "{nas}"'))
    p = run(installed, "config", "check", "--config", str(cfg), home=home)
    assert p.returncode == 0, p.stderr
    assert f"path: {nas}" in p.stdout
    p = run(installed, "reconcile", "--dry-run", "--config", str(cfg), home=home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "notes/a.txt" in p.stdout
    assert not (nas / "documents").exists()   # a dry run


def test_config_init_refuses_to_overwrite(installed: Path, home: Path) -> None:
    cfg = home / "c.toml"
    assert run(installed, "config", "init", str(cfg), home=home).returncode == 0
    cfg.write_text("# edited\n")
    p = run(installed, "config", "init", str(cfg), home=home)
    assert p.returncode == 2
    assert p.stderr.startswith(f"syncd: error: {cfg} already exists")
    assert "Traceback" not in p.stderr
    assert cfg.read_text() == "# edited\n"


def test_config_example_prints_the_shipped_reference(installed: Path, home: Path) -> None:
    p = run(installed, "config", "example", home=home)
    assert p.returncode == 0, p.stderr
    assert p.stdout == (TREE / "syncd/data/config.example.toml").read_text()
