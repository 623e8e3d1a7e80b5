"""`params.yaml`: the composed, validated snapshot of `conf/` that the DVC stages run on.

`conf/` is the source of truth. Two paths write `params.yaml`:

- `python -m pipeline.params [OVERRIDES]` (`make params`): composes `conf/` with the overrides,
  validates the result against the schema and writes it, recording the overrides in a comment on
  the first line;
- `dvc exp run [-S OVERRIDES]`: DVC's Hydra integration composes `conf/` the same way
  (`dvc.utils.hydra.compose_and_dump`) before it runs the stages.

`check_params` is the guard the `config` stage runs: `params.yaml` must be valid and, outside a
DVC experiment, equal to `conf/` composed with its recorded overrides; an edit to `conf/` that was
not composed yet stops `dvc repro` with the keys that differ, instead of running stale values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline.lib.config.schema import ConfigError, validate

#: The first line of a `params.yaml` written by `write_params`, followed by the overrides (JSON).
HEADER = "# composed from conf/ by `python -m pipeline.params`; overrides: "
#: Environment variables DVC sets while it runs an experiment (`dvc exp run`, queued or not).
DVC_EXPERIMENT_ENV = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
#: How many differing keys an out-of-date message names.
MAX_LISTED = 5


def compose(conf_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """`conf_dir/config.yaml` composed by Hydra with `overrides`, resolved (as DVC composes it).

    Raises:
        ConfigError: a YAML syntax error in a conf/ file, an unknown group option, or an override
            that names no key (Hydra's message, one line).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"{display(conf_dir)}/: {_one_line(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def display(path: Path) -> str:
    """`path` relative to the working directory when it is below it (messages stay short)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({' '.join(str(cause).split())})"
    return text


def render(cfg: DictConfig, overrides: list[str]) -> str:
    """The text of `params.yaml`: the header naming `overrides`, then the YAML DVC would write."""
    return HEADER + json.dumps(list(overrides)) + "\n" + OmegaConf.to_yaml(cfg)


def write_params(
    root: Path, overrides: list[str] | None = None, output: Path | None = None
) -> Path:
    """Compose `root/conf` with `overrides`, validate it and write `output` (`root/params.yaml`).

    Returns:
        The path written.

    Raises:
        ConfigError: composition fails, or the result has an unknown key, a wrong type or an
            out-of-range value (the key named); nothing is written then.
    """
    overrides = list(overrides or [])
    cfg = compose(Path(root) / "conf", overrides)
    validate_composed(Path(root) / "conf", OmegaConf.to_container(cfg))
    output = Path(output or Path(root) / "params.yaml")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_text(render(cfg, overrides), encoding="utf-8")
    tmp.replace(output)
    return output


def load_params(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """(the values in `path`, the overrides its header records; None when it has no header).

    Raises:
        ConfigError: `path` is missing or is not valid YAML (file and line named).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: run `make params` to compose it from conf/"
        ) from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{display(path)}:{mark.line + 1}" if mark else display(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    first = text.split("\n", 1)[0]
    overrides = json.loads(first[len(HEADER) :]) if first.startswith(HEADER) else None
    return values, overrides


def in_dvc_experiment() -> bool:
    """True inside `dvc exp run`, where DVC has just composed `params.yaml` from conf/ itself."""
    return any(os.environ.get(name) for name in DVC_EXPERIMENT_ENV)


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain nested dicts (`a` vs `b`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix[:-1]]


def validate_composed(conf_dir: Path, composed: dict[str, Any]) -> None:
    """Validate a composition of `conf_dir`; an error names the conf/ file and line of the key.

    Raises:
        ConfigError: as `validate`, with the conf/ file that sets the offending key.
    """
    try:
        validate(OmegaConf.create(composed))
    except ConfigError as exc:
        where = locate_key(conf_dir, str(exc))
        raise ConfigError(f"{where}: {exc}" if where else f"{display(conf_dir)}/: {exc}") from None


def locate_key(conf_dir: Path, message: str) -> str | None:
    """`file:line` of the conf/ YAML line that sets the last part of the key quoted in `message`
    (e.g. `'train.epochz'` -> the line `epochz:`), or None when no single line does."""
    import re

    match = re.search(r"'([\w.]+)'|(\b[a-z_]+\.[\w.]+)=", message)
    if not match:
        return None
    leaf = (match.group(1) or match.group(2)).rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*:")
    hits = [
        f"{display(path)}:{number}"
        for path in sorted(Path(conf_dir).rglob("*.yaml"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.match(line)
    ]
    return hits[0] if len(hits) == 1 else None


def check_params(root: Path) -> DictConfig:
    """The `config` stage: `root/params.yaml` is valid and composed from the current `conf/`.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: invalid YAML, an unknown key, a wrong type or an out-of-range value; or
            (outside `dvc exp run`) `params.yaml` differs from `conf/` composed with its recorded
            overrides, with the differing keys and the command that recomposes it.
    """
    root = Path(root)
    values, overrides = load_params(root / "params.yaml")
    try:
        cfg = validate(OmegaConf.create(values))
    except ConfigError as exc:  # name the conf/ line that set the key, if one did
        where = locate_key(root / "conf", str(exc))
        raise ConfigError(f"params.yaml{f' (from {where})' if where else ''}: {exc}") from None
    if in_dvc_experiment():
        return cfg
    composed = OmegaConf.to_container(compose(root / "conf", overrides or []))
    validate_composed(root / "conf", composed)
    diff = differences(composed, values)
    if diff:
        shown = ", ".join(
            f"{k} (conf/: {OmegaConf.select(OmegaConf.create(composed), k)!r}, "
            f"params.yaml: {OmegaConf.select(OmegaConf.create(values), k)!r})"
            for k in diff[:MAX_LISTED]
        )
        more = f" and {len(diff) - MAX_LISTED} more" if len(diff) > MAX_LISTED else ""
        again = " ".join(["python -m pipeline.params", *(overrides or [])])
        raise ConfigError(
            f"params.yaml is out of date with conf/: {shown}{more}. Recompose it with "
            f"`{again}` (or `make params`), or run `dvc exp run`, which recomposes it."
        )
    return cfg
