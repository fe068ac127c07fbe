"""``dhow models encrypt | rewrap | keygen | push``: encrypt a repository's artifacts at rest, rotate keys, publish it.

Keys come from ``--kek-file`` (or ``DHOW_KEK_FILE``) and the ``DHOW_KEK`` environment variable, resolved as
the server resolves them (``dhow.settings``); never from the command line, where other users of the machine
could read them in the process list.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from dhow.core.errors import InvalidInput
from dhow.repository.encryption import Keyring, encrypt_repository, generate_key, rewrap_repository
from dhow.settings import CONFIG_FILE_HELP, resolve_settings

__all__ = ["add_parsers", "run"]

_KEK_HELP = "file of key-encryption keys, one 'id:base64key' a line (also read: DHOW_KEK=id:base64key[,...])"


def add_parsers(model_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``encrypt``, ``rewrap`` and ``keygen`` to the ``dhow models`` actions (dest ``models_command``)."""
    encrypt = model_commands.add_parser(
        "encrypt",
        help="encrypt the artifacts of a repository at rest",
        description="Encrypt every file of every version folder as <file>.enc (AES-256-GCM) and remove the "
        "plaintext; model.yaml stays readable. Serve with the same keys: --kek-file or DHOW_KEK.",
    )
    encrypt.add_argument("repository", type=Path, metavar="REPO", help="the repository folder")
    encrypt.add_argument("--model", metavar="M", help="only this model (default: every model)")
    encrypt.add_argument("--key-id", metavar="ID", help="the key to encrypt with (default: the last one listed)")
    encrypt.add_argument("--kek-file", metavar="F", help=_KEK_HELP)
    encrypt.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    encrypt.add_argument(
        "--keep-plaintext", action="store_true", help="keep the plain files (a server refuses a folder with both)"
    )
    rewrap = model_commands.add_parser(
        "rewrap",
        help="re-wrap encrypted artifacts under another key (key rotation)",
        description="Wrap the data key of every encrypted artifact under the key --to; the payloads are not "
        "rewritten. The keyring must hold both the old keys and the new one.",
    )
    rewrap.add_argument("repository", type=Path, metavar="REPO", help="the repository folder")
    rewrap.add_argument("--to", required=True, metavar="ID", help="the key id to wrap under")
    rewrap.add_argument("--model", metavar="M", help="only this model (default: every model)")
    rewrap.add_argument("--kek-file", metavar="F", help=_KEK_HELP)
    rewrap.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    push = model_commands.add_parser(
        "push",
        help="upload a repository to object storage, for servers started with --repository s3://...",
        description="Upload every version of every model (or --model's) with a SHA-256 digest list per version, "
        "written after its files: servers polling the bucket copy a version only once its list is there, and "
        "check every file against it. Credentials and endpoint: the usual AWS_* variables (AWS_ENDPOINT_URL).",
    )
    push.add_argument("repository", type=Path, metavar="REPO", help="the repository folder")
    push.add_argument("url", metavar="URL", help="where to: s3://bucket/prefix (or another fsspec URL)")
    push.add_argument("--model", metavar="M", help="only this model (default: every model)")
    keygen = model_commands.add_parser(
        "keygen",
        help="make a new key-encryption key",
        description="Print a new key as 'id:base64key', or append it to FILE (created readable by you only).",
    )
    keygen.add_argument("--id", metavar="ID", help="its id (default: k1, or the next kN free in --out)")
    keygen.add_argument("--out", type=Path, metavar="FILE", help="append to this key file instead of printing")


def run(args: argparse.Namespace) -> int | None:
    """Run an action added by ``add_parsers``; ``None`` for the other ``dhow models`` actions."""
    action = getattr(args, "models_command", None)
    if action == "encrypt":
        return _encrypt(args)
    if action == "rewrap":
        return _rewrap(args)
    if action == "keygen":
        return _keygen(args)
    if action == "push":
        return _push(args)
    return None


def _push(args: argparse.Namespace) -> int:
    from dhow.repository.remote import push_repository

    pushed = push_repository(args.repository, args.url, model=args.model)
    print(f"pushed {', '.join(pushed)} to {args.url}" if pushed else f"{args.url} already holds every version")
    return 0


def _keyring(args: argparse.Namespace) -> Keyring:
    """The keys the server would use: ``kek_file`` and ``kek`` as every command resolves them."""
    settings = resolve_settings({"kek_file": args.kek_file}, config_file=args.config)
    keyring = Keyring.load(settings.kek, settings.kek_file)
    if keyring is None:
        raise InvalidInput(
            "no key-encryption key: pass --kek-file FILE or set DHOW_KEK=id:base64key "
            "(make a key with 'dhow models keygen --out FILE')"
        )
    return keyring


def _encrypt(args: argparse.Namespace) -> int:
    keyring = _keyring(args)
    key_id, _ = keyring.key(args.key_id)
    written = encrypt_repository(
        args.repository, keyring, model=args.model, key_id=key_id, keep_plaintext=args.keep_plaintext
    )
    if not written:
        print(f"nothing to encrypt in {args.repository}: no plain artifacts in its version folders")
        return 0
    kept = "; plaintext kept" if args.keep_plaintext else ""
    print(f"encrypted {_files_of_models(written, args.repository)} with key '{key_id}'{kept}")
    return 0


def _rewrap(args: argparse.Namespace) -> int:
    rewritten = rewrap_repository(args.repository, _keyring(args), to_key_id=args.to, model=args.model)
    if not rewritten:
        print(f"nothing to re-wrap in {args.repository}: every encrypted artifact already uses key '{args.to}'")
        return 0
    print(f"re-wrapped {_files_of_models(rewritten, args.repository)} under key '{args.to}'")
    return 0


def _files_of_models(paths: Sequence[Path], repository: Path) -> str:
    """``3 files of 2 models``."""
    models = {path.relative_to(repository).parts[0] for path in paths}
    return f"{_count(len(paths), 'file')} of {_count(len(models), 'model')}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _keygen(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    existing = _ids_in(out) if out is not None else []
    key_id = args.id or _next_id(existing)
    if key_id in existing:
        raise InvalidInput(f"{out} already has a key '{key_id}'; pick another with --id")
    entry = f"{key_id}:{generate_key()}"
    Keyring.parse(entry, "--id")  # the id must be one a keyring accepts
    if out is None:
        print(entry)
        return 0
    _append_secret(out, entry)
    print(f"added key '{key_id}' to {out}; new encryptions use the last key listed")
    return 0


def _ids_in(path: Path) -> list[str]:
    """The key ids already in a key file (none when it is absent, empty or only comments)."""
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the key file {path}: {exc}") from None
    if not any(line.partition("#")[0].strip(" \t,") for line in text.splitlines()):
        return []
    return list(Keyring.parse(text, str(path)).keys)


def _next_id(existing: list[str]) -> str:
    taken = set(existing)
    return next(f"k{number}" for number in range(1, len(taken) + 2) if f"k{number}" not in taken)


def _append_secret(path: Path, entry: str) -> None:
    unterminated = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    # created with 0o600 by open itself: the key file is never readable by others, not even for an instant
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(("\n" if unterminated else "") + entry + "\n")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        print(f"warning: {path} is readable by other users; restrict it with: chmod 600 {path}", file=sys.stderr)
