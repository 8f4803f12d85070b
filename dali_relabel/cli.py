"""The `dali-relabel` command line: one subcommand per task on ReLabel label-map files.

Usage: dali-relabel COMMAND ...; `dali-relabel COMMAND --help` shows an example per command.
Commands: annotate (make label maps with a timm classifier), import-pt (convert the official
relabel_imagenet release), info (describe and validate a file), verify (find images that fail
to decode), index (store the images' sizes), show (draw a map over its image), synthetic
(make a small data set to try the loaders on). ReLabel: Yun et al., CVPR 2021.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import torch

from dali_relabel import _checks
from dali_relabel._system import format_bytes as _human_size
from dali_relabel.files import OutputError, check_output_path
from dali_relabel.labelmaps.format import (
    LabelMapError,
    LabelMapHeader,
    opened,
    read_header,
    read_paths,
)
from dali_relabel.labelmaps.scan import scan_file

_SHOWN_CLASSES = 5
_SHOWN_PATHS = 5
_HELP_WIDTH = 79


def _printable(value: Any) -> str:
    """`value` as text that is safe on a terminal: control characters (escape sequences,
    line breaks, TABs) and other unprintable ones, e.g. from a file's class names or
    attributes or from file names, are written as Python escapes ("\\x1b")."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else
                   char.encode("unicode_escape").decode("ascii") for char in text)


def _print_info(header: LabelMapHeader, labels: torch.Tensor, classes: list[str]) -> None:
    print(f"file:         {_printable(header.path)} ({_human_size(header.file_size)})")
    print(f"rows (N):     {header.num_rows}")
    print(f"classes (C):  {header.num_classes}   first: "
          f"{', '.join(_printable(name) for name in classes[:_SHOWN_CLASSES])}"
          f"{', ...' if header.num_classes > _SHOWN_CLASSES else ''}")
    print(f"top-k (K):    {header.topk}")
    print(f"map (H x W):  {header.height} x {header.width}")
    for name, layout in header.layout.items():
        storage = ("contiguous (mmap-able)" if layout.contiguous
                   else f"chunked, {layout.compression or 'uncompressed'} (not mmap-able)")
        print(f"/{name + ':':12} {layout.dtype.name} {list(layout.shape)}  "
              f"{_human_size(layout.nbytes)} ({_human_size(layout.storage_bytes)} stored), "
              f"{storage}")
    known = labels[labels >= 0]
    print(f"labels:       {torch.unique(known).numel()} distinct, "
          f"{header.num_rows - known.numel()} unknown (-1)")
    print("provenance:" if header.provenance else "provenance:   none")
    for key, value in sorted(header.provenance.items()):
        print(f"  {_printable(key)}: {_printable(value)}")


def _info(args: argparse.Namespace) -> int:
    try:
        header = read_header(args.file)  # checks that the metadata fits in memory
        with opened(args.file) as f:  # /labels and a few class names; never the maps
            labels = torch.from_numpy(f["labels"][()].astype("int64"))
            classes = f["classes"].asstr()[:_SHOWN_CLASSES].tolist()
        _print_info(header, labels, classes)
        if args.full:
            scan_file(args.file)
    except LabelMapError as e:
        print(f"validation: FAILED: {_printable(e)}")
        return 1
    print(f"validation: ok ({'full scan' if args.full else 'metadata'})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dali_relabel.images.files import find_images
    from dali_relabel.images.path_lists import write_bad_list
    from dali_relabel.images.verify import verify_images

    _checks.check_int("--batch-size", args.batch_size, 1)
    _checks.check_int("--num-threads", args.num_threads, 1)
    check_output_path(args.out, argument="--out")
    skipped: list[tuple[str, str]] = []
    if args.labelmaps:
        try:  # only /paths is read
            paths = read_paths(args.labelmaps)
        except LabelMapError as e:
            print(f"error: {_printable(e)}")
            return 1
        source = args.labelmaps
    else:
        paths, _ = find_images(args.image_root, skipped=skipped)
        source = f"the image files under {args.image_root}"
    bad = verify_images(args.image_root, paths, batch_size=args.batch_size,
                        num_threads=args.num_threads, decoder_device=args.device,
                        adjust_orientation=args.adjust_orientation)
    write_bad_list(args.out, bad)
    for path, reason in bad:
        print(f"bad: {_printable(path)}: {_printable(reason)}")
    for path, reason in skipped:
        print(f"skipped: {_printable(path)}: {reason}")
    print(_printable(
        f"verified {len(paths)} images listed by {source}: {len(bad)} bad, listed in "
        f"{args.out}" + (f" (train with exclude={args.out!r})" if bad else "")
        + (f"; {len(skipped)} files skipped, no tool lists them" if skipped else "")))
    return 1 if bad else 0


def _annotate(args: argparse.Namespace) -> int:
    from dali_relabel.tools.annotate import annotate
    from dali_relabel.tools.jobs import read_name_list

    classes = read_name_list(args.classes, argument="--classes") if args.classes else None
    annotate(args.images, args.out, model=args.model, checkpoint=args.checkpoint,
             pretrained=args.pretrained, input_size=args.input_size, map_size=args.map_size,
             topk=args.topk, batch_size=args.batch_size, num_workers=args.num_workers,
             device=args.device, classes=classes, exclude=args.exclude)
    if os.path.exists(args.out):  # under torchrun only rank 0 writes the file
        print(_printable(f"wrote {args.out}"))
    return 0


def _import_pt(args: argparse.Namespace) -> int:
    from dali_relabel.tools.import_pt import import_pt
    from dali_relabel.tools.jobs import read_name_list

    classes = read_name_list(args.classes, argument="--classes") if args.classes else None
    report = import_pt(args.src, args.images, args.out, layout=args.layout, classes=classes,
                       strict=args.strict, num_workers=args.num_workers)
    if report.complete_before:
        print(_printable(f"{args.out}: complete from an earlier run of the same import "
                         f"({report.rows} maps, layout {args.layout}); nothing to do"))
        return 0
    for what, paths in (("image without a map", report.images_without_maps),
                        ("map without an image", report.maps_without_images)):
        for path in paths[:_SHOWN_PATHS]:
            print(f"{what}: {_printable(path)}")
        if len(paths) > _SHOWN_PATHS:
            print(f"{what}: ... and {len(paths) - _SHOWN_PATHS} more")
    print(_printable(f"wrote {args.out}: {report.rows} maps (layout {args.layout}); "
                     f"{len(report.images_without_maps)} images without a map, "
                     f"{len(report.maps_without_images)} maps without an image"))
    return 0


def _show(args: argparse.Namespace) -> int:
    from dali_relabel.tools.show import show_labelmap

    shown = show_labelmap(args.file, args.images, args.index, args.out, box=args.box,
                          num_crops=args.crops, seed=args.seed)
    print(_printable(f"wrote {args.out}: {shown.path}, {len(shown.boxes)} crop(s)"))
    return 0


def _index(args: argparse.Namespace) -> int:
    from dali_relabel.images.files import read_image_sizes
    from dali_relabel.labelmaps.writer import add_sizes

    if args.num_threads is not None:
        _checks.check_int("--num-threads", args.num_threads, 1)
    # A link (e.g. to a shared store) is followed: its target is rewritten, beside itself.
    target = os.path.realpath(args.file)
    check_output_path(target, argument="FILE")
    paths = read_paths(target)
    sizes = read_image_sizes(args.images, paths, adjust_orientation=args.adjust_orientation,
                             num_threads=args.num_threads)
    add_sizes(target, sizes, adjust_orientation=args.adjust_orientation)
    where = args.file if target == os.path.abspath(args.file) else (
        f"{args.file} (a link; rewrote {target})")
    print(_printable(f"{where}: stored the (height, width) of {len(paths)} images (mean "
                     f"{int(sizes[:, 0].mean())} x {int(sizes[:, 1].mean())})"))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from dali_relabel.tools.synthetic import make_synthetic_imagenet

    dataset = make_synthetic_imagenet(
        args.out, num_classes=args.classes, train_per_class=args.train_per_class,
        val_per_class=args.val_per_class, image_size=tuple(args.image_size),
        topk=min(5, args.classes), seed=args.seed, objects=tuple(args.objects),
        main_side=tuple(args.main_side), other_side=tuple(args.other_side))
    for what, path in (("train images", dataset.train_root),
                       ("validation images", dataset.val_root),
                       ("label maps", dataset.labelmaps), ("ReaL labels", dataset.real_labels)):
        print(f"{what}: {_printable(path)}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dali-relabel",
        description="DALI data loading with ReLabel label maps: tools for label-map files.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_annotate(commands)
    _add_import_pt(commands)
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
    _add_index(commands)
    _add_show(commands)
    _add_synthetic(commands)
    return parser


def _add_synthetic(commands: argparse._SubParsersAction) -> None:
    synthetic = commands.add_parser(
        "synthetic",
        help="make a small multi-object ImageNet with exact label maps, to try the loaders",
        description="Make (or reuse) a synthetic ImageNet in miniature: ImageFolder train and "
                    "validation trees of multi-object scenes, their label-map file (maps from "
                    "each object's exact coverage of every cell) and ReaL-style labels of the "
                    "validation images. Prints where each part is.",
        epilog="example:\n  dali-relabel synthetic --out synthetic_imagenet\n"
               "  python -c \"from dali_relabel import ReLabelLoader; ...\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synthetic.add_argument("--out", default=None, metavar="DIR",
                           help="folder to build it in (default: a cache folder under "
                                "~/.cache/dali-relabel)")
    synthetic.add_argument("--classes", type=int, default=10, help="classes (default: 10)")
    synthetic.add_argument("--train-per-class", type=int, default=60,
                           help="training images per class (default: 60)")
    synthetic.add_argument("--val-per-class", type=int, default=20,
                           help="validation images per class (default: 20)")
    synthetic.add_argument("--image-size", type=int, nargs=2, default=[96, 160],
                           metavar=("MIN", "MAX"),
                           help="range of the image width and of its height, each drawn "
                                "independently, in pixels (default: 96 160)")
    synthetic.add_argument("--objects", type=int, nargs=2, default=[1, 4],
                           metavar=("MIN", "MAX"), help="objects per image (default: 1 4)")
    synthetic.add_argument("--main-side", type=float, nargs=2, default=[0.5, 0.85],
                           metavar=("MIN", "MAX"),
                           help="side of the labelled object over the image's shorter side "
                                "(default: 0.5 0.85)")
    synthetic.add_argument("--other-side", type=float, nargs=2, default=[0.22, 0.5],
                           metavar=("MIN", "MAX"),
                           help="side of the other objects likewise (default: 0.22 0.5); "
                                "smaller and more objects (e.g. --objects 3 6 --main-side "
                                "0.3 0.5 --other-side 0.2 0.38) make random crops miss the "
                                "labelled object more often")
    synthetic.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    synthetic.set_defaults(run=_synthetic)


def _add_index(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser(
        "index",
        help="store every image's size in a label-map file (/sizes)",
        description="Read the (height, width) of every image the file lists from its header "
                    "(in parallel, a few kB per image) and store them as /sizes, so that "
                    "ReLabelLoader plans its crop windows without reading headers at start. "
                    "The file is rewritten through a copy beside it: an interruption leaves "
                    "it as it was. Run it again after resizing the images.",
        epilog="example:\n  dali-relabel index relabel.h5 --images /data/imagenet/train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index.add_argument("file", help="label-map file (HDF5)")
    index.add_argument("--images", required=True, metavar="ROOT",
                       help="folder the file's /paths are relative to")
    index.add_argument("--adjust-orientation", action="store_true",
                       help="store the sizes with EXIF orientation applied, for loaders with "
                            "adjust_orientation=True")
    index.add_argument("--num-threads", type=int, default=None, metavar="N",
                       help="header-reading threads (default: 4 per CPU, at most 32)")
    index.set_defaults(run=_index)


def _add_annotate(commands: argparse._SubParsersAction) -> None:
    annotate = commands.add_parser(
        "annotate",
        help="make label maps for an image folder with a timm classifier",
        description=textwrap.fill(
            "The machine annotator of ReLabel: a timm classifier whose head is "
            "global average pooling + linear is applied at every position of its "
            "feature map (the linear layer as a 1x1 convolution). Each image is "
            "resized whole to --input-size (no crop), the logit map is brought to "
            "--map-size (adaptive average pooling, or bilinear when smaller) and the "
            "top-k classes of every cell are written. Rerunning an interrupted job "
            "continues it. Under torchrun every rank annotates its share into its "
            "own part file, which rank 0 merges into OUT.", _HELP_WIDTH),
        epilog="examples:\n"
               "  dali-relabel annotate --model resnet50 --checkpoint rn50.pth "
               "--images /data/imagenet/train --out relabel.h5\n"
               "  torchrun --nproc_per_node=8 -m dali_relabel.cli annotate "
               "--model efficientnet_b3 --pretrained --images train/ --out maps.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    annotate.add_argument("--model", required=True, metavar="NAME",
                          help="timm model name, e.g. resnet50")
    weights = annotate.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", metavar="FILE",
                         help="model weights (a state dict file)")
    weights.add_argument("--pretrained", action="store_true",
                         help="timm's pretrained weights (timm downloads them)")
    annotate.add_argument("--images", required=True, metavar="ROOT",
                          help="ImageFolder root (class folders)")
    annotate.add_argument("--out", required=True, metavar="FILE",
                          help="label-map file to write (HDF5)")
    annotate.add_argument("--input-size", type=int, default=475, metavar="N",
                          help="side the whole image is resized to (default: 475)")
    annotate.add_argument("--map-size", type=int, default=15, metavar="N",
                          help="side of the label maps (default: 15)")
    annotate.add_argument("--topk", type=int, default=5, metavar="K",
                          help="classes kept per cell (default: 5)")
    annotate.add_argument("--batch-size", type=int, default=32, metavar="B",
                          help="images per forward pass (default: 32)")
    annotate.add_argument("--num-workers", type=int, default=None, metavar="N",
                          help="image-loading processes (default: this process's share of "
                               "the CPUs, at most 8)")
    annotate.add_argument("--device", default=None, metavar="D",
                          help="cuda (bf16) or cpu (default: cuda if available, else cpu)")
    annotate.add_argument("--classes", metavar="FILE",
                          help="file with the model's class names in index order, one per "
                               "line (default: the class folders, or timm's ImageNet synsets)")
    annotate.add_argument("--exclude", metavar="FILE",
                          help="file listing images to leave out (e.g. from `dali-relabel "
                               "verify`)")
    annotate.set_defaults(run=_annotate)


def _add_import_pt(commands: argparse._SubParsersAction) -> None:
    import_pt = commands.add_parser(
        "import-pt",
        help="import the official relabel_imagenet release (.pt files)",
        description=textwrap.fill(
            "Convert the official ReLabel release (one [2, 5, 15, 15] .pt tensor of "
            "top-k values and class indices per image, in a tree like the ImageNet "
            "train folder) into one label-map file. Layout 'official' stores each "
            "map transposed, because the official code passes (y1, x1, y2, x2) to "
            "roi_align: the targets then equal the official training targets. Layout "
            "'hw' stores the maps as given. Images without a map and maps without an "
            "image are reported; only matched images are written (--strict refuses). "
            "Rerunning an interrupted import continues it.", _HELP_WIDTH),
        epilog="example:\n  dali-relabel import-pt /data/relabel_imagenet "
               "--images /data/imagenet/train --out relabel_imagenet.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    import_pt.add_argument("src", metavar="SRC",
                           help="root of the .pt tree (the extracted release)")
    import_pt.add_argument("--images", required=True, metavar="ROOT",
                           help="the matching ImageFolder root")
    import_pt.add_argument("--out", required=True, metavar="FILE",
                           help="label-map file to write (HDF5)")
    import_pt.add_argument("--layout", choices=("official", "hw"), default="official",
                           help="official: reproduce the official targets (default); "
                                "hw: store the maps as given")
    import_pt.add_argument("--classes", metavar="FILE",
                           help="file with the class names in the maps' index order, one per "
                                "line (default: the class folders of --images)")
    import_pt.add_argument("--strict", action="store_true",
                           help="refuse when an image has no map or a map has no image")
    import_pt.add_argument("--num-workers", type=int, default=None, metavar="N",
                           help="threads reading .pt files (default: this process's share of "
                                "the CPUs, at most 8)")
    import_pt.set_defaults(run=_import_pt)


def _add_show(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser(
        "show",
        help="draw a label map over its image, with crop targets (PNG)",
        description=textwrap.fill(
            "Draw one image of a label-map file to a PNG: the image with the crop "
            "boxes, heatmaps of its top-2 classes over the image, and for every crop "
            "the crop and the top-5 classes of its target. Without --box, random "
            "crops made as ReLabelLoader makes them. Use it to check that maps line "
            "up with their images.", _HELP_WIDTH),
        epilog="examples:\n"
               "  dali-relabel show relabel.h5 --images /data/imagenet/train --index 0 "
               "--out row0.png\n"
               "  dali-relabel show relabel.h5 --images train/ --index 7 "
               "--box 0.1 0.2 0.6 0.9 --out crop.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("file", metavar="FILE", help="label-map file (HDF5)")
    show.add_argument("--images", required=True, metavar="ROOT",
                      help="folder the file's /paths are under")
    show.add_argument("--index", type=int, required=True, metavar="I", help="row (image) to show")
    show.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                      help="one crop, normalized to [0, 1] (default: random loader crops)")
    show.add_argument("--crops", type=int, default=3, metavar="N",
                      help="number of random crops without --box (default: 3)")
    show.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random crops")
    show.add_argument("--out", required=True, metavar="PNG", help="PNG file to write")
    show.set_defaults(run=_show)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `dali-relabel` command line.

    Args:
        argv: Arguments without the program name; default sys.argv[1:].

    Returns:
        The exit status.
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(format="dali-relabel: %(message)s")
    logging.getLogger("dali_relabel").setLevel(logging.INFO)  # progress notes, not timm's
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # LabelMapError is a ValueError
        print(f"dali-relabel {args.command}: error: {_printable(_one_line(e))}",
              file=sys.stderr)
        return 1


def _one_line(error: Exception) -> str:
    """An error as one line: an OSError of the system names its file and says what
    happened ("PATH: No space left on device"), as the tools' own errors do."""
    if isinstance(error, OSError) and not isinstance(error, OutputError) and (
            error.strerror is not None):
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
