"""Secrets read from files: one trailing newline dropped, every failure names the remote,
the key and the file, and no message ever holds the secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.credentials import MAX_SECRET_BYTES, read_secret_file
from syncd.errors import AuthError


@pytest.mark.parametrize(("content", "secret"), [
    (b"pw\n", "pw"), (b"pw\r\n", "pw"), (b"pw", "pw"), (b"pw\n\n", "pw\n"),
    (b" spaced pw \n", " spaced pw "), ("pässwörd\n".encode(), "pässwörd")])
def test_content_is_the_secret_less_one_trailing_newline(
        tmp_path: Path, content: bytes, secret: str) -> None:
    f = tmp_path / "s"
    f.write_bytes(content)
    assert read_secret_file(str(f), "box", "password_file") == secret


def err(path: str) -> str:
    with pytest.raises(AuthError) as ei:
        read_secret_file(path, "box", "password_file")
    assert ei.value.remote == "box"
    return str(ei.value)


def test_missing_empty_big_binary_and_directory_are_explained(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    m = err(str(missing))
    assert m.startswith(f"remote 'box': remotes.box.password_file = \"{missing}\": the file "
                        "does not exist; create it holding only the secret"), m
    (tmp_path / "empty").write_bytes(b"\n")
    assert "is empty; write the secret into it" in err(str(tmp_path / "empty"))
    (tmp_path / "big").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    assert "over 64 KiB, not a password" in err(str(tmp_path / "big"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe secret")
    m = err(str(tmp_path / "bin"))
    assert "not UTF-8 text" in m and "secret" not in m.replace("password_file", "")
    assert "cannot read the file: Is a directory" in err(str(tmp_path))


def test_a_missing_credential_under_systemd_points_at_load_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    m = err(str(tmp_path / "ftp_password"))
    assert "the unit's LoadCredential= provides ftp_password" in m


def test_credentials_directory_unset_when_read(tmp_path: Path) -> None:
    m = err("${CREDENTIALS_DIRECTORY}/ftp_password")
    assert "$CREDENTIALS_DIRECTORY is set only when systemd starts syncd with " \
           "LoadCredential=" in m and "systemd-run" in m


def test_unreadable_file_names_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads any file, so the refusal is the kernel's answer made up here."""
    import builtins

    f = tmp_path / "s"
    f.write_text("pw")
    real_open = builtins.open

    def refuse(path: object, *a: object, **kw: object) -> object:
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", refuse)
    m = err(str(f))
    assert "is not readable by user " in m and "chmod 0400" in m and "LoadCredential=" in m
