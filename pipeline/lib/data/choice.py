"""The project's data choice, kept in conf/ so that it lasts (`dvc exp run` composes conf/ anew
with only its own `-S` overrides): `--use-folder PATH` writes conf/data/photos.yaml and selects
it in conf/config.yaml, `--use-synthetic` selects `synthetic` again; both rewrite params.yaml."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from pipeline.lib.config.compose import write_params
from pipeline.lib.config.schema import SplitRatios, literal
from pipeline.lib.data.sources.folder import discover
from pipeline.lib.errors import UserError
from pipeline.lib.files import atomic_file

PHOTOS_OPTION = "photos"
#: The `data` entry of conf/config.yaml's defaults list, e.g. `  - data: synthetic`.
_DATA_DEFAULT = re.compile(r"^\s*-\s*data\s*:\s*(?P<option>[\w./-]+)", re.M)

_PHOTOS_HEADER = """\
# Your photo folder (only read), chosen with `python -m pipeline.params --use-folder PATH`
# (`--use-synthetic` switches back). conf/data/folder.yaml's settings apply; change them below
# (e.g. `image_size: 160`).
defaults:
  - folder
  - _self_
"""


class DataChoiceError(UserError, ValueError):
    """The data choice cannot be made (bad folder, or no `data` default in conf/config.yaml)."""


def current_option(root: Path) -> str:
    """The `data` option conf/config.yaml selects (e.g. `synthetic`, `photos`)."""
    return _data_default(root / "conf" / "config.yaml")[1].group("option")


def _data_default(config: Path) -> tuple[str, re.Match[str]]:
    text = config.read_text(encoding="utf-8")
    matches = list(_DATA_DEFAULT.finditer(text))
    if len(matches) != 1:
        raise DataChoiceError(
            f"{config}: {len(matches)} `- data: <option>` lines in its defaults, expected one; "
            f"set it by hand (e.g. `- data: {PHOTOS_OPTION}`)."
        )
    return text, matches[0]


def _set_default(root: Path, option: str) -> None:
    text, match = _data_default(config := root / "conf" / "config.yaml")
    with atomic_file(config, key=None) as fh:
        fh.write(text[: match.start("option")] + option + text[match.end("option") :])


def use_folder(root: Path, photos: str | os.PathLike[str]) -> tuple[Path, int, int, bool]:
    """Make the folder `photos` (checked, only read) the project's data in `root`/conf; return
    (its absolute path, image files, classes, marked for git). DataChoiceError or DataError:
    conf/ unchanged."""
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(photos))))
    project = Path(root).resolve()
    if folder.resolve() == project or folder.resolve() in project.parents:
        raise DataChoiceError(
            f"{folder} holds this project ({project}): point --use-folder at your photo folder."
        )
    found = discover(folder, SplitRatios(), 42)
    if len(found.classes) < 2:
        raise DataChoiceError(
            f"{folder} holds {len(found.classes)} class folder(s): a classifier needs two or more."
        )
    target = root / "conf" / "data" / f"{PHOTOS_OPTION}.yaml"
    settings = _own_settings(target)  # what the user added below the path is kept
    settings["path"] = literal(str(folder))
    body = yaml.safe_dump(settings, allow_unicode=True, sort_keys=False)
    with atomic_file(target, key=None) as fh:
        fh.write(_PHOTOS_HEADER + body)
    marked = _mark_for_git(root, target)
    _set_default(root, PHOTOS_OPTION)
    return folder, len(found.candidates), len(found.classes), marked


def _mark_for_git(root: Path, target: Path) -> bool:
    """`git add -N target` (queued `dvc exp run`s copy only the files git knows), unless DVC runs
    without git (`no_scm`: DVC refuses a project inside another repository without it or `dvc
    init --subdir`, so an enclosing repository is left alone). True when marked."""
    config = root / ".dvc" / "config"
    if config.is_file() and re.search(r"^\s*no_scm\s*=\s*true", config.read_text(), re.I | re.M):
        return False
    try:
        done = subprocess.run(
            ["git", "add", "-N", target.name], cwd=target.parent, capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0


def _own_settings(path: Path) -> dict:
    """The keys an existing photos.yaml sets besides its defaults (`path` first)."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError as exc:
        raise DataChoiceError(f"{path}: invalid YAML ({exc}); fix or delete it") from None
    values = dict(values) if isinstance(values, dict) else {}
    values.pop("defaults", None)
    return {"path": values.pop("path", None), **values}


USAGE = "python -m pipeline.params --use-folder PATH | --use-synthetic"


def choose(root: Path, args: list[str]) -> str:
    """Run `--use-folder PATH` or `--use-synthetic` in project `root`; return what to tell the
    user. DataChoiceError for other arguments, and the errors of `use_folder`, `write_params`."""
    if args[:1] == ["--use-folder"] and len(args) == 2:
        folder, images, classes, marked = use_folder(root, args[1])
        params = write_params(root, [])
        return (
            f"Data: your photo folder {folder} ({images} image files in {classes} classes), in "
            f"conf/data/{PHOTOS_OPTION}.yaml{' (git add -N)' if marked else ''} and selected in "
            f"conf/config.yaml; "
            f"wrote {params}. `python -m pipeline.params --use-synthetic` switches back."
        )
    if args == ["--use-synthetic"]:
        _set_default(root, "synthetic")
        return f"Data: the generated toy trucks (conf/config.yaml); wrote {write_params(root, [])}"
    raise DataChoiceError(f"usage: {USAGE}")
