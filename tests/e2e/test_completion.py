"""Shell completion: `syncd completion SHELL` prints a script, and `syncd` answers the
completion protocol that script speaks with its commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import SYNCD, run_syncd

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("shell, needle", [
    ("bash", "complete -o default -F _syncd_completion syncd"),
    ("zsh", "compdef _syncd_completion syncd"),
    ("fish", "complete --command syncd"),
])
def test_script_is_printed(shell: str, needle: str) -> None:
    r = run_syncd("completion", shell)
    assert r.code == 0, r.err
    assert needle in r.out
    assert f"_SYNCD_COMPLETE=complete_{shell}" in r.out


def test_unknown_shell_is_a_usage_error() -> None:
    r = run_syncd("completion", "tcsh")
    assert r.code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in r.err
    assert "Traceback" not in r.err


def _complete(shell: str, words: str) -> list[str]:
    env = {"_SYNCD_COMPLETE": f"complete_{shell}"}
    if shell == "bash":
        env.update(COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - (not words.endswith(" "))))
    else:
        env["_TYPER_COMPLETE_ARGS"] = words
        if shell == "fish":
            env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    r = run_syncd(env=env)
    assert r.code == 0, r.err
    return r.out.splitlines()


def test_protocol_answers_each_shell() -> None:
    assert _complete("bash", "syncd con") == ["config"]
    assert _complete("bash", "syncd config ") == ["check", "init", "example"]
    assert "--dry-run" in _complete("bash", "syncd reconcile --dr")
    assert [ln.split("\t")[0] for ln in _complete("fish", "syncd config ")] == \
        ["check", "init", "example"]
    assert '"init":' in "".join(_complete("zsh", "syncd config "))


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_through_the_printed_script(tmp_path: Path) -> None:
    script = tmp_path / "syncd.bash"
    script.write_text(run_syncd("completion", "bash").out)
    # What bash does on TAB after "syncd comp": fill COMP_WORDS/COMP_CWORD, call the function.
    probe = (f"source {script}; COMP_WORDS=(syncd comp); COMP_CWORD=1; "
             "_syncd_completion syncd; printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env["PATH"] = f"{SYNCD.parent}{os.pathsep}{env.get('PATH', '')}"
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["completion"]
