"""``vmferry completion bash|zsh``: the scripts, and bash completing real command lines.

bash runs the generated script with ``vmferry`` replaced by a shell function
that records its arguments and prints two domain names, as ``vmferry list
--all --name`` would.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmferry.cli.commands import COMMANDS
from vmferry.cli.completion import Spec, bash_script, zsh_script
from vmferry.cli.main import main

BASH = shutil.which("bash")

FAKE_VMFERRY = """
vmferry() {
    echo "$@" >> "$CALLS"
    printf 'vm1\\nweb server\\n'
}
"""


def run_completion(argv: list[str], calls: str) -> tuple[list[str], list[str]]:
    """Run the shell *argv*: the words it printed, and the ``vmferry`` calls logged in *calls*."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    try:
        with open(calls) as f:
            made = f.read().splitlines()
    except FileNotFoundError:
        made = []
    return [w for w in done.stdout.splitlines() if w], made


def complete(line: str, tmp: str) -> tuple[list[str], list[str]]:
    """What bash completes at the end of *line*; and the ``vmferry`` calls it made."""
    assert BASH is not None
    calls = f"{tmp}/calls"
    script = (
        bash_script(COMMANDS)
        + FAKE_VMFERRY
        + f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; CALLS={calls!r}\n"
        + "_vmferry\n"
        + 'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    return run_completion([BASH, "--norc", "-c", script], calls)


def test_completion_command_prints_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0  # no daemon needed
    out = capsys.readouterr().out
    assert out == bash_script(COMMANDS)
    assert "complete -F _vmferry vmferry" in out
    assert main(["completion", "zsh"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#compdef vmferry") and "compdef _vmferry vmferry" in out
    assert "'domstate:show a domain'\\''s state'" in out  # described, quoted
    assert main(["completion", "fish"]) == 2


def test_specs_follow_the_command_table() -> None:
    specs = {c.name: Spec(c) for c in COMMANDS}
    assert specs["domstate"].positionals == ["domain"]
    assert {"--reason", "--json"} <= set(specs["domstate"].options)
    assert specs["migrate"].positionals == ["domain", "-"]
    assert ("--xml", "file") in specs["migrate"].values
    assert ("--dname", "-") in specs["migrate"].values  # a new name: nothing to offer
    assert ("--domain", "domain") in specs["event"].values
    assert specs["define"].positionals == ["file"]
    assert specs["pki client"].positionals == ["file", "file", "-"]  # its NAME is no domain
    assert specs["completion"].positionals == ["w:bash,zsh"]


@pytest.mark.skipif(BASH is None, reason="no bash")
def test_bash_completes_commands_options_and_domains(tmp_path: object) -> None:
    tmp = str(tmp_path)
    words, calls = complete("vmferry dom", tmp)
    dom = sorted(c.name for c in COMMANDS if c.name.startswith("dom"))
    assert sorted(words) == dom
    # every branch's commands are in the table the script is made from
    assert {"dominfo", "domjobinfo", "domstate", "domblklist", "domstats", "domiflist"} <= set(dom)
    assert complete("vmferry vol-up", tmp)[0] == ["vol-upload"]
    assert complete("vmferry metr", tmp)[0] == ["metrics"]
    assert complete("vmferry migrate --copy-storage-a", tmp)[0] == ["--copy-storage-all"]
    assert calls == []
    assert complete("vmferry --c", tmp)[0] == ["--connect"]
    assert complete("vmferry pki ", tmp)[0] == ["init", "client", "revoke"]
    assert complete("vmferry domstate --r", tmp)[0] == ["--reason"]
    assert complete("vmferry completion ", tmp)[0] == ["bash", "zsh"]

    # domain names, from the daemon named on the line (colons and all)
    words, calls = complete("vmferry -c unix:///run/v.sock domstate ", tmp)
    assert words == ["vm1", "web server"]
    assert calls == ["-c unix:///run/v.sock list --all --name"]
    assert complete("vmferry start w", tmp)[0] == ["web server"]
    # migrate NAME DESTURI: a domain first, then nothing to offer
    assert complete("vmferry migrate --live v", tmp)[0] == ["vm1"]
    assert complete("vmferry migrate --live --bandwidth 10 vm1 ", tmp)[0] == []
    assert complete("vmferry event --domain ", tmp)[0] == ["vm1", "web server"]
    # a file where a command takes one
    (tmp_path / "guest.xml").write_text("<domain/>")  # type: ignore[operator]
    assert complete(f"vmferry define {tmp}/gu", tmp)[0] == [f"{tmp}/guest.xml"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_script_parses() -> None:
    zsh = shutil.which("zsh")
    assert zsh is not None
    subprocess.run([zsh, "-n", "-c", zsh_script(COMMANDS)], check=True, timeout=60)


# zsh's completion builtins, stubbed to print what they would offer.
ZSH_STUBS = """
compdef() { : }
_describe() { local -a entries; entries=("${(@P)2}"); print -l -- ${entries%%:*} }
compadd() { if [[ $1 == -a ]]; then print -l -- "${(@P)2}"; else shift; print -l -- "$@"; fi }
_files() { print -- '<files>' }
vmferry() { print -r -- "$*" >> "$CALLS"; print 'vm1'; print 'web server' }
"""


def zsh_complete(line: str, tmp: str) -> tuple[list[str], list[str]]:
    """What the zsh script offers at the end of *line* (builtins stubbed); its vmferry calls."""
    zsh = shutil.which("zsh")
    assert zsh is not None
    calls = f"{tmp}/zcalls"
    words = line.split(" ")
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    script = (
        zsh_script(COMMANDS)
        + ZSH_STUBS
        + f"CALLS={calls!r}\nwords=({quoted}); CURRENT={len(words)}\n_vmferry\n"
    )
    return run_completion([zsh, "-f", "-c", script], calls)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_completes_commands_options_and_domains(tmp_path: object) -> None:
    tmp = str(tmp_path)
    words, calls = zsh_complete("vmferry ", tmp)
    assert {"list", "domstate", "migrate", "pki", "completion"} <= set(words)
    assert calls == []
    assert zsh_complete("vmferry pki ", tmp)[0] == ["init", "client", "revoke"]
    assert "--reason" in zsh_complete("vmferry domstate --", tmp)[0]
    words, calls = zsh_complete("vmferry -c unix:///run/v.sock domstate ", tmp)
    assert words == ["vm1", "web server"]
    assert calls == ["-c unix:///run/v.sock list --all --name"]
    assert zsh_complete("vmferry migrate --live vm1 ", tmp)[0] == []
    assert zsh_complete("vmferry migrate --xml ", tmp)[0] == ["<files>"]
    assert zsh_complete("vmferry completion ", tmp)[0] == ["bash", "zsh"]
