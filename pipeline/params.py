"""Compose `params.yaml` from `conf/`, or check that it is up to date (the `config` stage).

python -m pipeline.params                      # the defaults (`make params`)
python -m pipeline.params train.C=3            # with Hydra overrides
python -m pipeline.params --check              # valid, and composed from the current conf/
python -m pipeline.params --use-folder PATH    # your photos, for every later run (in conf/)
python -m pipeline.params --use-synthetic      # back to the generated toy trucks

Inside `dvc exp run -S ...` (DVC composes params.yaml), `--check` records the overrides that
reproduce it from conf/ in its first line, so `dvc exp apply` + `dvc repro` keep the experiment."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.lib.config.compose import check_params, write_params
from pipeline.lib.data.choice import choose
from pipeline.lib.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv); return the exit status (2: UserError)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if {"-h", "--help"} & set(args):
            print(__doc__.strip())
        elif args == ["--check"]:
            check_params(Path.cwd())
            print("params.yaml: valid, composed from conf/")
        elif args[:1] in (["--use-folder"], ["--use-synthetic"]):
            print(choose(Path.cwd(), args))
        elif flags := [a for a in args if a.startswith("-")]:
            raise UserError(f"unknown option {flags[0]}: see `python -m pipeline.params --help`")
        else:
            print(f"wrote {write_params(Path.cwd(), args)}")
    except UserError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
