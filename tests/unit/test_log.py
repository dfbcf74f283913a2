"""Log output: one JSON object per line, libraries' records included."""

from __future__ import annotations

import json
import logging

import pytest

from syncd import log


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
    log.setup("json", "info")


def test_library_records_never_break_the_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    # paramiko logs "Socket exception: ..." at ERROR on a dropped connection: it reached
    # stderr as plain text through logging's last-resort handler, between JSON lines.
    log.setup("json", "info")
    logging.getLogger("paramiko.transport").error("Socket exception: Connection reset (104)")
    log.get().info("after", pair="p")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["after"]

    log.setup("json", "debug")
    logging.getLogger("paramiko.transport").error("Socket exception: Connection reset (104)")
    logging.getLogger("paramiko.transport").debug("every packet")   # too chatty: not kept
    # botocore's signing records hold the session token: never forwarded
    logging.getLogger("botocore.auth").debug("CanonicalRequest: x-amz-security-token:SECRET")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["event"], e["logger"], e["message"]) for e in events] == [
        ("library_log", "paramiko.transport", "Socket exception: Connection reset (104)")]
