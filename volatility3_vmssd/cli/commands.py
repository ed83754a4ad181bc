"""How a subcommand's parser is declared, and the arguments several commands share, written once.

Every command module's ``register`` calls :func:`add_command`; the evidence argument (``file`` and
``--vsv``), the output pair (``-o`` and ``--force``), ``-q`` and ``--json`` say the same thing in every
command that takes them, so their help texts live here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

SAVED_STATE = "the saved state: .vmrs, .bin (+ .vsv) or .vsv (+ .bin)"
VSV_HELP = "the .vsv of a legacy .bin, when it is not beside it with the same name"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions wrapped to the terminal; epilogs (the examples) kept line by line.

    argparse fills description and epilog through the same ``_fill_text``; a text with line breaks
    is an epilog written line by line (one example per line), a text without is a paragraph.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)  # raw: as written
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def add_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
    examples: Sequence[str],
    footer: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its examples (one per line) and any ``footer`` lines."""
    epilog = "\n".join(["examples:", *(f"  {example}" for example in examples), *footer])
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter
    )
    parser.set_defaults(func=run)
    return parser


def add_saved_state(parser: argparse.ArgumentParser, help: str = SAVED_STATE) -> None:
    """The evidence: a file (or URL) and the ``--vsv`` of a legacy ``.bin`` kept under another name."""
    parser.add_argument("file", help=help)
    parser.add_argument("--vsv", help=VSV_HELP)


def add_output(
    parser: argparse.ArgumentParser, help: str, *, required: bool = True, force: str = "overwrite OUT if it exists"
) -> None:
    """``-o OUT`` and ``--force``: an existing OUT is refused unless ``--force`` is given."""
    parser.add_argument("-o", "--output", required=required, metavar="OUT", help=help)
    parser.add_argument("--force", action="store_true", help=force)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")


def add_json(parser: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    parser.add_argument("--json", action="store_true", help=help)
