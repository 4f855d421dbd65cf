"""``python -m bn_core.native build [--optional] [--verbose]``: compile the BatchNorm kernel.

With ``--optional`` a failed build (no compiler, say) prints why and exits 0, because the
app runs on the Python kernel too; without it the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from bn_core import native


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_core.native", description=__doc__)
    parser.add_argument("command", choices=["build", "status"])
    parser.add_argument("--optional", action="store_true", help="a failed build is not an error")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    if args.command == "status":
        print(native.status())
        return 0
    start = time.perf_counter()
    try:
        path = native.build(verbose=args.verbose)
    except Exception as err:  # the compiler's own message says what is missing
        level = "warning" if args.optional else "error"
        print(
            f"bn_core.native: {level}: the C++ BatchNorm kernel did not build "
            f"({type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}); "
            "bn_core uses its Python kernel instead",
            file=sys.stderr,
        )
        return 0 if args.optional else 1
    print(f"bn_core.native: {path.name} ready ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
