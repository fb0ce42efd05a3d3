"""Convert a data set once into its prepared form: memory-mapped uint8 arrays plus a checksum manifest.

    python -m act_lightning.prepare imagenet64 SRC DST        # official .npz batches -> DST
    python -m act_lightning.prepare lsun_cat256 SRC DST       # LSUN cat LMDB -> DST (optional, faster)
    python -m act_lightning.prepare verify DST                # re-hash DST against its manifest

Then train with `data.root=DST`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from act_lightning.checks import check_count


def _imagenet64(args: argparse.Namespace) -> dict:
    from act_lightning.data.imagenet64 import prepare_imagenet64

    return prepare_imagenet64(args.src, args.dst, progress=not args.quiet)


def _lsun_cat256(args: argparse.Namespace) -> dict:
    from act_lightning.data.lsun import prepare_lsun

    return prepare_lsun(
        args.src,
        args.dst,
        category=args.category,
        image_size=args.image_size,
        max_images=args.max_images,
        workers=args.workers,
        skip_broken=args.skip_broken,
        progress=not args.quiet,
    )


def _verify(args: argparse.Namespace) -> dict:
    import json

    from act_lightning.data import storage

    root = Path(args.dst).expanduser().resolve()
    if not (root / storage.MANIFEST).is_file():
        raise FileNotFoundError(f"{root / storage.MANIFEST} not found: {root} is not a prepared folder")
    source = json.loads((root / storage.MANIFEST).read_text()).get("source", "?")
    manifest = storage.read_manifest(root, source)
    (root / ".verified.json").unlink(missing_ok=True)  # hash everything, whatever was verified before
    storage.check_files(root, manifest, verify=True, switch="")  # a check asked for: nothing to skip
    return manifest


def count(low: int):
    """An argparse type: an integer >= `low` (`check_count`; argparse names the option when it refuses
    one)."""

    def parse(text: str) -> int:
        try:
            return check_count(int(text), "value", low)
        except ValueError:  # not an integer, or one below `low`
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m act_lightning.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # named as the user gives it (argparse said "the following arguments are required: source")
    sub = parser.add_subparsers(dest="source", required=True, metavar="{imagenet64,lsun_cat256,verify}")

    p = sub.add_parser("imagenet64", help="official Downsampled ImageNet 64x64 .npz files -> prepared form")
    p.add_argument(
        "src",
        type=Path,
        help="folder holding train_data_batch_1.npz .. train_data_batch_10.npz, val_data.npz",
    )
    p.add_argument("dst", type=Path, help="output folder (then train with data.root=DST)")
    p.set_defaults(run=_imagenet64)

    p = sub.add_parser("lsun_cat256", help="LSUN LMDB -> centre-cropped, resized prepared form")
    p.add_argument("src", type=Path, help="the LMDB folder (holding data.mdb), or its parent")
    p.add_argument("dst", type=Path, help="output folder (then train with data.root=DST)")
    p.add_argument("--category", default="cat", help="LSUN category (default: cat)")
    p.add_argument("--image-size", type=count(1), default=256, help="output size in pixels (default: 256)")
    p.add_argument("--max-images", type=count(1), default=None, help="convert only the first N images")
    p.add_argument(
        "--workers", type=count(0), default=os.cpu_count() or 1, help="decoding processes (0: in this one)"
    )
    p.add_argument(
        "--skip-broken",
        action="store_true",
        help="leave out images that do not decode (listed in the manifest)",
    )
    p.set_defaults(run=_lsun_cat256)

    p = sub.add_parser("verify", help="re-hash a prepared folder against its manifest.json")
    p.add_argument("dst", type=Path)
    p.set_defaults(run=_verify)

    for p in sub.choices.values():
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = args.run(args)
    except (OSError, ValueError) as err:  # FileNotFoundError, DataError: messages written for the user
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name}: {split['count']} images" for name, split in manifest["splits"].items())
    done = "verified against manifest.json" if args.source == "verify" else "prepared"
    print(f"{Path(args.dst).expanduser().resolve()}: {manifest['source']} {done} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
