"""Command line: ``python -m common.data synthetic|prepare|validate ...``."""

from __future__ import annotations

import argparse
import sys


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    from common.data.prepare import PREPARERS

    parser = argparse.ArgumentParser(prog="python -m common.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthetic", help="write a synthetic phantom data set and its datalist JSON")
    syn.add_argument("--preset", default="brain", choices=["brain", "abdomen", "cardiac"])
    syn.add_argument("--out", required=True, help="output folder")
    syn.add_argument("--num_subjects", type=int, default=8)
    syn.add_argument("--shape", type=_shape, default=None, help="e.g. 64,64,64 (default: the preset's)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--num_sites", type=int, default=1)
    syn.add_argument("--spacing", type=_floats, default=None, help="voxel size, e.g. 1.5,1.5,8")

    prep = sub.add_parser("prepare", help="write a datalist JSON for a real data set")
    prep.add_argument("dataset", choices=sorted(PREPARERS))
    prep.add_argument("--src", required=True, help="data set root folder (read only)")
    prep.add_argument("--out", required=True, help="datalist JSON path (derived files go next to it)")
    prep.add_argument("--seed", type=int, default=0, help="split seed where the split is random")
    prep.add_argument("--no_validate", action="store_true", help="skip reading every file (faster)")

    val = sub.add_parser("validate", help="check every entry of a datalist (files, shapes, affines, label values)")
    val.add_argument("datalist", help="datalist JSON path")
    val.add_argument("--sections", nargs="+", default=["training", "validation", "test"])

    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args.datalist, args.sections)
    if args.command == "synthetic":
        from common.data.synthetic import generate_dataset

        path = generate_dataset(
            args.out,
            preset=args.preset,
            num_subjects=args.num_subjects,
            shape=args.shape,
            seed=args.seed,
            num_sites=args.num_sites,
            spacing=args.spacing,
        )
    else:
        path = PREPARERS[args.dataset](args.src, args.out, seed=args.seed, validate=not args.no_validate)
    print(path)
    return 0


def _validate(datalist: str, sections: list[str]) -> int:
    """Validate the non-empty sections; print one line per section, or the first error (naming the file and the fix)."""
    from common.data.datalist import load_datalist, read_datalist_json
    from common.data.validate import DataValidationError

    content = read_datalist_json(datalist)
    present = [name for name in sections if content.get(name)]
    if not present:
        print(f"{datalist}: none of the sections {sections} has entries", file=sys.stderr)
        return 1
    for name in present:
        try:
            entries = load_datalist(datalist, name, require_label=False, validate=True)
        except DataValidationError as error:
            print(f"section {name!r}: {error}", file=sys.stderr)
            return 1
        print(f"section {name!r}: {len(entries)} entries OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
