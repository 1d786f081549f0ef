"""Make and hash API keys.

    python -m serve_app.api.keys new --name alice
        prints a fresh key (once: it is stored nowhere) and the entry for the keys file.
    python -m serve_app.api.keys hash --name alice < key.txt
        reads a key from stdin (prompts without echo on a terminal) and prints its entry.

Data goes to stdout (`new`: the key on the first line, the entry on the second; `hash`: the
entry), explanations to stderr.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from .auth import MIN_KEY_LENGTH, generate_key, hash_key, valid_name


def _name(value: str) -> str:
    if not valid_name(value):
        raise argparse.ArgumentTypeError(
            "a key name has 1-64 letters, digits, '_', '.' or '-', and starts with a letter or digit"
        )
    return value


def _read_key() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("API key: ").strip()
    return sys.stdin.read().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.api.keys", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="create a random key and print it with its keys-file entry")
    new.add_argument("--name", type=_name, required=True, help="the key's name (logs, metrics, rate limits)")
    hashed = commands.add_parser("hash", help="read a key from stdin and print its keys-file entry")
    hashed.add_argument("--name", type=_name, required=True, help="the key's name (logs, metrics, rate limits)")
    hashed.add_argument(
        "--allow-short",
        action="store_true",
        help=f"accept a key shorter than {MIN_KEY_LENGTH} characters (only if it is random anyway)",
    )
    args = parser.parse_args(argv)

    if args.command == "new":
        key = generate_key()
        print(f"API key for '{args.name}' (shown only this once; hand it to its user):", file=sys.stderr)
        print(key)
        print("Entry for the keys file (auth.keys_file) or variable (auth.keys_env):", file=sys.stderr)
        print(f"{args.name}:{hash_key(key)}")
        return 0

    key = _read_key()
    if not key:
        print("error: no key on stdin", file=sys.stderr)
        return 2
    if any(ch.isspace() for ch in key):
        print("error: an API key cannot contain whitespace (read one key, on one line)", file=sys.stderr)
        return 2
    if len(key) < MIN_KEY_LENGTH and not args.allow_short:
        print(
            f"error: the key is shorter than {MIN_KEY_LENGTH} characters. Keys are stored as a fast, unsalted "
            "SHA-256, which is safe only for long random keys; make one with `new`, or pass --allow-short "
            "if this key is random anyway.",
            file=sys.stderr,
        )
        return 2
    print(f"{args.name}:{hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
