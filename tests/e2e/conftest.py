"""Helpers to run the installed `syncd` command in a subprocess against temp trees."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SYNCD = Path(sys.executable).parent / "syncd"


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.out)["pairs"][0]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.err.splitlines() if line.startswith("{")]


def run_syncd(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
              cwd: Path | None = None) -> Run:
    cmd = [*prefix, *([str(SYNCD)] if SYNCD.exists() else [sys.executable, "-m", "syncd"])]
    e = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    e.update(env or {})
    p = subprocess.run([*cmd, *args], capture_output=True, text=True, env=e, timeout=120,
                       cwd=cwd, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout, p.stderr)


# Before the kind changes of kind_change_run: two folders and a file that change kind.
KIND_BEFORE = {"was_dir/a.txt": b"A", "was_dir/sub/b.txt": b"B", "was_dir2/c.txt": b"C2",
               "was_file": b"old file"}


def kind_change_run(s: Any, keepers: int = 0) -> Run:
    """Sync KIND_BEFORE (plus `keepers` files that never change: head room under
    max_delete), then replace both folders by files and the file by a folder; return the
    second reconcile. `s` is a setup with .src, .write() and .reconcile()."""
    for rel, data in {**KIND_BEFORE, **{f"keep{i}": b"k" for i in range(keepers)}}.items():
        s.write(rel, data)
    first = s.reconcile()
    assert first.code == 0, first.err
    shutil.rmtree(s.src / "was_dir")
    shutil.rmtree(s.src / "was_dir2")   # two replacements: they share the last phase
    s.write("was_dir", b"now a file")
    s.write("was_dir2", b"also a file")
    (s.src / "was_file").unlink()
    s.write("was_file/inner/c.txt", b"C")
    return s.reconcile()


def write_file(root: Path, rel: str, data: bytes) -> Path:
    """Create root/rel with `data`, parents included (test trees)."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


@dataclass
class Setup:
    root: Path
    src: Path
    dst: Path
    state: Path
    config: Path

    @property
    def mirror(self) -> Path:
        return self.dst / "docs"

    def write(self, rel: str, data: bytes) -> Path:
        return write_file(self.src, rel, data)

    def reconcile(self, *extra: str, **kw: Any) -> Run:
        return run_syncd("reconcile", "--config", str(self.config), "--json", *extra, **kw)


CONFIG = """\
[daemon]
state_dir = "{state}"
log_format = "json"
retry_initial = "10ms"
retry_max = "50ms"
max_attempts = 3

[remotes.nas]
type = "local"
path = "{dst}"

[[sync]]
name = "docs"
local = "{src}"
remote = "nas"
path = "docs"
delete = "{delete}"
max_delete = "{max_delete}"
ignore = [".git/", "*.tmp"]
"""


def make_setup(root: Path, delete: str = "trash", max_delete: str = "50%") -> Setup:
    s = Setup(root, root / "src", root / "dst", root / "state", root / "config.toml")
    s.src.mkdir(parents=True)
    s.dst.mkdir()
    s.config.write_text(CONFIG.format(state=s.state, dst=s.dst, src=s.src, delete=delete,
                                      max_delete=max_delete))
    return s


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path)


def tree(root: Path) -> dict[str, bytes]:
    """Files under root (syncd's trash and temp files left out). Safe to call while syncd
    writes there: a file that vanishes between listing and reading (a temp being renamed)
    is skipped."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name.startswith(".syncd-tmp-") or ".syncd-trash" in p.parts:
            continue
        try:
            if p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
        except FileNotFoundError:
            continue
    return out


@contextlib.contextmanager
def tmpfs_at(path: Path) -> Iterator[Path]:
    """A small tmpfs mounted at `path` (a disk that can be unmounted under syncd), removed
    at the end if still there. Needs root (CI runs as root); elsewhere the test skips."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test filesystem needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "syncd-test", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)
