"""The `dali-relabel` command line: one subcommand per task on ReLabel label-map files.

Usage: dali-relabel COMMAND ...; `dali-relabel COMMAND --help` shows an example per command.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from dali_relabel.store import LabelMapError, LabelMapStore, read_header

_SHOWN_CLASSES = 5


def _human_size(num_bytes: float) -> str:
    if num_bytes < 1000:
        return f"{num_bytes:.0f} B"
    for unit in ("kB", "MB"):
        num_bytes /= 1000
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
    return f"{num_bytes / 1000:.1f} GB"


def _print_info(store: LabelMapStore) -> None:
    header = store.header
    print(f"file:         {store.path} ({_human_size(header.file_size)})")
    print(f"rows (N):     {len(store)}")
    print(f"classes (C):  {store.num_classes}   first: "
          f"{', '.join(store.classes[:_SHOWN_CLASSES])}"
          f"{', ...' if store.num_classes > _SHOWN_CLASSES else ''}")
    print(f"top-k (K):    {store.topk}")
    print(f"map (H x W):  {store.height} x {store.width}")
    for name, layout in header.layout.items():
        storage = ("contiguous (mmap-able)" if layout.contiguous
                   else f"chunked, {layout.compression or 'uncompressed'} (not mmap-able)")
        print(f"/{name + ':':12} {layout.dtype.name} {list(layout.shape)}  "
              f"{_human_size(layout.nbytes)} ({_human_size(layout.storage_bytes)} stored), "
              f"{storage}")
    known = store.labels[store.labels >= 0]
    print(f"labels:       {torch.unique(known).numel()} distinct, "
          f"{len(store) - known.numel()} unknown (-1)")
    print("provenance:" if header.provenance else "provenance:   none")
    for key, value in sorted(header.provenance.items()):
        print(f"  {key}: {value}")


def _info(args: argparse.Namespace) -> int:
    try:
        placement = "mmap" if read_header(args.file).mmappable else "memory"
        with LabelMapStore.open(args.file, placement=placement) as store:
            _print_info(store)
            if args.full:
                store.validate(full=True)
    except LabelMapError as e:
        print(f"validation: FAILED: {e}")
        return 1
    print(f"validation: ok ({'full scan' if args.full else 'metadata'})")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dali-relabel",
        description="DALI data loading with ReLabel label maps: tools for label-map files.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser(
        "info",
        help="describe a label-map file and validate it",
        description="Print the geometry, storage, provenance and labels of a label-map file "
                    "and validate it (metadata checks; --full also scans every row).\n"
                    "Exit status 0 if the file is valid, 1 if not.",
        epilog="example:\n  dali-relabel info imagenet_relabel.h5 --full",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("file", help="label-map file (HDF5)")
    info.add_argument("--full", action="store_true",
                      help="also scan every row for NaN/inf values and out-of-range classes")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `dali-relabel` command line.

    Args:
        argv: Arguments without the program name; default sys.argv[1:].

    Returns:
        The exit status.
    """
    args = _build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
