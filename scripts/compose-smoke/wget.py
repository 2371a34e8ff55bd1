#!/usr/bin/env python3
"""`wget -q -O FILE URL`, the part of busybox wget compose.yaml's healthchecks use (the
official nats image has busybox; the smoke test's stand-in has Python instead)."""

import sys
import urllib.request


def main(argv: list[str]) -> int:
    out, url, args = "-", "", iter(argv)
    for arg in args:
        if arg == "-O":
            out = next(args, "-")
        elif not arg.startswith("-"):
            url = arg
    if not url:
        print("usage: wget [-q] [-O FILE] URL", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except Exception as exc:  # an HTTP error status too: exit non-zero like wget
        print(f"wget: {url}: {exc}", file=sys.stderr)
        return 1
    if out == "-":
        sys.stdout.buffer.write(body)
    else:
        with open(out, "wb") as f:
            f.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
