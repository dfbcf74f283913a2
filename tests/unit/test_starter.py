"""`syncd config init`'s template and writer: what it writes parses, it never overwrites."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from syncd.config import find_config, init_config_path, parse_config, user_config_path
from syncd.errors import ConfigError, UsageError
from syncd.starter import INIT_TEMPLATE, REFERENCE, package_text, write_starting_config

DATA = Path(__file__).parents[2] / "syncd" / "data"


def _uncomment(text: str, table: str) -> str:
    """The template with the commented-out `[remotes.<table>]` block made live."""
    lines = text.splitlines()
    start = lines.index(f"# [remotes.{table}]")
    end = start
    while end < len(lines) and lines[end].startswith("# "):
        end += 1
    return "\n".join([*lines[:start], *(ln[2:] for ln in lines[start:end]), *lines[end:]])


def test_package_text_is_the_shipped_file() -> None:
    assert package_text(INIT_TEMPLATE) == (DATA / INIT_TEMPLATE).read_text()
    assert package_text(REFERENCE) == (DATA / REFERENCE).read_text()


def test_template_parses_as_written() -> None:
    import tomllib

    cfg = parse_config(tomllib.loads(package_text(INIT_TEMPLATE)), "config.toml",
                       {"HOME": "/home/someone"})
    assert [p.name for p in cfg.pairs] == ["documents"]
    assert cfg.pairs[0].local == Path("/home/someone/Documents")
    assert cfg.pairs[0].remote == "nas" and cfg.remotes["nas"].type == "local"


@pytest.mark.parametrize("table, kind", [("server", "sftp"), ("bucket", "s3")])
def test_commented_remote_examples_parse_once_uncommented(table: str, kind: str) -> None:
    import tomllib

    text = _uncomment(package_text(INIT_TEMPLATE), table)
    text = re.sub(r'^remote = "nas"', f'remote = "{table}"', text, flags=re.M)
    cfg = parse_config(tomllib.loads(text), "config.toml", {"HOME": "/home/someone"})
    assert cfg.remotes[table].type == kind
    assert cfg.pairs[0].remote == table


def test_writes_the_template_in_a_new_private_dir(tmp_path: Path) -> None:
    target = tmp_path / "xdg" / "syncd" / "config.toml"
    write_starting_config(target, private_dir=True)
    assert target.read_text() == package_text(INIT_TEMPLATE)
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700


def test_an_existing_dir_keeps_its_mode(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    write_starting_config(d / "config.toml", private_dir=True)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.write_text("# mine\n")
    with pytest.raises(UsageError, match=r"config\.toml already exists; .*never overwrites"):
        write_starting_config(target, private_dir=False)
    assert target.read_text() == "# mine\n"


def test_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.symlink_to(tmp_path / "elsewhere.toml")
    with pytest.raises(UsageError, match="already exists"):
        write_starting_config(target, private_dir=False)
    assert not (tmp_path / "elsewhere.toml").exists()


def test_a_directory_is_not_a_config_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"is a directory; give the config file's path"):
        write_starting_config(tmp_path, private_dir=False)


def test_a_file_in_the_way_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    with pytest.raises(UsageError, match=r"cannot create the directory .*blocker"):
        write_starting_config(tmp_path / "blocker" / "config.toml", private_dir=True)


def test_default_path_is_where_the_lookup_reads(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert init_config_path(env) == tmp_path / ".config" / "syncd" / "config.toml"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    assert init_config_path(env) == user_config_path(env) == tmp_path / "xdg" / "syncd" / "config.toml"
    write_starting_config(init_config_path(env), private_dir=True)
    assert find_config(None, env) == init_config_path(env)
    assert init_config_path({**env, "SYNCD_CONFIG": "~/c.toml"}) == Path("~/c.toml").expanduser()


def test_no_config_error_points_at_config_init_and_demo(tmp_path: Path) -> None:
    if Path("/etc/syncd/config.toml").exists():
        pytest.skip("/etc/syncd/config.toml exists on this machine: the lookup finds it")
    with pytest.raises(ConfigError) as e:
        find_config(None, {"HOME": str(tmp_path)})
    msg = str(e.value)
    assert "`syncd config init` writes a starting config to " \
           f"{tmp_path}/.config/syncd/config.toml" in msg
    assert "`syncd demo`" in msg
    assert "config.example.toml" not in msg
