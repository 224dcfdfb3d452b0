"""``python -m evaluation <command>``: a small dispatch table of evaluation commands."""
from __future__ import annotations

import argparse
import sys
import tempfile


def _build_zoo(args: argparse.Namespace) -> int:
    from .zoo import DEFAULT_OUT, FULL, TINY, build_zoo

    if args.tiny:
        out = args.out or tempfile.mkdtemp(prefix="tinyzoo-")
        build_zoo(out, TINY, write_readme=True)
    else:
        build_zoo(args.out or DEFAULT_OUT, FULL, reuse_base=args.reuse_base)
    return 0


def _add_build_zoo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default assets/zoo; a temp folder with --tiny)")
    p.add_argument("--tiny", action="store_true", help="the whole recipe, a few steps on a tiny model (smoke test)")
    p.add_argument("--reuse-base", action="store_true", help="keep an existing base (development only)")


# name -> (help, add_arguments, run). Add commands here.
COMMANDS = {
    "build-zoo": ("rebuild the built-in model zoo deterministically", _add_build_zoo, _build_zoo),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
