"""Manage API keys: `python -m cli.apikeys create NAME`, `hash KEY`, `list`, `set NAME`, `revoke NAME`.

The service stores only each key's sha256, in SDXL_API_KEYS (a JSON list) or SDXL_API_KEYS_FILE (the same
list in a file). `create` prints the secret once: it cannot be recovered later, only replaced. API processes
read keys at start, so restart them (one replica at a time) after a change.
"""

import argparse
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.auth import NAME_PATTERN, ConfigError, KeySpec, hash_key, parse_specs

KEY_PREFIX = "sdxl_"  # recognisable in logs and by secret scanners


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits: a fast unsalted hash is enough


def read_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    specs = parse_specs(path.read_text(), str(path))
    return [s.model_dump(exclude_none=True) for s in specs]


def write_file(path: Path, entries: list[dict[str, Any]]) -> None:
    """Atomic replace, so an API process starting meanwhile reads the old list or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(entries, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def cmd_create(args: argparse.Namespace) -> int:
    key = new_key()
    fields = {
        "name": args.name,
        "sha256": hash_key(key),
        "rate_per_minute": args.rate_per_minute,
        "burst": args.burst,
        "max_queued": args.max_queued,
        "max_priority": args.max_priority,
        "daily_image_quota": args.daily_image_quota,
    }
    try:
        entry = KeySpec.model_validate(fields).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", file=sys.stderr)
        return 2
    if args.file:
        entries = read_file(args.file)
        if any(e["name"] == args.name for e in entries):
            print(f"error: {args.file} already has a key named {args.name!r}; revoke it first", file=sys.stderr)
            return 1
        write_file(args.file, [*entries, entry])
    if args.json:
        print(json.dumps({"key": key, "entry": entry}))
        return 0
    print(f"API key for {args.name!r} (shown once; store it now):")
    print(key)
    if args.file:
        print(f"Added to {args.file}; restart the API processes to use it.")
    else:
        print("Add this entry to the JSON list in SDXL_API_KEYS or SDXL_API_KEYS_FILE:")
        print(json.dumps(entry))
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(hash_key(key))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.file:
        entries = read_file(args.file)
    else:
        from app.auth import KeyRing
        from app.settings import Settings

        ring = KeyRing.from_settings(Settings())  # type: ignore[call-arg]
        entries = [{"name": p.name, **vars(p.limits)} for _digest, p in ring.entries]
    for e in entries:
        print(json.dumps({k: v for k, v in e.items() if k != "sha256"}))
    return 0


LIMIT_FIELDS = ("rate_per_minute", "burst", "max_queued", "max_priority", "daily_image_quota")


def cmd_set(args: argparse.Namespace) -> int:
    """Change an existing key's limits in a keys file (the secret stays the same)."""
    changes = {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f) is not None}
    if not changes:
        print("error: name at least one limit to set (--daily-image-quota, --rate-per-minute, ...)", file=sys.stderr)
        return 2
    entries = read_file(args.file)
    for i, e in enumerate(entries):
        if e["name"] == args.name:
            try:
                entries[i] = KeySpec.model_validate({**e, **changes}).model_dump(exclude_none=True)
            except ValidationError as exc:
                first = exc.errors()[0]
                print(f"error: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", file=sys.stderr)
                return 2
            write_file(args.file, entries)
            print(f"Set {', '.join(f'{k}={v}' for k, v in changes.items())} for {args.name!r} in {args.file}; "
                  "restart the API processes to apply.")
            return 0
    print(f"error: {args.file} has no key named {args.name!r}", file=sys.stderr)
    return 1


def cmd_revoke(args: argparse.Namespace) -> int:
    entries = read_file(args.file)
    kept = [e for e in entries if e["name"] != args.name]
    if len(kept) == len(entries):
        print(f"error: {args.file} has no key named {args.name!r}", file=sys.stderr)
        return 1
    write_file(args.file, kept)
    print(f"Revoked {args.name!r} in {args.file}; restart the API processes to apply.")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cli.apikeys", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="make a new key: prints it once, and the entry to configure")
    c.add_argument("name", help=f"unique name, {NAME_PATTERN}; generations belong to key:<name>")
    c.add_argument("--rate-per-minute", type=int, help="requests per minute (token bucket refill); 0 = unlimited")
    c.add_argument("--burst", type=int, help="requests allowed at once (bucket size)")
    c.add_argument("--max-queued", type=int, help="unfinished generations at once")
    c.add_argument("--max-priority", type=int, help="highest priority (0..2) this key may request")
    c.add_argument("--daily-image-quota", type=int,
                   help="images this key may submit per UTC day (429 beyond); 0 = none")
    c.add_argument("--file", type=Path, help="also add the entry to this SDXL_API_KEYS_FILE")
    c.add_argument("--json", action="store_true", help='print {"key": ..., "entry": ...} as one JSON line')
    c.set_defaults(func=cmd_create)
    h = sub.add_parser("hash", help="print the sha256 to configure for an existing key")
    h.add_argument("key", help="the key, or - to read it from stdin (keeps it out of shell history)")
    h.set_defaults(func=cmd_hash)
    ls = sub.add_parser("list", help="names and limits of the configured keys (never secrets)")
    ls.add_argument("--file", type=Path, help="read this file instead of the SDXL_API_KEYS* settings")
    ls.set_defaults(func=cmd_list)
    st = sub.add_parser("set", help="change an existing key's limits in a keys file")
    st.add_argument("name")
    st.add_argument("--rate-per-minute", type=int)
    st.add_argument("--burst", type=int)
    st.add_argument("--max-queued", type=int)
    st.add_argument("--max-priority", type=int)
    st.add_argument("--daily-image-quota", type=int, help="images per UTC day; 0 = none")
    st.add_argument("--file", type=Path, required=True)
    st.set_defaults(func=cmd_set)
    r = sub.add_parser("revoke", help="remove a key from a keys file")
    r.add_argument("name")
    r.add_argument("--file", type=Path, required=True)
    r.set_defaults(func=cmd_revoke)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
