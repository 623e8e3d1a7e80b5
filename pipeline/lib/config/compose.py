"""`params.yaml`, the validated composition of `conf/` the DVC stages run on, as
`python -m pipeline.params [OVERRIDES]` and `dvc exp run -S ...` write it."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipeline.lib.config.schema import Config, ConfigError, literal, name_after_data, validate
from pipeline.lib.files import atomic_file

#: The first line of a `params.yaml` written by `write_params`, followed by the overrides (JSON).
HEADER = "# composed from conf/ by `python -m pipeline.params`; overrides: "


def compose(conf_dir: Path, overrides: list[str] | None = None, raw: bool = False) -> DictConfig:
    """`conf_dir/config.yaml` composed with `overrides` and resolved once, as DVC does (strings
    then `literal`); ConfigError (one line) on a YAML error, an unknown group option or key.
    `raw`: as Hydra composed it (unresolved), its `hydra` node (mode, sweeper) included."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base="1.3"):
            cfg = hydra_compose("config", list(overrides or []), return_hydra_config=raw)
        return cfg if raw else OmegaConf.create(literal(OmegaConf.to_container(cfg, resolve=True)))
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        text = " ".join(str(exc).split())
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause) and str(cause) not in text:
            text += f" ({' '.join(str(cause).split())})"
        raise ConfigError(f"{display(conf_dir)}/: {text}") from None
    finally:
        GlobalHydra.instance().clear()


#: What a sweep cannot vary: its parent run and every child are in one store and experiment.
TRACKING_AXES = ("tracking", "tracking.uri", "tracking.experiment")


def validate_jobs(conf_dir: Path, overrides: list[str], multirun: bool) -> None:
    """Validate the run of `overrides`, or with `multirun` (`-m`, or `hydra.mode` in conf/) every
    job Hydra's sweeper would launch, before any runs: ConfigError naming the override or job."""
    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base="1.3"):
        parser = OverridesParser.create(GlobalHydra.instance().config_loader())  # for glob()
    # `${hydra:...}` resolves only inside a running job: such overrides are left to its own check
    overrides = [o for o in overrides if "${hydra:" not in o]
    conf_dir, composed, jobs, at, job = Path(conf_dir), {}, [overrides], "", overrides
    stores: dict[str, list[str]] = {}  # MLflow experiment and store -> the first job logging there
    try:
        _, hydra = _composed(conf_dir, overrides, parser, composed, base=True)
        if multirun or hydra.mode == RunMode.MULTIRUN:
            params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
            basic = str(hydra.sweeper.get("_target_")).endswith("BasicSweeper")
            sweep = [_axis(parser, line, basic) for line in params + overrides]
            sweep = [o for o in sweep if not o.is_interval_sweep()]  # sampled: run_step checks it
            jobs, at = BasicSweeper.split_arguments(sweep, None)[0], "multirun job #{} ({})"
        for job in jobs:
            cfg = _composed(conf_dir, job, parser, composed)[0]
            validate_composed(conf_dir, cfg)
            tracking = OmegaConf.create(cfg["tracking"])
            name_after_data(tracking, OmegaConf.create(cfg["data"]))
            stores.setdefault(f"{tracking.experiment} in {tracking.uri}", job)
    # Hydra raises plain ValueErrors too (`experiment=null,smoke`)
    except (ConfigError, HydraException, OmegaConfBaseException, ValueError) as exc:
        text = str(exc) if isinstance(exc, ConfigError) else " ".join(str(exc).split())
        if at:
            text = f"{at.format(jobs.index(job), ' '.join(job))}, none ran: {text}"
        elif not isinstance(exc, ConfigError):
            text = f"{' '.join(job)}: {text}"
        raise ConfigError(text) from None
    if len(stores) > 1:  # e.g. `data=a,b` with tracking.experiment=auto (named after the data)
        (a, a_job), (b, b_job) = list(stores.items())[:2]
        raise ConfigError(
            f"multirun jobs ({' '.join(a_job)}) and ({' '.join(b_job)}) would log to two MLflow "
            f"experiments ({a}; {b}), a sweep's parent run to one: set tracking.experiment, or run "
            "one sweep per data"
        )


def _axis(parser: OverridesParser, line: str, basic: bool) -> Override:
    """`line` parsed, checked as one axis of a sweep (`basic`: Hydra's basic sweeper)."""
    try:
        override = parser.parse_overrides([line])[0]
        interval = override.is_interval_sweep()
        values = interval or BasicSweeper.split_arguments([override], None)[0]
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # range(1,3,0)
        text = " ".join(str(exc).split())
        raise ConfigError(f"{line}: Hydra cannot expand this override ({text}): fix it") from None
    if override.is_sweep_override() and override.key_or_group in TRACKING_AXES:
        raise ConfigError(
            f"{line}: a sweep cannot vary the tracking store or experiment (its parent run is in "
            "one): run one sweep per tracking store / experiment"
        )
    if interval and basic:
        raise ConfigError(
            f"{line}: interval() is sampled: add hparams_search=optuna, or list values"
        )
    if not values:
        raise ConfigError(f"{line}: the sweep has no jobs: give this override at least one value")
    return override


def _composed(
    conf_dir: Path, job: list[str], parser: OverridesParser, composed: dict, base: bool = False
) -> tuple[Any, DictConfig]:
    """(`job`'s config, resolved unless `base` (sweeps left out); `hydra` node): Hydra composes its
    group, + and ~ overrides (once per set: `composed`), OmegaConf applies its key=value ones."""
    try:
        parsed = [o for o in parser.parse_overrides(job) if not (base and o.is_sweep_override())]
        job, plain = [o.input_line for o in parsed], [o for o in parsed if _plain(conf_dir, o)]
        fixed = tuple(o.input_line for o in parsed if o not in plain)
        if fixed not in composed:
            with open_dict(compose(conf_dir, list(fixed), raw=True)) as cfg:
                composed[fixed] = cfg, cfg.pop("hydra")
        cfg, hydra = copy.deepcopy(composed[fixed][0]), composed[fixed][1]
        for o in plain:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        return cfg if base else literal(OmegaConf.to_container(cfg, resolve=True)), hydra
    except (HydraException, OmegaConfBaseException):
        compose(conf_dir, job)  # raises Hydra's own message
        raise


def _plain(conf_dir: Path, o: Override) -> bool:
    """A key=value override, not of a config group, nor a sweep, + or ~."""
    group = o.package or (conf_dir / o.key_or_group).is_dir()
    return o.type == OverrideType.CHANGE and not (group or o.is_sweep_override())


def display(path: Path) -> str:
    """`path` relative to the working directory when below it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def write_params(
    root: Path, overrides: list[str] | None = None, output: Path | None = None
) -> Path:
    """Compose `root/conf` with `overrides`, validate it, write `output` (`root/params.yaml`)
    atomically, its values literal as DVC writes them; return its path. ConfigError: nothing
    written."""
    overrides, conf = list(overrides or []), Path(root) / "conf"
    cfg = compose(conf, overrides)
    validate_composed(conf, cfg)
    output = Path(output or Path(root) / "params.yaml")
    with atomic_file(output, key=None) as fh:
        fh.write(HEADER + json.dumps(overrides) + "\n" + OmegaConf.to_yaml(cfg, resolve=True))
    return output


def load_params(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """(values, the overrides its header records or None); ConfigError naming the file (and
    line) when it is missing or not YAML."""
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
    return values, json.loads(first[len(HEADER) :]) if first.startswith(HEADER) else None


def in_dvc_experiment() -> bool:
    """True inside `dvc exp run`, where DVC has just composed `params.yaml` from conf/ itself."""
    return any(os.environ.get(name) for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"))


def differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `a`, value in `b`) where two plain nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix[:-1], a, b)]


def validate_composed(conf_dir: Path, composed: DictConfig | dict[str, Any]) -> None:
    """`validate`, with the conf/ file and line that set the offending key in the ConfigError."""
    try:
        validate(composed)
    except ConfigError as exc:
        where = locate_key(conf_dir, str(exc)) or f"{display(conf_dir)}/"
        raise ConfigError(f"{where}: {exc}") from None


def locate_key(conf_dir: Path, message: str) -> str | None:
    """`file:line` of the one conf/ line setting the key quoted in `message` (`'train.epochz'` ->
    the line `epochz:`), or None."""
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


def check_params(root: Path) -> Config:
    """The `config` stage: `root/params.yaml` validated and equal to `conf/` composed with its
    header's overrides, else ConfigError naming the keys and the fix. Inside `dvc exp run -S` (no
    header: DVC composed it) the overrides are recorded instead, for `dvc exp apply`."""
    root = Path(root)
    values, overrides = load_params(root / "params.yaml")
    try:
        cfg = validate(values)
    except ConfigError as exc:
        where = locate_key(root / "conf", str(exc))
        raise ConfigError(f"params.yaml{f' (from {where})' if where else ''}: {exc}") from None
    composed: Any = OmegaConf.to_container(compose(root / "conf", overrides or []), resolve=True)
    validate_composed(root / "conf", composed)
    if overrides is None and in_dvc_experiment():
        overrides = record_overrides(root, composed, values)
        warn_data_from_conf(root, values, overrides)
        return cfg
    if diff := differences(composed, values):
        shown = ", ".join(f"{k} (conf/: {a!r}, params.yaml: {b!r})" for k, a, b in diff[:5])
        more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
        again = " ".join(["python -m pipeline.params", *map(shlex.quote, overrides or [])])
        raise ConfigError(
            f"params.yaml is out of date with conf/: {shown}{more}. Recompose it with "
            f"`{again}`, or `dvc exp run -S ...` (which recomposes it)."
        )
    return cfg


def record_overrides(root: Path, composed: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The overrides that turn `composed` (conf/ alone) into `values`, written as params.yaml's
    header when they reproduce it exactly."""
    overrides = overrides_between(composed, values)
    again = OmegaConf.to_container(compose(root / "conf", overrides), resolve=True)
    if json.dumps(again, sort_keys=True) == json.dumps(values, sort_keys=True):
        path = root / "params.yaml"
        text = path.read_text(encoding="utf-8")
        with atomic_file(path, key=None) as fh:
            fh.write(HEADER + json.dumps(overrides) + "\n" + text)
    return overrides


def overrides_between(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra overrides (`key=value`, `+key=value`, `~key`) that make the dict `a` into `b`."""
    found = []
    for key in [*a, *(k for k in b if k not in a)]:
        name = f"{prefix}{key}"
        if key not in b:
            found.append(f"~{name}")
        elif key not in a:
            found.append(f"+{name}={hydra_value(b[key])}")
        elif isinstance(a[key], dict) and isinstance(b[key], dict):
            found += overrides_between(a[key], b[key], f"{name}.")
        elif json.dumps(a[key]) != json.dumps(b[key]):
            found.append(f"{name}={hydra_value(b[key])}")
    return found


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar, strings quoted and never interpolated."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(hydra_value, value)) + "]"
    if isinstance(value, str):
        ends = r"(\\*)('|$)"  # a quote or the end, after n backslashes: 2n + 1 or 2n of them
        quoted = re.sub(ends, lambda m: m[1] * 2 + "\\" * len(m[2]) + m[2], literal(value))
        return f"'{quoted}'"
    return json.dumps(value)


def warn_data_from_conf(root: Path, values: dict[str, Any], overrides: list[str]) -> None:
    """Warn when `dvc exp run` (conf/ and its -S) took other data than the last run (dvc.lock)."""
    try:
        last = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
        last = last["prepare"]["params"]["params.yaml"]["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return
    was, now = (
        f"data.source={d.get('source')} data.path={d.get('path')}" for d in (last, values["data"])
    )
    asked = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if was != now and not asked & {"data", "data.source", "data.path"}:
        print(
            f"WARNING: this experiment reads {now} (from conf/), the last run (dvc.lock) {was}: "
            "`dvc exp run` composes conf/ with only its -S; keep photos with -S data=folder "
            "-S data.path=... or `python -m pipeline.params --use-folder PATH`.",
            file=sys.stderr,
        )
