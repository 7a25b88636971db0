"""``vmferry completion bash|zsh``: a shell completion script made from the command table.

The script completes command names, each command's options, and domain
names where a command takes one (``vmferry list --all --name``, asked of
the daemon named by ``-c`` on the command line or ``$VMFERRY_URI``), file
names where it takes a file.  Install: docs/cli.md, "Shell completion".
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from vmferry.cli.context import Arg, Command, Context, arg

#: Metavars whose values are domain names, and file names.
_DOMAIN_METAVARS = {"NAME", "DOMAIN"}
_FILE_METAVARS = {"FILE", "DIR", "OUT", "CERT", "NAME|FILE"}
#: Options naming a domain that does not exist yet.
_NEW_NAMES = {"--dname"}
#: Actions that take no value.
_FLAG_ACTIONS = {"store_true", "store_false", "count", "help", "version"}
GLOBAL_OPTS = ("-h", "--help", "-c", "--connect", "--pki-dir", "--version")


def _kind(a: Arg, connect: bool) -> str:
    """What a value of *a* is: ``domain``, ``file``, ``w:a,b`` (choices) or ``-`` (anything)."""
    choices = a.options.get("choices")
    if choices:
        return "w:" + ",".join(str(c) for c in choices)
    metavar = str(a.options.get("metavar", ""))
    existing = connect and a.flags[0] not in _NEW_NAMES  # a domain of the daemon's
    if existing and (a.flags[0] in ("name", "--domain") or metavar in _DOMAIN_METAVARS):
        return "domain"
    if metavar in _FILE_METAVARS or a.flags[0] in ("file", "dir", "out", "cert"):
        return "file"
    return "-"


class Spec:
    """What completes after one command: its options, positionals and option values."""

    def __init__(self, command: Command) -> None:
        self.name = command.name
        self.options: list[str] = ["-h", "--help"]
        self.positionals: list[str] = []
        self.values: list[tuple[str, str]] = []  # (option, kind) of options that take a value
        for a in command.args:
            if not a.flags[0].startswith("-"):
                nargs = a.options.get("nargs")
                self.positionals.append(
                    _kind(a, command.connect) + ("*" if nargs in ("*", "+") else "")
                )
                continue
            self.options += a.flags
            if a.options.get("action") not in _FLAG_ACTIONS:
                self.values += [(flag, _kind(a, command.connect)) for flag in a.flags]
        if command.json:
            self.options.append("--json")


def _top_words(commands: Iterable[Command]) -> list[str]:
    return list(dict.fromkeys(c.name.split()[0] for c in commands))


def _groups(commands: Iterable[Command]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for c in commands:
        if " " in c.name:
            group, leaf = c.name.split()
            groups.setdefault(group, []).append(leaf)
    return groups


def _sh(text: str) -> str:
    """*text* single-quoted for the shell."""
    return "'" + text.replace("'", "'\\''") + "'"


def _spec_cases(commands: Iterable[Command], indent: str) -> str:
    lines = []
    for c in commands:
        s = Spec(c)
        values = " ".join(f"{o}={k}" for o, k in s.values)
        lines.append(
            f"{indent}{_sh(s.name)}) opts={_sh(' '.join(s.options))}; "
            f"pos={_sh(' '.join(s.positionals))}; vals={_sh(values)};;"
        )
    return "\n".join(lines)


def _spec_function(commands: tuple[Command, ...]) -> str:
    """``_vmferry_spec NAME``: sets a command's options, positionals and values (both shells)."""
    return f"""\
_vmferry_spec() {{
    opts=''; pos=''; vals=''
    case "$1" in
{_spec_cases(commands, "        ")}
    esac
}}"""


def bash_script(commands: tuple[Command, ...]) -> str:
    """The bash completion script (``complete -F _vmferry vmferry``)."""
    groups = _groups(commands)
    group_cases = "\n".join(
        f"        {_sh(g)}) echo {_sh(' '.join(leaves))};;" for g, leaves in groups.items()
    )
    return f"""\
# bash completion for vmferry, made by `vmferry completion bash`.
# Install: vmferry completion bash > ~/.local/share/bash-completion/completions/vmferry
# (or `eval "$(vmferry completion bash)"` in ~/.bashrc).

{_spec_function(commands)}

_vmferry_group() {{
    case "$1" in
{group_cases}
    esac
}}

_vmferry_complete_kind() {{
    local kind=$1 cur=$2 IFS=$'\\n'
    case "$kind" in
        domain*) COMPREPLY=($(compgen -W "$(vmferry "${{_vmferry_conn[@]}}" list --all --name \\
                     2>/dev/null)" -- "$cur"));;
        file*) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"));;
        w:*) local w=${{kind#w:}}; COMPREPLY=($(compgen -W "${{w//,/$'\\n'}}" -- "$cur"));;
    esac
}}

_vmferry() {{
    # Words from the line itself: COMP_WORDS splits unix:///x.sock at the colons.
    local line=${{COMP_LINE:0:COMP_POINT}} words
    read -ra words <<< "$line"
    [[ -z $line || $line == *[[:space:]] ]] && words+=("")
    local cword=$((${{#words[@]}} - 1)) cur=${{words[-1]}} prev=""
    ((cword > 0)) && prev=${{words[cword-1]}}
    local i w cmd="" next=0 opts pos vals
    _vmferry_conn=()
    COMPREPLY=()
    # The global options, then the command's words ("pki init" is two).
    for ((i = 1; i < cword; i++)); do
        w=${{words[i]}}
        case "$w" in
            -c|--connect) _vmferry_conn+=(-c "${{words[i+1]}}"); ((i++)); continue;;
            --pki-dir) _vmferry_conn+=(--pki-dir "${{words[i+1]}}"); ((i++)); continue;;
            -*) continue;;
        esac
        if [[ -n $(_vmferry_group "$w") ]]; then
            ((i + 1 < cword)) && {{ cmd="$w ${{words[i+1]}}"; next=$((i + 2)); }}
            [[ -z $cmd ]] && cmd=$w
        else
            cmd=$w; next=$((i + 1))
        fi
        break
    done
    if ((next == 0)); then
        case "$prev" in
            -c|--connect) return;;
            --pki-dir) _vmferry_complete_kind file "$cur"; return;;
        esac
        if [[ -n $cmd ]]; then
            COMPREPLY=($(compgen -W "$(_vmferry_group "$cmd")" -- "$cur"))
        elif [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W {_sh(" ".join(GLOBAL_OPTS))} -- "$cur"))
        else
            COMPREPLY=($(compgen -W {_sh(" ".join(_top_words(commands)))} -- "$cur"))
        fi
        return
    fi
    _vmferry_spec "$cmd"
    # The value of an option?
    local v
    for v in $vals; do
        if [[ $prev == "${{v%%=*}}" ]]; then
            _vmferry_complete_kind "${{v#*=}}" "$cur"
            return
        fi
    done
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    # Which positional argument this is: count those before, skipping options' values.
    local n=0 takes
    for ((i = next; i < cword; i++)); do
        w=${{words[i]}}
        if [[ $w == -* ]]; then
            for v in $vals; do [[ $w == "${{v%%=*}}" ]] && ((i++)) && break; done
        else
            ((n++))
        fi
    done
    local -a kinds=($pos)
    ((${{#kinds[@]}} == 0)) && return
    local kind=${{kinds[n]:-}}
    [[ -z $kind && ${{kinds[-1]}} == *'*' ]] && kind=${{kinds[-1]}}
    [[ -n $kind ]] && _vmferry_complete_kind "$kind" "$cur"
}}

complete -F _vmferry vmferry
"""


def zsh_script(commands: tuple[Command, ...]) -> str:
    """The zsh completion script (``compdef _vmferry vmferry``), with command descriptions."""
    groups = _groups(commands)
    top: list[str] = []
    for word in _top_words(commands):
        helps = [c.help for c in commands if c.name == word]
        top.append(_sh(f"{word}:{helps[0] if helps else 'subcommands'}"))
    described = "\n".join(f"        {t}" for t in top)
    group_cases = "\n".join(
        "        "
        + _sh(g)
        + ") subs=("
        + " ".join(
            _sh(f"{leaf}:" + next(c.help for c in commands if c.name == f"{g} {leaf}"))
            for leaf in leaves
        )
        + ");;"
        for g, leaves in groups.items()
    )
    return f"""\
#compdef vmferry
# zsh completion for vmferry, made by `vmferry completion zsh`.
# Install: vmferry completion zsh > "${{fpath[1]}}/_vmferry" (then restart zsh),
# or `source <(vmferry completion zsh)` in ~/.zshrc after compinit.

{_spec_function(commands)}

_vmferry_kind() {{
    local kind=$1
    case "$kind" in
        domain*) local -a doms; doms=(${{(f)"$(vmferry $conn list --all --name 2>/dev/null)"}})
                 compadd -a doms;;
        file*) _files;;
        w:*) compadd -- ${{(s:,:)kind#w:}};;
    esac
}}

_vmferry() {{
    local -a top subs conn kinds
    top=(
{described}
    )
    local i w cmd="" next=0 opts pos vals v n kind
    for ((i = 2; i < CURRENT; i++)); do
        w=${{words[i]}}
        case "$w" in
            -c|--connect) conn+=(-c "${{words[i+1]}}"); ((i++)); continue;;
            --pki-dir) conn+=(--pki-dir "${{words[i+1]}}"); ((i++)); continue;;
            -*) continue;;
        esac
        subs=()
        case "$w" in
{group_cases}
        esac
        if (( ${{#subs}} )); then
            cmd=$w
            if ((i + 1 < CURRENT)); then cmd="$w ${{words[i+1]}}"; next=$((i + 2)); fi
        else
            cmd=$w; next=$((i + 1))
        fi
        break
    done
    if ((next == 0)); then
        case "${{words[CURRENT-1]}}" in
            -c|--connect) return;;
            --pki-dir) _files; return;;
        esac
        if [[ -n $cmd ]]; then
            _describe subcommand subs
        elif [[ ${{words[CURRENT]}} == -* ]]; then
            compadd -- {" ".join(GLOBAL_OPTS)}
        else
            _describe command top
        fi
        return
    fi
    _vmferry_spec "$cmd"
    for v in ${{=vals}}; do
        if [[ ${{words[CURRENT-1]}} == "${{v%%=*}}" ]]; then
            _vmferry_kind "${{v#*=}}"
            return
        fi
    done
    if [[ ${{words[CURRENT]}} == -* ]]; then
        compadd -- ${{=opts}}
        return
    fi
    n=0
    for ((i = next; i < CURRENT; i++)); do
        w=${{words[i]}}
        if [[ $w == -* ]]; then
            for v in ${{=vals}}; do [[ $w == "${{v%%=*}}" ]] && ((i++)) && break; done
        else
            ((n++))
        fi
    done
    kinds=(${{=pos}})
    (( ${{#kinds}} )) || return
    kind=${{kinds[n+1]}}
    [[ -z $kind && ${{kinds[-1]}} == *'*' ]] && kind=${{kinds[-1]}}
    [[ -n $kind ]] && _vmferry_kind "$kind"
}}

compdef _vmferry vmferry
"""


def cmd_completion(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli.commands import COMMANDS  # the full table, this command included

    ctx.out(bash_script(COMMANDS) if args.shell == "bash" else zsh_script(COMMANDS), end="")


COMMANDS: tuple[Command, ...] = (
    Command(
        "completion",
        "print a shell completion script (docs/cli.md: how to install it)",
        cmd_completion,
        (arg("shell", choices=("bash", "zsh"), help="bash or zsh"),),
        connect=False,
    ),
)
