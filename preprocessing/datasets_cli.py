"""`sae datasets`: list the built-in datasets or export one as PNG files.

sae datasets list
sae datasets export digits /tmp/digits-png     # one folder per class
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from preprocessing import builtin
from preprocessing.errors import ArgumentParser, UserError
from preprocessing.storage import join


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sae datasets", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the built-in datasets")
    exp = sub.add_parser("export", help="write a built-in dataset as PNG files")
    exp.add_argument("name", choices=builtin.NAMES, help="built-in dataset")
    exp.add_argument("dir", help="output folder (local or gs://); must not contain files")
    return p


def run(argv: Sequence[str] | None = None) -> list[str]:
    """Returns the dataset names (list) or the written paths (export)."""
    args = make_parser().parse_args(argv)
    if args.action == "list":
        print("\n".join(builtin.table()))
        return list(builtin.NAMES)
    from preprocessing import jobkit, storage

    storage.check_access(writes=[("", args.dir)])
    if jobkit.existing_files(args.dir):
        raise UserError(f"{args.dir} already contains files; choose an empty folder")
    written = []
    for rel, png in builtin.iter_pngs(args.name):
        path = join(args.dir, rel)
        storage.publish(path, png)
        written.append(path)
    print(f"datasets: wrote {len(written)} PNG files of builtin:{args.name} to {args.dir}")
    return written
