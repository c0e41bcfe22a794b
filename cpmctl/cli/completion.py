"""`cpmctl completion SHELL`: static completion scripts for bash, zsh and fish.

The scripts are plain shell code generated from the CLI's own command tree: every command,
option, choice and help line is written into the script. Pressing Tab never starts Python
(click's dynamic completion runs the whole CLI on every key press), so completion is instant,
and the scripts can ship as files: completions/ holds them, scripts/update_completions.py
refreshes them, and tests/test_completion.py fails when they are stale.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import typer

from cpmctl.errors import CpmError

# The file name each shell looks for (zsh finds `_cpmctl` on its fpath).
FILE_NAMES = {"bash": "cpmctl.bash", "zsh": "_cpmctl", "fish": "cpmctl.fish"}

# A click command tree. Recent typer releases build it from their own bundled copy of click's
# classes (click itself may be absent), so this module relies only on what both copies share.
Command = Any


@dataclass(frozen=True)
class Param:
    """An option (names: "--output", "-o") or an argument (names: its one name)."""

    names: tuple[str, ...]
    help: str
    takes_value: bool
    choices: tuple[str, ...] = ()
    path: bool = False
    many: bool = False


@dataclass(frozen=True)
class Node:
    path: tuple[str, ...]  # () for cpmctl itself, ("data", "build") for `cpmctl data build`
    help: str
    options: tuple[Param, ...]
    arguments: tuple[Param, ...]
    children: tuple[Node, ...]


def _oneline(text: str | None) -> str:
    return " ".join((text or "").split())


def _value_kind(param: Any) -> tuple[tuple[str, ...], bool]:
    """(choices, is a path) of a parameter, from typer's type descriptor or click's type."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        choices, path = desc.choices or (), desc.is_path or desc.is_file
    else:  # click.Choice has .choices; click.Path and click.File name files
        choices = getattr(param.type, "choices", None) or ()
        path = type(param.type).__name__ in ("Path", "File")
    return tuple(str(getattr(c, "value", c)) for c in choices), bool(path)


def _names(opts: list[str]) -> tuple[str, ...]:
    # Long names first; sorted, since click keeps the help option's names in a set.
    return tuple(sorted(opts, key=lambda name: (not name.startswith("--"), name)))


def _walk(cmd: Command, name: str, path: tuple[str, ...], parent: Any = None) -> Node:
    ctx = cmd.context_class(cmd, info_name=name, parent=parent, **cmd.context_settings)
    options, arguments = [], []
    for p in cmd.get_params(ctx):  # with the help option, whose names come from the context
        if getattr(p, "hidden", False):
            continue
        choices, is_path = _value_kind(p)
        if p.param_type_name == "argument":
            many = p.nargs < 0
            arguments.append(Param((p.name,), _oneline(p.help), True, choices, is_path, many))
            continue
        takes = not (p.is_flag or p.count)
        options.append(Param(_names(p.opts), _oneline(p.help), takes, choices, is_path, p.multiple))
        if p.secondary_opts:  # --keep-rejected/--no-keep-rejected
            options.append(Param(_names(p.secondary_opts), f"Turn off {p.opts[0]}.", False))
    commands = getattr(cmd, "commands", {})
    children = tuple(_walk(commands[n], n, (*path, n), ctx)
                     for n in sorted(commands) if not commands[n].hidden)
    help_text = _oneline(cmd.get_short_help_str(limit=1000))
    return Node(path, help_text, tuple(options), tuple(arguments), children)


def _nodes(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from _nodes(child)


_BASH = r"""_cpmctl_node() {  # sets subs, opts and takes (options that need a value) for path $1
    case "$1" in
@NODES@
    esac
}

_cpmctl_choices() {  # sets choices for "path|option"
    case "$1" in
@CHOICES@
    esac
}

_cpmctl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local path="" word subs opts takes choices i
    for ((i = 1; i < COMP_CWORD; i++)); do  # the subcommand path before the cursor
        word="${COMP_WORDS[i]}"
        _cpmctl_node "$path"
        if [[ " $takes " == *" $word "* ]]; then
            ((i++))  # skip the option's value; bash splits --opt=value at the '='
            [[ ${COMP_WORDS[i]} == "=" ]] && ((i++))
        elif [[ $word != -* && " $subs " == *" $word "* ]]; then
            path="${path:+$path }$word"
        fi
    done
    _cpmctl_node "$path"
    [[ $prev == "=" ]] && prev="${COMP_WORDS[COMP_CWORD-2]}"
    [[ $cur == "=" ]] && cur=""
    if [[ " $takes " == *" $prev "* ]]; then
        _cpmctl_choices "$path|$prev"
        COMPREPLY=($(compgen -W "$choices" -- "$cur"))
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$subs" -- "$cur"))
    fi
}

complete -F _cpmctl -o default cpmctl  # nothing offered: complete file names
"""


def _bash(root: Node) -> str:
    q = shlex.quote
    nodes, choices = [], []
    for node in _nodes(root):
        key = " ".join(node.path)
        subs = " ".join(child.path[-1] for child in node.children)
        opts = " ".join(name for o in node.options for name in o.names)
        takes = " ".join(name for o in node.options if o.takes_value for name in o.names)
        nodes.append(f"        {q(key)}) subs={q(subs)} opts={q(opts)} takes={q(takes)} ;;")
        choices += [f"        {q(key + '|' + name)}) choices={q(' '.join(o.choices))} ;;"
                    for o in node.options if o.choices for name in o.names]
    nodes.append("        *) subs='' opts='' takes='' ;;")
    choices.append("        *) choices='' ;;")
    return _BASH.replace("@NODES@", "\n".join(nodes)).replace("@CHOICES@", "\n".join(choices))


_ZSH_GROUP = """    case $state in
        command)
            local -a commands=(
@COMMANDS@
            )
            _describe -t commands @TITLE@ commands ;;
        args)
            case $words[1] in
@CALLS@
            esac ;;
    esac
"""


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_escape(text: str) -> str:
    """Backslash what would end a description or a field of an _arguments spec."""
    for char in "\\[]:":
        text = text.replace(char, "\\" + char)
    return text


def _zsh_action(param: Param, fallback: str) -> str:
    if param.choices:
        return "(" + " ".join(_zsh_escape(c).replace(" ", "\\ ") for c in param.choices) + ")"
    return "_files" if param.path else fallback


def _zsh_function(node: Node) -> str:
    name = "_cpmctl" + "".join("__" + part.replace("-", "_") for part in node.path)
    specs = []
    for o in node.options:
        desc = f"[{_zsh_escape(o.help)}]" if o.help else ""
        value = f":{o.names[0].lstrip('-')}:{_zsh_action(o, ' ')}" if o.takes_value else ""
        group = "*" if o.many else f"({' '.join(o.names)})" if len(o.names) > 1 else ""
        specs += [f"{group}{option}{desc}{value}" for option in o.names]
    specs += [f"{'*' if a.many else ''}:{a.names[0]}:{_zsh_action(a, '_default')}"
              for a in node.arguments]
    if not node.children:
        return f"{name}() {{\n    _arguments \\\n        " + " \\\n        ".join(
            _zsh_quote(spec) for spec in specs) + "\n}\n"
    specs += [": :->command", "*:: :->args"]
    commands = [f"                {_zsh_quote(c.path[-1] + ':' + c.help)}" for c in node.children]
    calls = [f"                {c.path[-1]}) {name}__{c.path[-1].replace('-', '_')} ;;"
             for c in node.children]
    group = (_ZSH_GROUP.replace("@COMMANDS@", "\n".join(commands))
             .replace("@TITLE@", _zsh_quote(" ".join(("cpmctl", *node.path, "command"))))
             .replace("@CALLS@", "\n".join(calls)))
    return (f'{name}() {{\n    local curcontext="$curcontext" state line\n    _arguments -C \\\n'
            + " \\\n".join(f"        {_zsh_quote(spec)}" for spec in specs) + f"\n{group}}}\n")


def _zsh(root: Node) -> str:
    return "\n".join(_zsh_function(node) for node in _nodes(root)) + (
        "\nif [[ $zsh_eval_context[-1] == loadautofunc ]]; then  # autoloaded from the fpath\n"
        '    _cpmctl "$@"\nelse  # sourced\n    compdef _cpmctl cpmctl\nfi\n')


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_lines(chain: tuple[Node, ...]) -> Iterator[str]:
    """Lines for the last node of `chain` (the root first) and for everything below it."""
    node = chain[-1]
    # __fish_seen_subcommand_from ignores word order and depth, so each level of the path also
    # rules out its siblings (but not names the path itself uses, as in `cpmctl bench data`).
    here = []
    for parent, step in pairwise(chain):
        here.append(f"__fish_seen_subcommand_from {step.path[-1]}")
        others = " ".join(c.path[-1] for c in parent.children if c.path[-1] not in node.path)
        here += [f"not __fish_seen_subcommand_from {others}"] if others else []
    if node.path and node.children:
        here.append("not __fish_seen_subcommand_from "
                    + " ".join(c.path[-1] for c in node.children))
    start = f"complete -c cpmctl -n {_fish_quote('; and '.join(here or ['__fish_use_subcommand']))}"
    for child in node.children:
        yield f"{start} -f -a {_fish_quote(child.path[-1])} -d {_fish_quote(child.help)}"
    for o in node.options:
        flags = " ".join(f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}" if len(n) == 2
                         else f"-o {n[1:]}" for n in o.names)
        if o.choices:
            flags += " -x -a " + _fish_quote(" ".join(o.choices))
        elif o.takes_value:
            flags += " -r -F" if o.path else " -x"
        yield f"{start} {flags} -d {_fish_quote(o.help)}"
    for child in node.children:
        yield from _fish_lines((*chain, child))


def _fish(root: Node) -> str:
    return "\n".join(_fish_lines((root,))) + "\n"


def render(shell: str, root: Command) -> str:
    """The completion script for `shell` ("bash", "zsh" or "fish") of the command tree `root`.

    The text depends on nothing but the tree (subcommands sorted, options in declaration
    order), so an unchanged CLI gives byte-identical scripts.
    """
    renderers = {"bash": _bash, "zsh": _zsh, "fish": _fish}
    if shell not in renderers:
        raise CpmError(f"unknown shell {shell!r}; choose bash, zsh or fish")
    header = f"# Generated by `cpmctl completion {shell}`; do not edit by hand.\n\n"
    if shell == "zsh":
        header = "#compdef cpmctl\n" + header
    return header + renderers[shell](_walk(root, "cpmctl", ()))


def completion(
    shell: str = typer.Argument(..., help="The shell to complete for: bash, zsh or fish."),
) -> None:
    """Print a static tab-completion script for bash, zsh or fish.

    Example: source <(cpmctl completion bash)
    """
    from cpmctl.cli import app  # not at the top: cpmctl.cli imports this module

    print(render(shell, typer.main.get_command(app)), end="")
