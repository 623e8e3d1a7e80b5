"""The project's data choice, kept in `conf/` so that it lasts.

DVC's Hydra integration composes `params.yaml` from `conf/` again on every `dvc exp run`, taking
only that command's `-S` overrides: an earlier `-S data=folder -S data.path=...` is not
remembered. So `--use-folder PATH` writes `conf/data/photos.yaml` (the folder source with your
path, on top of `conf/data/folder.yaml`) and makes it the `data` default in `conf/config.yaml`;
`--use-synthetic` makes `synthetic` the default again (photos.yaml is kept, so `-S data=photos`
still selects it); both then recompose `params.yaml`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from pipeline.lib.config.compose import write_params
from pipeline.lib.config.schema import SplitRatios
from pipeline.lib.data.sources.folder import discover
from pipeline.lib.errors import UserError

#: The config group option that holds your photo folder (conf/data/photos.yaml).
PHOTOS_OPTION = "photos"
#: The `data` entry of the primary config's defaults list, e.g. `  - data: synthetic`.
_DATA_DEFAULT = re.compile(r"^(?P<lead>\s*-\s*data\s*:\s*)(?P<option>[\w./-]+)(?P<rest>.*)$", re.M)

_PHOTOS_HEADER = """\
# Your photo folder, chosen with `python -m pipeline.params --use-folder PATH`: every `dvc repro`
# and `dvc exp run` uses it (conf/config.yaml: `- data: photos`) until you choose again
# (`--use-folder OTHER`, or `--use-synthetic` for the generated toy trucks). The settings of
# conf/data/folder.yaml apply; add `image_size: 160`, `split: ...` etc. below to change them.
# The folder is only read, never written to.
defaults:
  - folder
  - _self_
"""


class DataChoiceError(UserError, ValueError):
    """The data choice cannot be made: a missing folder, or a conf/config.yaml without a `data`
    default to set."""


def current_option(root: Path) -> str:
    """The `data` option `conf/config.yaml` selects (e.g. `synthetic`, `photos`)."""
    return _data_default(root / "conf" / "config.yaml").group("option")


def _data_default(config: Path) -> re.Match[str]:
    text = config.read_text(encoding="utf-8")
    matches = list(_DATA_DEFAULT.finditer(text))
    if len(matches) != 1:
        raise DataChoiceError(
            f"{config}: expected one `- data: <option>` line in its defaults list, found "
            f"{len(matches)}; set it by hand (e.g. `- data: {PHOTOS_OPTION}`)."
        )
    return matches[0]


def _set_default(root: Path, option: str) -> None:
    config = root / "conf" / "config.yaml"
    match = _data_default(config)
    text = config.read_text(encoding="utf-8")
    line = f"{match.group('lead')}{option}{match.group('rest')}"
    _write(config, text[: match.start()] + line + text[match.end() :])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def use_folder(root: Path, photos: str | os.PathLike[str]) -> tuple[Path, int, int]:
    """Make the photo folder `photos` the project's data, in `root`/conf; return (its absolute
    path, image files found, classes found).

    The folder is checked (and only read) with the folder source's discovery, with the split
    settings of conf/data/folder.yaml. Raises `DataChoiceError`, or the folder source's
    `DataError` naming what is wrong with the folder; `conf/` is unchanged then.
    """
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(photos))))
    project = Path(root).resolve()
    if folder.resolve() == project or folder.resolve() in project.parents:
        raise DataChoiceError(
            f"{folder} holds this project ({project}): point --use-folder at the folder of your "
            "photos (one sub-folder per class), not at the project or a folder above it."
        )
    found = discover(folder, SplitRatios(), 42)
    if len(found.classes) < 2:
        raise DataChoiceError(
            f"{folder} holds {len(found.classes)} class folder(s): a classifier needs at least "
            "two (one sub-folder of photos per class)."
        )
    target = root / "conf" / "data" / f"{PHOTOS_OPTION}.yaml"
    settings = _own_settings(target)  # what the user added below the path is kept
    settings["path"] = str(folder).replace("${", "\\${")
    body = yaml.safe_dump(settings, allow_unicode=True, sort_keys=False)
    _write(target, _PHOTOS_HEADER + body)
    _set_default(root, PHOTOS_OPTION)
    return folder, len(found.candidates), len(found.classes)


def _own_settings(path: Path) -> dict:
    """The keys an existing photos.yaml sets besides its defaults list (`path` first)."""
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DataChoiceError(f"{path}: invalid YAML ({exc}); fix or delete it") from None
    values = (
        {k: v for k, v in values.items() if k != "defaults"} if isinstance(values, dict) else {}
    )
    return {"path": values.pop("path", None), **values}


USAGE = "python -m pipeline.params --use-folder PATH | --use-synthetic"


def choose(root: Path, args: list[str]) -> str:
    """Run `--use-folder PATH` or `--use-synthetic` (the `pipeline.params` options) in project
    `root`: change the choice in conf/, recompose params.yaml; return what to tell the user.

    Raises `DataChoiceError` for other arguments, plus the errors of `use_folder` and of
    `pipeline.lib.config.compose.write_params`.
    """
    if args[:1] == ["--use-folder"] and len(args) == 2:
        folder, images, classes = use_folder(root, args[1])
        params = write_params(root, [])
        return (
            f"Data: your photo folder {folder} ({images} image files in {classes} classes), "
            f"written to conf/data/{PHOTOS_OPTION}.yaml and selected in conf/config.yaml "
            f"(`- data: {PHOTOS_OPTION}`); wrote {params}. Every `dvc repro` and `dvc exp run` "
            "uses it now; `python -m pipeline.params --use-synthetic` switches back."
        )
    if args == ["--use-synthetic"]:
        _set_default(root, "synthetic")
        params = write_params(root, [])
        return (
            "Data: the generated toy trucks (conf/config.yaml `- data: synthetic`); wrote "
            f"{params}. Every `dvc repro` and `dvc exp run` uses them now."
        )
    raise DataChoiceError(f"usage: {USAGE}")
