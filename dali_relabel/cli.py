"""The `dali-relabel` command line: one subcommand per task on ReLabel label-map files.

Usage: dali-relabel COMMAND ...; `dali-relabel COMMAND --help` shows an example per command.
"""
from __future__ import annotations

import argparse
import os
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


def _verify(args: argparse.Namespace) -> int:
    from dali_relabel.loader import find_images
    from dali_relabel.verify import verify_images, write_bad_list

    if args.labelmaps:
        try:  # memory-mapped: only /paths is read
            placement = "mmap" if read_header(args.labelmaps).mmappable else "memory"
            with LabelMapStore.open(args.labelmaps, placement=placement) as store:
                paths = store.paths
        except LabelMapError as e:
            print(f"error: {e}")
            return 1
        source = args.labelmaps
    else:
        paths, _ = find_images(args.image_root)
        source = f"the image files under {args.image_root}"
    bad = verify_images(args.image_root, paths, batch_size=args.batch_size,
                        num_threads=args.num_threads, decoder_device=args.device,
                        adjust_orientation=args.adjust_orientation)
    write_bad_list(args.out, bad)
    for path, reason in bad:
        print(f"bad: {path}: {reason}")
    print(f"verified {len(paths)} images listed by {source}: {len(bad)} bad, listed in "
          f"{args.out}" + (f" (train with exclude={args.out!r})" if bad else ""))
    return 1 if bad else 0


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

    verify = commands.add_parser(
        "verify",
        help="decode every image and list the ones that fail",
        description="Decode every image with the loaders' decoder (DALI, CPU, in parallel) "
                    "and write the ones that fail (truncated, corrupt, empty) to a list that "
                    "the loaders take as exclude=.\nExit status 0 if all decode, 1 if not.",
        epilog="example:\n  dali-relabel verify /data/imagenet/train --labelmaps relabel.h5 "
               "--out bad_train.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("image_root", help="folder the images (the store's /paths) are under")
    verify.add_argument("--labelmaps", help="check the images this label-map file lists "
                                            "(default: every image file under IMAGE_ROOT)")
    verify.add_argument("--out", default="bad_images.txt",
                        help="where to write the list of bad images (default: bad_images.txt)")
    verify.add_argument("--batch-size", type=int, default=64,
                        help="images per decoding batch (default: 64)")
    verify.add_argument("--num-threads", type=int, default=os.cpu_count() or 1,
                        help="decoding threads (default: all CPUs)")
    verify.add_argument("--device", choices=("cpu", "mixed"),
                        default="mixed" if torch.cuda.is_available() else "cpu",
                        help="decoder: 'mixed' (GPU) is what GPU training uses (default: mixed "
                             "when a GPU is present, else cpu)")
    verify.add_argument("--adjust-orientation", action="store_true",
                        help="decode with EXIF orientation applied, as a loader with "
                             "adjust_orientation=True does")
    verify.set_defaults(run=_verify)
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
