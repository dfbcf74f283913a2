"""`syncd demo`: a self-contained example — a source tree, a destination directory acting as
the remote, a state dir and a config — that needs no server and is safe to re-run."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG = """\
# syncd demo config, written by `syncd demo`. Every key: `syncd config example`.
[daemon]
state_dir = "state"        # relative paths are relative to this file
log_format = "auto"
log_level = "info"

[remotes.demo-nas]
type = "local"
path = "nas"               # stands in for a NAS mount such as /mnt/nas/backup

[[sync]]
name = "docs"
local = "source"
remote = "demo-nas"
path = "docs"
mode = "push"
delete = "trash"           # files deleted locally go to nas/docs/.syncd-trash/<time>/
max_delete = "50%"
ignore = [".git/", "*.tmp"]
"""

FILES = {
    "README.txt": b"This tree is synced by syncd into ../nas/docs.\n",
    "notes/todo.md": b"- try `syncd reconcile --dry-run`\n- delete a file and re-run\n",
    "notes/ideas.md": b"# ideas\n",
    "scratch.tmp": b"ignored by the *.tmp pattern\n",
    ".git/HEAD": b"ref: refs/heads/main\n",
}


def make_demo(directory: Path) -> Path:
    """Create what is missing under `directory`; never overwrite the user's edits."""
    d = directory.resolve()
    for sub in ("source", "nas", "state"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for rel, data in FILES.items():
        p = d / "source" / rel
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    big = d / "source" / "photos" / "sample.bin"
    if not big.exists():
        big.parent.mkdir(parents=True, exist_ok=True)
        big.write_bytes(os.urandom(256 * 1024))
    cfg = d / "config.toml"
    if not cfg.exists():
        cfg.write_text(CONFIG)
    return cfg
