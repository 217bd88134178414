"""``cellseg data fetch {bccd,dsb2018-tile} DIR``: download a pinned public dataset, verify it, lay it out;
``cellseg data verify {bccd,dsb2018-tile} DIR``: check a folder already on disk against the same pins.

Exit 0 when the data is in place (fetched now or already there) or matches, 1 when the fetch or the check failed (the
message says why, names the files that differ and what to do offline), 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# = cellseg.data.fetch.DATASETS, repeated so that `cellseg --help` does not import the data package (and torch).
DATASETS = ("bccd", "dsb2018-tile")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("data", help="fetch the public datasets (pinned, SHA-256 verified)")
    sub = p.add_subparsers(dest="data_command", required=True)
    f = sub.add_parser("fetch", help="download a dataset into DIR, verified against its pinned SHA-256",
                       description=__doc__.splitlines()[0])
    f.add_argument("dataset", choices=DATASETS)
    f.add_argument("dir", help="target folder (for bccd: becomes DATA_ROOT)")
    f.add_argument("--url", default=None, help="another source of the same file (a mirror)")
    f.add_argument("--sha256", default=None, help="expected SHA-256 of the downloaded file (dsb2018-tile: instead of "
                   "the pinned one; bccd: in addition to the per-file content check)")
    f.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    f.add_argument("--no-verify", action="store_true", help="bccd: move the data into place even when its files "
                   "differ from the pinned manifest (loud warning, marked UNVERIFIED.txt)")
    v = sub.add_parser("verify", help="check a dataset folder against its pinned per-file SHA-256")
    v.add_argument("dataset", choices=DATASETS)
    v.add_argument("dir", help="the dataset folder (for bccd: DATA_ROOT)")


def run(args: argparse.Namespace) -> int:
    from cellseg.data.fetch import FetchError, fetch, is_fetched, verify

    if args.data_command == "verify":
        try:
            summary = verify(args.dataset, args.dir)
        except FetchError as e:
            print(f"cellseg data verify {args.dataset}: {e}", file=sys.stderr)
            return 1
        print(f"{args.dataset}: {args.dir}: {summary}")
        return 0
    if args.no_verify and args.dataset != "bccd":
        print("cellseg data fetch: --no-verify applies to bccd only (the DSB2018 tile is pinned by its wheel's "
              "SHA-256)", file=sys.stderr)
        return 2

    if not args.timeout > 0:
        print(f"cellseg data fetch: --timeout must be > 0 seconds, got {args.timeout}", file=sys.stderr)
        return 2
    kwargs: dict[str, Any] = {"timeout": args.timeout}
    if args.url:
        kwargs["url"] = args.url
    if args.sha256:
        kwargs["sha256"] = args.sha256
    if args.no_verify:
        kwargs["verify"] = False
    try:
        target = fetch(args.dataset, args.dir, **kwargs)
    except FetchError as e:
        print(f"cellseg data fetch {args.dataset}: {e}", file=sys.stderr)
        return 1
    assert is_fetched(args.dataset, target)
    print(f"{args.dataset}: ready at {target}")
    return 0
