"""API key hashing, and the CLI that prints a key's hash for the configuration.

python -m service.keys hash KEY      # prints sha256(KEY) for CRISPEDIT_API_KEYS
python -m service.keys new           # prints a fresh random key and its hash
"""

from __future__ import annotations

import hashlib
import secrets
import sys


def hash_key(key: str) -> str:
    """The lowercase sha256 hex digest of an API key's UTF-8 bytes: what the settings store.

    A plain hash (no salt, no stretching) is enough because keys are long random strings, not
    passwords: there is nothing to guess from a dictionary.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "hash":
        print(hash_key(args[1]))
        return 0
    if args == ["new"]:
        key = secrets.token_urlsafe(32)
        print(f"key:    {key}\nsha256: {hash_key(key)}")
        return 0
    print("usage: python -m service.keys hash KEY | new", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
