"""The `prefix-kernels` command line: `prefix-kernels demo [options]` runs `prefix_kernels.apps.demo`."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "P-Tuning v2 sentiment classification on all-MiniLM-L6-v2 / Rotten Tomatoes (see --help)"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: prefix-kernels COMMAND [options]\n\ncommands:")
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
