"""Write `params.yaml`, the composed snapshot of `conf/` that the DVC stages run on.

    python -m pipeline.params                      # the defaults
    python -m pipeline.params train.epochs=4       # with Hydra overrides

It uses DVC's own Hydra composition (what `dvc exp run -S ...` runs), so the file is exactly what
DVC would write.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_params(
    overrides: list[str] | None = None, root: Path = ROOT, output: Path | None = None
) -> Path:
    from dvc.utils.hydra import compose_and_dump

    output = output or root / "params.yaml"
    compose_and_dump(output, str(root / "conf"), None, "config", str(root), list(overrides or []))
    return output


def main(argv: list[str] | None = None) -> None:
    path = write_params(sys.argv[1:] if argv is None else argv)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
