"""A stage's Hydra entry point: `main = entry_point(hydra_main, __doc__, sections)`, where
`hydra_main` (`@hydra.main(config_path=CONF_DIR, ...)`) returns `run_step(step, cfg)`."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.lib.config.compose import compose, in_dvc_experiment, load_params, validate_jobs
from pipeline.lib.config.schema import Config, ConfigError, literal, validate
from pipeline.lib.errors import UserError

log = logging.getLogger("pipeline")

#: conf/ as an absolute path (Hydra resolves a relative one against the calling module).
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
#: `pipeline/`, the folder of the stage modules, which a relative `--config-path` starts from.
STAGES_DIR = Path(__file__).resolve().parents[2]
CHDIR_REFUSED = "hydra.job.chdir=true is not supported (paths.* are project-relative): unset it"


def _fail(exc: UserError) -> SystemExit:
    print(f"ERROR: {exc}", file=sys.stderr)
    return SystemExit(2)


def entry_point(
    hydra_main: Callable[[], Any], doc: str | None, sections: tuple[str, ...]
) -> Callable[[], Any]:
    """A stage's `main()`: `--help` prints `doc` and the conf/ `sections` it reads; otherwise
    `preflight`, then Hydra."""

    def main() -> Any:
        if not {"-h", "--help"} & set(sys.argv[1:]):
            preflight()
            return hydra_main()
        try:
            keys = OmegaConf.to_yaml(OmegaConf.masked_copy(compose(Path(CONF_DIR)), list(sections)))
        except UserError as exc:
            raise _fail(exc) from None
        print(
            f"{(doc or '').strip()}\n\nMain keys (conf/; override any as key=value, e.g. "
            f"`{sections[0]}.<key>=...`):\n\n{keys}\nHydra: `-m` sweeps (one MLflow run per job), "
            "`--cfg job` prints the whole composed config, `--help-hydra` Hydra's own options. "
            "The DVC stages run the step on params.yaml (`--config-path .. --config-name params`)."
        )

    return main


def preflight(argv: list[str] | None = None) -> None:
    """Exit 2 with one line (not Hydra's stack trace) when the `--config-name` file is not YAML,
    conf/ with the overrides (each job of a sweep) does not validate, or `hydra.job.chdir=true`."""
    args = list(sys.argv[1:] if argv is None else argv)
    normalized = {a.replace(" ", "").lower() for a in args}
    try:
        name = _option(args, "--config-name") or _option(args, "-cn")
        if name:
            folder = _option(args, "--config-path") or _option(args, "-cp") or CONF_DIR
            path = STAGES_DIR / folder / (name if name.endswith(".yaml") else f"{name}.yaml")
            if path.is_file():
                load_params(path)
        else:
            multirun = {"-m", "--multirun"} & set(args) or "hydra.mode=multirun" in normalized
            validate_jobs(Path(CONF_DIR), overrides(args), bool(multirun))
        if "hydra.job.chdir=true" in normalized:
            raise ConfigError(CHDIR_REFUSED)
    except UserError as exc:
        raise _fail(exc) from None


#: Hydra's flags that take the next word as their value (`--info` only one of its choices).
VALUED_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
VALUED_FLAGS |= {"--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def overrides(args: list[str]) -> list[str]:
    """The config overrides among a step's command-line `args`: not Hydra's flags and their
    values (`--cfg job`, `--info config`), nor `hydra.*` settings."""
    found, i = [], 0
    while i < len(args):
        arg, after = args[i], args[i + 1] if i + 1 < len(args) else ""
        i += 1 + (arg in VALUED_FLAGS or arg in ("--info", "-i") and after in INFO_CHOICES)
        if not arg.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra")):
            found.append(arg)
    return found


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def in_multirun() -> bool:
    """True inside one job of a Hydra multirun (`-m` sweep)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_step(step: Callable[[Config], Any], cfg: DictConfig) -> Any:
    """Validate `cfg` and run `step` on it; a UserError becomes one line and exit status 2."""
    try:
        if HydraConfig.initialized() and HydraConfig.get().job.chdir:  # set in a config file
            raise ConfigError(CHDIR_REFUSED)
        check_git_identity()
        if in_multirun() and "paths" in cfg:  # outputs to the job's folder, not DVC's paths
            out = Path(HydraConfig.get().runtime.output_dir)
            paths = {k: str(out / k) for k in ("models", "reports", "exports")}
            paths["run_file"] = str(out / "mlflow_run.json")
            cfg = OmegaConf.merge(cfg, {"paths": literal(paths)})  # type: ignore[assignment]
        return step(validate(literal_file_values(cfg)))
    except UserError as exc:
        log.debug("%s", exc)  # the job's log file; the console gets the one line
        raise _fail(exc) from None


def literal_file_values(cfg: DictConfig) -> DictConfig:
    """`cfg` with each string its `--config-name` file (params.yaml, resolved already) holds as
    written made literal: its `${` is never interpolated."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None or hydra.job.config_name in (None, "config"):
        return cfg
    folder = [s.path for s in hydra.runtime.config_sources if s.provider == "main"][0]
    path = Path(folder.removeprefix("file://")) / f"{Path(hydra.job.config_name).stem}.yaml"

    def keep(node: Any, file: Any) -> Any:
        if isinstance(node, dict) and isinstance(file, dict):
            return {k: keep(v, file.get(k)) for k, v in node.items()}
        return literal(node) if isinstance(node, str) and node == file else node

    written = _file_values(path, path.stat().st_mtime_ns) if path.is_file() else {}
    return OmegaConf.create(keep(OmegaConf.to_container(cfg, resolve=False), written))


@functools.lru_cache(maxsize=4)  # read once per sweep, not per job (50 ms), again when it changes
def _file_values(path: Path, mtime_ns: int) -> dict:
    return load_params(path)[0]


class GitIdentityError(UserError):
    """`dvc exp run` could not commit the experiment: git has no user name or email."""


def check_git_identity() -> None:
    """Inside `dvc exp run`, GitIdentityError before any work when git has no user.name or
    user.email (config or GIT_AUTHOR_*/GIT_COMMITTER_*): DVC would fail after the pipeline."""
    if not in_dvc_experiment():
        return
    missing = []
    for key, env in (("user.name", "NAME"), ("user.email", "EMAIL")):
        if all(os.environ.get(f"GIT_{who}_{env}") for who in ("AUTHOR", "COMMITTER")):
            continue
        try:
            found = subprocess.run(["git", "config", "--get", key], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return  # no git to ask: DVC will say it
        if not found.stdout.strip():
            missing.append(key)
    if missing:
        raise GitIdentityError(
            f"dvc exp run commits each experiment to git, and git has no "
            f"{' and no '.join(missing)}: set them once (`git config --global user.name "
            '"Your Name"` and `git config --global user.email you@example.com`), then rerun '
            "`dvc exp run`"
        )
