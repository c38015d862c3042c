"""``corepipe completion bash`` (hidden): a bash completion script made from the command line's own parser.

install.sh writes its output to the bash-completion directory, so the completion lists the commands, options and
choices of the version installed, and a new option needs no second list kept by hand.
"""

from __future__ import annotations

import argparse
import re

SHELLS = ("bash",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=SHELLS)


def run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(bash(parser), end="")
    return 0


def _parsers(parser: argparse.ArgumentParser, path: str = "") -> list:
    """(path, parser) for the parser and every visible subcommand below it ("", "list", "config check")."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the subcommands that --help lists
                found += _parsers(action.choices[choice.dest], f"{path} {choice.dest}".strip())
    return found


def _value_kind(action: argparse.Action) -> str:
    """How an option's value completes: from its choices, as a file, a directory, or not at all."""
    if action.choices is not None:
        return "w " + " ".join(str(c) for c in action.choices)
    name = f"{action.metavar or ''} {action.dest}".upper()
    if re.search(r"\bDIR\b|_DIR\b", name):
        return "d"
    if re.search(r"PATH|FILE|CONFIG", name):
        return "f"
    return "n"


def bash(parser: argparse.ArgumentParser) -> str:
    """The script: three lookups (an option's value, a subcommand, the words at a place) and the function that
    walks the words typed so far with them."""
    values, subcommands, words = [], [], []
    for path, sub in _parsers(parser):
        here = []
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    here.append(choice.dest)
                    subcommands.append(f'        "{path}|{choice.dest}") echo "{f"{path} {choice.dest}".strip()}" ;;')
            elif action.option_strings:
                here += action.option_strings
                if action.nargs != 0:
                    kind = _value_kind(action)
                    for option in action.option_strings:
                        values.append(f'        "{path}|{option}") echo "{kind}" ;;')
            elif action.choices is not None:
                here += [str(c) for c in action.choices]
        words.append(f'        "{path}") echo "{" ".join(here)}" ;;')
    return _TEMPLATE.format(values="\n".join(values), subcommands="\n".join(subcommands), words="\n".join(words))


_TEMPLATE = """\
# bash completion for corepipe: made by 'corepipe completion bash' from its own parser (install.sh writes it)
_corepipe_value() {{  # how the value of option $2 of command "$1" completes; fails if it takes none
    case "$1|$2" in
{values}
        *) return 1 ;;
    esac
}}
_corepipe_sub() {{  # the command path after word $2 at command "$1"; fails if it is no subcommand
    case "$1|$2" in
{subcommands}
        *) return 1 ;;
    esac
}}
_corepipe_words() {{  # the options and subcommands of command "$1"
    case "$1" in
{words}
    esac
}}
_corepipe() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" i kind next
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        if kind="$(_corepipe_value "$path" "${{COMP_WORDS[i]}}")"; then
            if ((i + 1 == COMP_CWORD)); then
                case "$kind" in
                    f) mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
                    d) mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
                    w\\ *) mapfile -t COMPREPLY < <(compgen -W "${{kind#w }}" -- "$cur") ;;
                esac
                return 0
            fi
            ((i++))
        elif next="$(_corepipe_sub "$path" "${{COMP_WORDS[i]}}")"; then
            path="$next"
        fi
    done
    mapfile -t COMPREPLY < <(compgen -W "$(_corepipe_words "$path")" -- "$cur")
}}
complete -F _corepipe corepipe
"""
