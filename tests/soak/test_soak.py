"""The crash soak, short: 10 SIGKILLs of `syncd run` mid-upload (and mid chmod/touch), local
and SFTP remotes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import SSHServer
from tests.soak.soak_daemon import soak

pytestmark = pytest.mark.e2e


def test_soak_local(tmp_path: Path) -> None:
    rep = soak(tmp_path, kills=10, remote="local", seed=7)
    assert rep.kills == 10 and rep.versions_written > 50 and rep.remote_reads_checked > 100
    assert rep.attr_changes > 10 and rep.attrs_jobs > 0
    assert rep.ok, rep


def test_soak_sftp(tmp_path: Path, sshd: SSHServer) -> None:
    rep = soak(tmp_path, kills=10, remote="sftp", seed=8, sshd=sshd)
    assert rep.kills == 10 and rep.versions_written > 50 and rep.remote_reads_checked > 100
    assert rep.attr_changes > 10 and rep.attrs_jobs > 0
    assert rep.ok, rep
