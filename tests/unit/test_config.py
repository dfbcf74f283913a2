"""Config: every bad input names the file, the key path and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.config import find_config, load_config, parse_config, to_display
from syncd.errors import ConfigError
from syncd.units import parse_duration, parse_size

GOOD = """
[daemon]
state_dir = "{tmp}/state"
retry_initial = "250ms"
retry_max = "5m"

[remotes.nas]
type = "local"
path = "{tmp}/nas"

[[sync]]
name = "docs"
local = "{tmp}/docs"
remote = "nas"
path = "docs"
max_delete = 10
ignore = [".git/", "*.tmp"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text.replace("{tmp}", str(tmp_path)))
    return p


def load_err(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text), env=env or {"HOME": str(tmp_path)})
    return ei.value


def test_good_config_parses_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={"HOME": "/home/x"})
    assert cfg.daemon.retry_initial == 0.25 and cfg.daemon.retry_max == 300
    assert cfg.daemon.state_dir == tmp_path / "state"
    (p,) = cfg.pairs
    assert p.name == "docs" and p.remote == "nas" and p.path == "docs"
    assert p.delete == "trash" and p.mode == "push" and p.follow_symlinks is False
    assert p.max_delete.count == 10 and p.max_delete.limit(1000) == 10
    assert p.ignore == (".git/", "*.tmp")
    assert cfg.remotes["nas"].options["path"] == tmp_path / "nas"
    assert cfg.remotes["nas"].transfers == 4


def test_unknown_remote_names_key_and_known(tmp_path: Path) -> None:
    e = load_err(tmp_path, GOOD.replace('remote = "nas"', 'remote = "nsa"'))
    assert e.key == "sync[0].remote"
    assert "unknown remote 'nsa'; known: nas" in str(e)
    assert str(tmp_path / "config.toml") in str(e)


def test_second_pair_key_path_is_indexed(tmp_path: Path) -> None:
    text = GOOD + '\n[[sync]]\nname = "b"\nlocal = "/tmp/b"\nremote = "nas"\npath = "b"\nmode = "sideways"\n'
    e = load_err(tmp_path, text)
    assert e.key == "sync[1].mode" and "'sideways' is not one of" in str(e)


@pytest.mark.parametrize("bad, key, words", [
    ('retry_initial = "250ms"', "daemon.retry_initial", "not a duration"),
    ('max_delete = 10', "sync[0].max_delete", "not a count"),
    ('ignore = [".git/", "*.tmp"]', "sync[0].ignore", "array of strings"),
    ('path = "docs"', "sync[0].path", "must not contain '..'"),
    ('type = "local"', "remotes.nas.type", "not one of"),
])
def test_bad_values_are_named(tmp_path: Path, bad: str, key: str, words: str) -> None:
    replacement = {
        "daemon.retry_initial": 'retry_initial = "fast"',
        "sync[0].max_delete": 'max_delete = "lots"',
        "sync[0].ignore": "ignore = [1, 2]",
        "sync[0].path": 'path = "../escape"',
        "remotes.nas.type": 'type = "webdav"',
    }[key]
    assert bad in GOOD
    e = load_err(tmp_path, GOOD.replace(bad, replacement))
    assert e.key == key
    assert words in str(e)


def test_typo_suggests_the_key(tmp_path: Path) -> None:
    e = load_err(tmp_path, GOOD.replace("max_delete = 10", 'max_delte = 10'))
    assert e.key == "sync[0].max_delte" and "did you mean 'max_delete'" in str(e)


def test_missing_required_key(tmp_path: Path) -> None:
    e = load_err(tmp_path, GOOD.replace('local = "{tmp}/docs"\n', ""))
    assert e.key == "sync[0].local" and "missing" in str(e)


def test_not_yet_available_mode_says_so(tmp_path: Path) -> None:
    e = load_err(tmp_path, GOOD.replace('path = "docs"', 'path = "docs"\nmode = "pull"'))
    assert e.key == "sync[0].mode" and "not available" in str(e)


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    e = load_err(tmp_path, "[daemon\n")
    assert "invalid TOML" in str(e) and "line 1" in str(e)


def test_sync_must_be_array_of_tables(tmp_path: Path) -> None:
    e = load_err(tmp_path, GOOD.replace("[[sync]]", "[sync]"))
    assert e.key == "sync" and "[[sync]]" in str(e)


def test_duplicate_pair_names_and_overlap(tmp_path: Path) -> None:
    dup = GOOD + '\n[[sync]]\nname = "docs"\nlocal = "/tmp/x"\nremote = "nas"\npath = "other"\n'
    assert load_err(tmp_path, dup).key == "sync[1].name"
    overlap = GOOD + '\n[[sync]]\nname = "two"\nlocal = "/tmp/x"\nremote = "nas"\npath = "docs/sub"\n'
    e = load_err(tmp_path, overlap)
    assert e.key == "sync[1].path" and "overlaps" in str(e)


@pytest.mark.parametrize("second", [
    ('type = "local"\npath = "{tmp}/nas/"', "docs"),            # the same directory, again
    ('type = "local"\npath = "{tmp}/nas/docs"', ""),           # one root inside the other
    ('type = "local"\npath = "{tmp}/nas/docs"', "sub"),
    ('type = "local"\npath = "{tmp}/./nas"', "docs/x"),
])
def test_two_remote_sections_for_one_place_overlap_too(tmp_path: Path,
                                                       second: tuple[str, str]) -> None:
    """Pairs on two remote sections naming one directory (or one inside the other) would
    fight over it as much as two pairs on one section: refused, the other remote named."""
    remote, path = second
    text = GOOD + f'\n[remotes.again]\n{remote}\n\n[[sync]]\nname = "two"\n' \
        f'local = "{{tmp}}/two"\nremote = "again"\npath = "{path}"\n'
    e = load_err(tmp_path, text)
    assert e.key == "sync[1].path" and "the same place as remote 'again'" in str(e), str(e)


def test_remote_sections_for_other_places_do_not_overlap(tmp_path: Path) -> None:
    ok = GOOD + ('\n[remotes.other]\ntype = "local"\npath = "{tmp}/nas2"\n\n[[sync]]\n'
                 'name = "two"\nlocal = "{tmp}/two"\nremote = "other"\npath = "docs"\n'
                 '\n[remotes.s]\ntype = "sftp"\nhost = "h"\nuser = "a"\nroot = "up"\n'
                 '\n[remotes.t]\ntype = "sftp"\nhost = "h"\nuser = "b"\nroot = "up"\n'
                 '\n[[sync]]\nname = "s1"\nlocal = "{tmp}/s1"\nremote = "s"\n'
                 '\n[[sync]]\nname = "s2"\nlocal = "{tmp}/s2"\nremote = "t"\n')
    cfg = load_config(write(tmp_path, ok), env={})
    assert [p.name for p in cfg.pairs] == ["docs", "two", "s1", "s2"]


def test_local_inside_remote_dir_is_refused(tmp_path: Path) -> None:
    e = load_err(tmp_path, GOOD.replace('local = "{tmp}/docs"', 'local = "{tmp}/nas/docs/x"'))
    assert e.key == "sync[0].local" and "overlap" in str(e)


def test_env_and_tilde_expand_and_unset_env_is_an_error(tmp_path: Path) -> None:
    text = GOOD.replace('local = "{tmp}/docs"', 'local = "~/${SUB}/docs"')
    cfg = load_config(write(tmp_path, text), env={"HOME": "/home/u", "SUB": "work"})
    assert cfg.pairs[0].local == Path("/home/u/work/docs")
    e = load_err(tmp_path, text, env={"HOME": "/home/u"})
    assert e.key == "sync[0].local" and "$SUB is not set" in str(e)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace('local = "{tmp}/docs"', 'local = "docs"')),
                      env={})
    assert cfg.pairs[0].local == tmp_path / "docs"


def test_percent_max_delete() -> None:
    cfg = parse_config({"remotes": {"n": {"type": "local", "path": "/srv/n"}},
                        "sync": [{"name": "a", "local": "/data/a", "remote": "n", "path": "a",
                                  "max_delete": "25%"}]}, "x.toml", {})
    assert cfg.pairs[0].max_delete.limit(200) == 50


def test_lookup_order(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "syncd").mkdir(parents=True)
    (xdg / "syncd" / "config.toml").write_text("")
    assert find_config("/explicit.toml", {"SYNCD_CONFIG": "/env.toml"}) == Path("/explicit.toml")
    assert find_config(None, {"SYNCD_CONFIG": "/env.toml"}) == Path("/env.toml")
    assert find_config(None, {"XDG_CONFIG_HOME": str(xdg)}) == xdg / "syncd" / "config.toml"
    if not Path("/etc/syncd/config.toml").exists():
        with pytest.raises(ConfigError, match="no config file found"):
            find_config(None, {"XDG_CONFIG_HOME": str(tmp_path / "none"), "HOME": str(tmp_path)})


def test_display_masks_secrets(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={})
    shown = to_display(cfg)
    assert shown["sync"][0]["remote"] == "nas"
    shown_cfg = to_display(cfg.__class__(cfg.source, cfg.daemon, {
        "x": cfg.remotes["nas"].__class__("x", "local", 4, {"password": "hunter2", "path": "/p"})},
        cfg.pairs))
    assert shown_cfg["remotes"]["x"]["password"] == "********"


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("10s", 10), ("5m", 300), ("1h", 3600),
                                           ("1.5s", 1.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, n", [("64MiB", 64 << 20), ("512", 512), ("1GiB", 1 << 30),
                                     ("1GB", 10**9), ("4 KiB", 4096)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "5 minutes", "-1s", "ms"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_example_config_parses_and_documents_every_key() -> None:
    from syncd.config import DAEMON_KEYS, PAIR_KEYS, REMOTE_COMMON_KEYS, REMOTE_TYPE_KEYS

    example = Path(__file__).parents[2] / "syncd" / "data" / "config.example.toml"
    cfg = load_config(example, env={"HOME": "/home/someone"})
    assert cfg.pairs[0].local == Path("/home/someone/Documents")
    text = example.read_text()
    keys = (*DAEMON_KEYS, *PAIR_KEYS, *REMOTE_COMMON_KEYS, *REMOTE_TYPE_KEYS["local"],
            *REMOTE_TYPE_KEYS["sftp"], *REMOTE_TYPE_KEYS["s3"], *REMOTE_TYPE_KEYS["ftp"])
    for key in keys:
        assert f"\n{key} =" in text, f"config.example.toml does not document {key}"


SFTP = GOOD.replace('''type = "local"
path = "{tmp}/nas"''', '''type = "sftp"
host = "backup.example.net"
user = "sync"
root = "/srv/backup"
key_file = "~/.ssh/id_ed25519"''')


@pytest.mark.parametrize("root", ['root = "/srv/backup"\n', ""])
def test_sftp_pairs_overlap_under_any_root(tmp_path: Path, root: str) -> None:
    """A pair on the whole remote and one under it fight; with no root (the login's home)
    the review found them accepted."""
    text = SFTP.replace('root = "/srv/backup"\n', root).replace('path = "docs"', 'path = ""')
    text += '\n[[sync]]\nname = "two"\nlocal = "{tmp}/two"\nremote = "nas"\npath = "docs"\n'
    e = load_err(tmp_path, text, env={"HOME": "/home/x"})
    assert e.key == "sync[1].path" and "overlaps" in str(e)


def test_sftp_remote_parses_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SFTP), env={"HOME": "/home/x"})
    o = cfg.remotes["nas"].options
    assert o["host"] == "backup.example.net" and o["port"] == 22 and o["user"] == "sync"
    assert o["root"] == "/srv/backup" and o["key_file"] == "/home/x/.ssh/id_ed25519"
    assert o["known_hosts"] == "/home/x/.ssh/known_hosts" and o["host_key_policy"] == "strict"
    assert o["timeout"] == 30 and o["use_agent"] is True and o["fsync"] is False
    assert o["password_env"] == "" and o["passphrase_env"] == "" and o["connections"] == 2


@pytest.mark.parametrize(("add", "key", "words"), [
    ('password = "hunter2"', "remotes.nas.password", "never read from the config file"),
    ('passphrase = "x"', "remotes.nas.passphrase", "passphrase_env"),
    ('password_env = "hunter2 !"', "remotes.nas.password_env", "not an environment variable name"),
    ('host_key_policy = "auto-add"', "remotes.nas.host_key_policy", "strict, accept-new"),
    ("port = 70000", "remotes.nas.port", "out of range"),
    ('timeout = "0s"', "remotes.nas.timeout", "more than 0"),
    ("connections = 0", "remotes.nas.connections", "out of range"),
    ('connections = "2"', "remotes.nas.connections", "integer"),
])
def test_sftp_bad_keys_named(tmp_path: Path, add: str, key: str, words: str) -> None:
    e = load_err(tmp_path, SFTP.replace('user = "sync"', f'user = "sync"\n{add}'))
    assert e.key == key and words in str(e), str(e)
    assert "hunter2" not in str(e)


def test_sftp_host_must_be_a_host(tmp_path: Path) -> None:
    e = load_err(tmp_path, SFTP.replace('"backup.example.net"', '"sync@backup.example.net"'))
    assert e.key == "remotes.nas.host" and "put the user in 'user'" in str(e)
    e = load_err(tmp_path, SFTP.replace('host = "backup.example.net"\n', ""))
    assert e.key == "remotes.nas.host" and "missing" in str(e)


S3 = GOOD.replace('''type = "local"
path = "{tmp}/nas"''', '''type = "s3"
bucket = "my-archive"
prefix = "hosts/web1"''')


def test_s3_remote_defaults_and_bad_keys(tmp_path: Path) -> None:
    o = load_config(write(tmp_path, S3), env={"HOME": "/h"}).remotes["nas"].options
    assert o["bucket"] == "my-archive" and o["prefix"] == "hosts/web1"
    assert o["multipart_threshold"] == 64 << 20 and o["multipart_chunksize"] == 8 << 20
    assert o["addressing_style"] == "auto" and o["sse"] == ""
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"', 'aws_secret_access_key = "x"'))
    assert e.key == "remotes.nas.aws_secret_access_key" and "never read" in str(e)
    e = load_err(tmp_path, S3.replace('"my-archive"', '"s3://my-archive/x"'))
    assert e.key == "remotes.nas.bucket"
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"', 'multipart_chunksize = "1MiB"'))
    assert e.key == "remotes.nas.multipart_chunksize" and "5MiB" in str(e)
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"', 'multipart_chunksize = "1GiB"\n'
                                      'multipart_threshold = "1GiB"'))
    assert e.key == "remotes.nas.multipart_chunksize" and "512MiB" in str(e)
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"', 'multipart_threshold = "2GiB"'))
    assert e.key == "remotes.nas.multipart_threshold" and "memory" in str(e)


def test_archive_storage_class_cannot_trash(tmp_path: Path) -> None:
    # Trash is a server-side copy, which S3 refuses for archived objects: every delete
    # would fail on every run. Refused up front, with what to do.
    glacier = S3.replace('prefix = "hosts/web1"', 'storage_class = "DEEP_ARCHIVE"')
    e = load_err(tmp_path, glacier)
    assert e.key == "sync[0].delete" and "DEEP_ARCHIVE" in str(e) and '"keep"' in str(e)
    cfg = load_config(write(tmp_path, glacier.replace("max_delete = 10", 'delete = "keep"')),
                      env={"HOME": "/h"})
    assert cfg.pairs[0].delete == "keep"


@pytest.mark.parametrize("sc", ["standard_ia", "Standard", "FAST EST"])
def test_a_storage_class_not_in_s3_form_is_refused(tmp_path: Path, sc: str) -> None:
    """AWS refuses these on every upload (InvalidStorageClass): each file failed, after a
    `config check` that said OK."""
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"', f'storage_class = "{sc}"'))
    assert e.key.endswith(".storage_class") and "upper case" in str(e), str(e)


FTP = GOOD.replace('''type = "local"
path = "{tmp}/nas"''', '''type = "ftp"
host = "ftp.example.net"
user = "upload"
password_env = "SYNCD_PARTNER_PASSWORD"
root = "/incoming"''')


def test_ftp_remote_defaults(tmp_path: Path) -> None:
    from syncd.config import config_warnings

    cfg = load_config(write(tmp_path, FTP), env={"HOME": "/h"})
    o = cfg.remotes["nas"].options
    assert (o["host"], o["port"], o["user"], o["root"]) == ("ftp.example.net", 21, "upload",
                                                            "/incoming")
    assert o["tls"] == "explicit" and o["passive"] is True and o["timeout"] == 30
    assert o["password_env"] == "SYNCD_PARTNER_PASSWORD" and o["ca_file"] == ""
    assert config_warnings(cfg) == []
    implicit = load_config(write(tmp_path, FTP.replace('root = "/incoming"',
                                                       'root = "/incoming"\ntls = "implicit"')),
                           env={"HOME": "/h"})
    assert implicit.remotes["nas"].options["port"] == 990
    plain = load_config(write(tmp_path, FTP.replace('root = "/incoming"',
                                                    'root = "/incoming"\ntls = "none"')),
                        env={"HOME": "/h"})
    (w,) = config_warnings(plain)
    assert "remotes.nas" in w and "clear text" in w


@pytest.mark.parametrize(("add", "key", "words"), [
    ('password = "hunter2"', "remotes.nas.password", "password_env"),
    ('tls = "ssl"', "remotes.nas.tls", "explicit, implicit, none"),
    ('ca_file = "/nonexistent/ca.pem"', "remotes.nas.ca_file", "not a readable file"),
    ("passive = 1", "remotes.nas.passive", "true or false"),
    ('timeout = "0s"', "remotes.nas.timeout", "more than 0"),
    ('key_file = "~/.ssh/id"', "remotes.nas.key_file", "unknown key"),
])
def test_ftp_bad_keys_named(tmp_path: Path, add: str, key: str, words: str) -> None:
    e = load_err(tmp_path, FTP.replace('user = "upload"', f'user = "upload"\n{add}'))
    assert e.key == key and words in str(e), str(e)
    assert "hunter2" not in str(e)


def test_credentials_in_an_endpoint_url_and_absurd_durations_are_refused(tmp_path: Path) -> None:
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"',
                                      'endpoint_url = "http://KEY:SECRET@minio.example:9000"'))
    assert e.key == "remotes.nas.endpoint_url" and "SECRET" not in str(e)
    e = load_err(tmp_path, S3.replace('prefix = "hosts/web1"', 'timeout = "0s"'))
    assert e.key == "remotes.nas.timeout"
    e = load_err(tmp_path, GOOD.replace('retry_max = "5m"', 'retry_max = "99999999999d"'))
    assert e.key == "daemon.retry_max" and "too long" in str(e)


# --- secrets from files (systemd credentials) ------------------------------------------------

CRED_SFTP = SFTP.replace('key_file = "~/.ssh/id_ed25519"', '''\
key_file = "${CREDENTIALS_DIRECTORY}/sftp_key"
passphrase_file = "$CREDENTIALS_DIRECTORY/sftp_passphrase"
password_file = "~/secrets/pw"''')


def test_secret_files_expand_like_every_path(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, CRED_SFTP),
                      env={"HOME": "/home/x", "CREDENTIALS_DIRECTORY": "/run/credentials/s"})
    o = cfg.remotes["nas"].options
    assert o["key_file"] == "/run/credentials/s/sftp_key"
    assert o["passphrase_file"] == "/run/credentials/s/sftp_passphrase"
    assert o["password_file"] == "/home/x/secrets/pw" and o["password_env"] == ""
    rel = load_config(write(tmp_path, SFTP.replace('user = "sync"',
                                                   'user = "sync"\npassword_file = "pw"')),
                      env={"HOME": "/home/x"})
    assert rel.remotes["nas"].options["password_file"] == str(tmp_path / "pw")
    empty = load_config(write(tmp_path, SFTP.replace('user = "sync"',
                                                     'user = "sync"\npassword_file = ""')),
                        env={"HOME": "/home/x"})
    assert empty.remotes["nas"].options["password_file"] == ""   # "" is unset


def test_credentials_directory_unset_is_accepted_and_explained(tmp_path: Path) -> None:
    """Outside systemd $CREDENTIALS_DIRECTORY is unset: `config check` must not reject the
    service's config for it, but say what happens and how to try it."""
    from syncd.config import config_warnings

    cfg = load_config(write(tmp_path, CRED_SFTP), env={"HOME": "/home/x"})
    o = cfg.remotes["nas"].options
    assert o["key_file"] == "${CREDENTIALS_DIRECTORY}/sftp_key"
    assert o["passphrase_file"] == "${CREDENTIALS_DIRECTORY}/sftp_passphrase"
    warnings = config_warnings(cfg)
    for k in ("key_file", "passphrase_file"):
        (w,) = [w for w in warnings if f"remotes.nas.{k} = " in w]
        assert "LoadCredential=" in w and "systemd-run" in w and "not checked here" in w
    (w,) = [w for w in warnings if "remotes.nas.password_file" in w]
    assert "/home/x/secrets/pw does not exist" in w and "--connect" in w
    # Any other unset variable is still an error.
    e = load_err(tmp_path, CRED_SFTP.replace("$CREDENTIALS_DIRECTORY/", "$NOPE/"),
                 env={"HOME": "/home/x"})
    assert e.key == "remotes.nas.passphrase_file" and "$NOPE is not set" in str(e)


@pytest.mark.parametrize(("remote", "secret"), [
    (SFTP, "password"), (SFTP, "passphrase"), (FTP, "password")])
def test_a_secret_from_both_a_file_and_a_variable_is_refused(
        tmp_path: Path, remote: str, secret: str) -> None:
    text = remote.replace('user = "', f'{secret}_file = "/etc/syncd/s"\n'
                                      f'{secret}_env = "SYNCD_S"\nuser = "', 1)
    text = text.replace('password_env = "SYNCD_PARTNER_PASSWORD"\n', "")
    e = load_err(tmp_path, text, env={"HOME": "/home/x"})
    assert e.key == f"remotes.nas.{secret}_file"
    assert f"and {secret}_env are both set; keep one" in str(e)
    assert str(tmp_path / "config.toml") in str(e)


def test_config_check_shows_where_secrets_are_never_what(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    cfg = load_config(write(tmp_path, FTP.replace('password_env = "SYNCD_PARTNER_PASSWORD"',
                                                  'password_file = "{tmp}/pw"')),
                      env={"HOME": "/h"})
    shown = to_display(cfg)["remotes"]["nas"]
    assert shown["password_file"] == str(tmp_path / "pw") and shown["password_env"] == ""
    assert "hunter2" not in repr(to_display(cfg))


def test_a_password_in_the_config_points_at_both_ways(tmp_path: Path) -> None:
    e = load_err(tmp_path, FTP.replace('user = "upload"', 'user = "upload"\npassword = "hunter2"'))
    assert "password_file" in str(e) and "password_env" in str(e) and "hunter2" not in str(e)


# --- the state dir and the trees syncd writes ----------------------------------------------


def test_state_dir_inside_a_pairs_remote_directory_is_refused(tmp_path: Path) -> None:
    """Listed as remote content the local tree lacks, it would be trashed by every run."""
    text = GOOD.replace('state_dir = "{tmp}/state"', 'state_dir = "{tmp}/nas/state"') \
        .replace('path = "docs"', 'path = ""')
    e = load_err(tmp_path, text)
    assert e.key == "daemon.state_dir", str(e)
    assert f"{tmp_path}/nas/state is inside the remote directory {tmp_path}/nas of pair " \
           "'docs'" in str(e) and "outside every remote directory" in str(e)
    nested = GOOD.replace('state_dir = "{tmp}/state"', 'state_dir = "{tmp}/nas/docs/s/t"')
    assert load_err(tmp_path, nested).key == "daemon.state_dir"


@pytest.mark.parametrize("state_dir", [
    "{tmp}/nas/elsewhere",     # under the remote's path, beside the pair's directory
    "{tmp}/docs/.state",       # inside the local root: every pair ignores it there
    "{tmp}/state/x/..",        # written another way, still outside
])
def test_state_dir_where_no_pair_writes_is_accepted(tmp_path: Path, state_dir: str) -> None:
    text = GOOD.replace('state_dir = "{tmp}/state"', f'state_dir = "{state_dir}"')
    cfg = load_config(write(tmp_path, text), env={"HOME": str(tmp_path)})
    assert cfg.pairs[0].name == "docs"


def test_a_local_root_that_is_the_state_dir_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace('state_dir = "{tmp}/state"', 'state_dir = "{tmp}/docs/"')
    e = load_err(tmp_path, text)
    assert e.key == "sync[0].local" and "is the state dir" in str(e), str(e)


TWO_SERVERS = GOOD.replace('''type = "local"
path = "{tmp}/nas"''', '''type = "{type}"
host = "{host_a}"
port = {port_a}
user = "sync"
root = "/srv/backup"''') + '''
[remotes.again]
type = "{type}"
host = "{host_b}"
port = {port_b}
user = "sync"
root = "/srv/backup"

[[sync]]
name = "two"
local = "{tmp}/two"
remote = "again"
path = "docs/sub"
'''


def _two(kind: str, host_a: str, host_b: str, port_a: int = 2222, port_b: int = 2222) -> str:
    return (TWO_SERVERS.replace("{type}", kind).replace("{host_a}", host_a)
            .replace("{host_b}", host_b).replace("{port_a}", str(port_a))
            .replace("{port_b}", str(port_b)))


@pytest.mark.parametrize("kind", ["sftp", "ftp"])
def test_one_server_under_two_host_names_overlaps(tmp_path: Path, kind: str) -> None:
    e = load_err(tmp_path, _two(kind, "127.0.0.1", "localhost"))
    assert e.key == "sync[1].path" and "the same place as remote 'again'" in str(e), str(e)


@pytest.mark.parametrize(("host_b", "port_b"), [
    ("127.0.0.1", 2223),                      # another port: another server
    ("no-such-host.invalid", 2222),           # does not resolve: compared as written
])
@pytest.mark.parametrize("kind", ["sftp", "ftp"])
def test_other_servers_do_not_overlap(tmp_path: Path, kind: str, host_b: str,
                                      port_b: int) -> None:
    cfg = load_config(write(tmp_path, _two(kind, "127.0.0.1", host_b, port_b=port_b)),
                      env={"HOME": str(tmp_path)})
    assert [p.name for p in cfg.pairs] == ["docs", "two"]


def test_hosts_are_looked_up_only_for_paths_that_would_overlap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    looked: list[str] = []

    def getaddrinfo(host: str, *a: object, **kw: object) -> list[object]:
        looked.append(host)
        raise OSError("no lookups here")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    apart = _two("sftp", "a.example", "b.example").replace('path = "docs/sub"', 'path = "x"')
    load_config(write(tmp_path, apart), env={"HOME": str(tmp_path)})
    assert looked == []
    load_config(write(tmp_path, _two("sftp", "a.example", "b.example")),
                env={"HOME": str(tmp_path)})   # would overlap: looked up, unresolved, apart
    assert sorted(looked) == ["a.example", "b.example"]
