"""`moechat <command>`: the user-facing commands that are not pipeline stages.

Each command lives in its own module and owns its argument parsing; this file only dispatches, so
`moechat --help` stays a table of contents.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": ("moechat.cli.plan", "estimate peak GPU memory of a training config, suggest a micro-batch"),
    "chat": ("moechat.cli.chat", "chat with an exported or quantized model (interactive or --prompt)"),
    "demo": ("moechat.cli.demo", "run the whole DAG offline on the bundled fixture with the tiny preset"),
}


def usage() -> str:
    lines = ["usage: moechat [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `moechat <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a command is required: usage on stderr and a failing status, as argparse does
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from moechat import __version__

        print(f"moechat {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moechat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
