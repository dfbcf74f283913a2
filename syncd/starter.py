"""`syncd config init` and `syncd config example`: the starting config and the full
reference shipped in the package (syncd/data/), and writing the former without ever
overwriting a file."""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

from syncd.errors import UsageError

INIT_TEMPLATE = "config.init.toml"
REFERENCE = "config.example.toml"


def package_text(name: str) -> str:
    """A text file of syncd/data/ (read through importlib.resources: works from a wheel,
    an editable install or a zip)."""
    return resources.files("syncd").joinpath("data", name).read_text(encoding="utf-8")


def write_starting_config(path: Path, *, private_dir: bool) -> None:
    """Write the starting config to `path`, creating its directory (0700 when
    `private_dir`: a user's config dir can hold references to secrets). A file already
    there, whatever it holds, is left alone: UsageError."""
    text = package_text(INIT_TEMPLATE)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private_dir else 0o777)
    except FileExistsError:   # exist_ok covers directories only: a file is in the way
        raise UsageError(f"cannot create the directory {parent}: a file is in the way; "
                         "give another PATH") from None
    except OSError as e:
        raise UsageError(f"cannot create the directory {parent}: {e.strerror}; "
                         "give another PATH") from None
    try:
        # O_EXCL: a file created meanwhile (or a symlink, even a dangling one) is refused
        # too, not overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory; give the config file's path, "
                             f"e.g. {path / 'config.toml'}") from None
        raise UsageError(f"{path} already exists; `syncd config init` never overwrites a "
                         f"config. Edit it and check it with `syncd config check --config "
                         f"{path}`, or give another PATH") from None
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror}; give another PATH") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        # A half-written file would block the next `config init` and fail to parse.
        with contextlib.suppress(OSError):
            path.unlink()
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
