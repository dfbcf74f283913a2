"""Uploads cut off by a lost SFTP connection leave no temp files once the connection is
back: the next session removes them, within the same run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.errors import ConnectionLost
from syncd.model import TMP_PREFIX
from syncd.remotes.base import Source
from syncd.remotes.sftp import SFTPOptions, SFTPRemote
from tests.servers import SSHServer

SIZE = 8 << 20   # enough that the cut lands mid-stream, small enough to be quick


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[SSHServer]:
    s = SSHServer(tmp_path / "sshd").start()
    try:
        yield s
    finally:
        s.stop()


class CuttingSource(Source):
    """A Source that runs `cut()` once, after its first read (the temp is open by then)."""

    def __init__(self, abspath: str, rel: str, cut: object):
        super().__init__(abspath, rel)
        self.cut = cut

    def read(self, size: int = 1 << 20) -> bytes:
        b = super().read(size)
        if self.cut is not None:
            cut, self.cut = self.cut, None
            cut()  # type: ignore[operator]
        return b


def temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(TMP_PREFIX))


@pytest.mark.parametrize("how", ["session-killed", "transport-closed"])
def test_temps_of_uploads_cut_by_a_lost_connection_are_removed_on_reconnect(
        srv: SSHServer, tmp_path: Path, how: str) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    names = [f"d/f{i}.bin" for i in range(3)]
    for n in names:
        (src / n.replace("/", "_")).write_bytes(os.urandom(SIZE))
    r = SFTPRemote("box", SFTPOptions(host=srv.host, port=srv.port, user=srv.user,
                                      root=str(root), key_file=str(srv.client_key),
                                      known_hosts=str(srv.known_hosts), use_agent=False,
                                      timeout=5.0))
    r.tmp_owner = "t0"
    try:
        r.check()

        def cut() -> None:
            if how == "session-killed":
                srv.kill_sessions()   # the server side of the connection dies
            else:
                r._transport.close()  # ours does

        sources = [CuttingSource(str(src / n.replace("/", "_")), n,
                                 cut if i == 2 else None) for i, n in enumerate(names)]
        try:
            results = r.put_many(list(zip(names, sources, strict=True)))
        finally:
            for s in sources:
                s.close()
        assert all(isinstance(x, ConnectionLost) for x in results), results
        assert temps(root / "d"), "the cut left no temp: the test did not cut mid-upload"

        # The retries (as the queue runs them) reconnect, publish, and remove the temps. A
        # first one may still meet the dead connection before paramiko has seen it go.
        for n in names:
            for attempt in range(3):
                with Source(str(src / n.replace("/", "_")), n) as s:
                    try:
                        assert r.put(n, s).size == SIZE
                        break
                    except ConnectionLost:
                        if attempt == 2:
                            raise
        assert temps(root / "d") == []
        assert sorted(os.listdir(root / "d")) == ["f0.bin", "f1.bin", "f2.bin"]
    finally:
        r.close()
