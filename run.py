"""Entry point for `make run`. The web app comes later; for now, point at the CLI."""

import sys


def main() -> int:
    print(
        "SAE Studio: the web app is not there yet. Use the command line:\n"
        "  .venv/bin/sae-studio --help\n"
        "  .venv/bin/python -m worker --help"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
