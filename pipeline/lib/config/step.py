"""What every stage's thin Hydra entry point shares: where conf/ is, a pre-flight check of the
config file, validation, multirun outputs, and user errors as one line with exit status 2.

A stage module reads::

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def hydra_main(cfg: DictConfig) -> Any:
        return run_step(train, cfg)

    main = entry_point(hydra_main, __doc__, sections=("train", "model"))
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.lib.config.schema import Config, ConfigError, validate
from pipeline.lib.errors import StageInputError, UserError

__all__ = ["CONF_DIR", "StageInputError", "entry_point", "preflight", "run_step"]

log = logging.getLogger("pipeline")

#: The project's Hydra config folder, as an absolute path: Hydra resolves a relative
#: `config_path` against the calling module, which differs between `python -m` and an installed
#: console script.
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
#: The folder of the stage modules (`pipeline/`), which declare `hydra.main`.
STAGES_DIR = Path(__file__).resolve().parents[2]


def entry_point(
    hydra_main: Callable[[], Any], doc: str | None, sections: tuple[str, ...]
) -> Callable[[], Any]:
    """The `main()` of a stage (`python -m pipeline.<stage>`, the `truck-<stage>` script):
    `--help` prints what the step does and its main keys with their values in conf/; otherwise
    `preflight`, then Hydra."""

    def main() -> Any:
        """Print the step's help for -h/--help (returns None); else run `preflight` and then Hydra,
        returning what the Hydra main returns.
        """
        if {"-h", "--help"} & set(sys.argv[1:]):
            try:
                print(help_text(doc or "", sections))
            except UserError as exc:
                print(f"ERROR: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            return None
        preflight()
        return hydra_main()

    return main


def help_text(doc: str, sections: tuple[str, ...]) -> str:
    """The step's docstring, then the config sections it reads as conf/ composes them."""
    from omegaconf import OmegaConf

    from pipeline.lib.config.compose import compose

    cfg = compose(Path(CONF_DIR))
    keys = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, list(sections)))
    return (
        f"{doc.strip()}\n\nMain keys (conf/; override any as key=value, e.g. "
        f"`{sections[0]}.<key>=...`):\n\n{keys}\n"
        "Hydra: `-m` sweeps (one MLflow run per job), `--cfg job` prints the whole composed "
        "config, `--help-hydra` Hydra's own options. The DVC stages run the step on params.yaml "
        "(`--config-path .. --config-name params`)."
    )


def preflight(argv: list[str] | None = None) -> None:
    """Before Hydra starts: the primary config file named on the command line (`--config-path`,
    `--config-name`, as the DVC stages give `params.yaml`) parses as YAML, and
    `hydra.job.chdir=true` is refused. Exits with status 2 and one line naming the file and line
    (Hydra itself would print a stack trace)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_config_file(args)
        _check_overrides(args)
        if any(
            a.replace(" ", "") in ("hydra.job.chdir=true", "hydra.job.chdir=True") for a in args
        ):
            raise ConfigError(
                "hydra.job.chdir=true is not supported: the steps read and write paths relative "
                "to the project (paths.*). Leave it false; Hydra's run folder still gets the logs."
            )
    except UserError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _check_overrides(args: list[str]) -> None:
    """A run on conf/ (no `--config-name`, not a `-m` sweep): compose it with the command line's
    overrides first, so that a key that does not exist or a YAML error in conf/ is one line
    (Hydra would print its own multi-line text and exit 1)."""
    from pipeline.lib.config.compose import compose, validate_composed

    if _option(args, "--config-name") or _option(args, "-cn") or {"-m", "--multirun"} & set(args):
        return
    overrides = [a for a in args if not a.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]
    conf = Path(CONF_DIR)
    validate_composed(conf, OmegaConf.to_container(compose(conf, overrides)))


def _check_config_file(args: list[str]) -> None:
    from pipeline.lib.config.compose import load_params

    name = _option(args, "--config-name") or _option(args, "-cn")
    if not name:
        return
    # Hydra takes a relative --config-path from the folder of the module declaring hydra.main
    folder = STAGES_DIR / (_option(args, "--config-path") or _option(args, "-cp") or CONF_DIR)
    path = folder / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.is_file():
        load_params(path)


def in_multirun() -> bool:
    """True when running as one job of a Hydra multirun (`-m` sweep), False otherwise or outside
    Hydra.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_output_dir() -> Path | None:
    """The current Hydra job's output folder, or None when Hydra is not initialised."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def redirect_outputs(cfg: DictConfig, out_dir: Path) -> DictConfig:
    """A sweep job writes its models, reports and exports into its own Hydra job folder, never
    into the DVC-tracked paths that `dvc repro` owns (inputs such as prepared data stay shared)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.paths.models = str(out_dir / "models")
        cfg.paths.reports = str(out_dir / "reports")
        if "exports" in cfg.paths:
            cfg.paths.exports = str(out_dir / "exports")
        if "run_file" in cfg.paths:
            cfg.paths.run_file = str(out_dir / "mlflow_run.json")
    return cfg


def _refuse_chdir() -> None:
    """`hydra.job.chdir=true` set in a config file (the command line is checked by `preflight`)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().job.chdir:
        raise ConfigError(
            "hydra.job.chdir=true is not supported: the steps read and write paths relative to "
            "the project (paths.*). Set it back to false."
        )


def run_step(step: Callable[[Config], Any], cfg: DictConfig) -> Any:
    """Validate `cfg`, run `step`; turn user errors into a clear message and exit status 2."""
    try:
        _refuse_chdir()
        check_git_identity()
        if in_multirun() and "paths" in cfg:
            cfg = redirect_outputs(cfg, job_output_dir())  # type: ignore[arg-type]
        return step(validate(cfg))
    except UserError as exc:
        log.debug("%s", exc)  # the job's log file; the console gets the one line below
        print(f"ERROR: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class GitIdentityError(UserError):
    """`dvc exp run` will not be able to commit the experiment: git has no user name or email."""


def check_git_identity() -> None:
    """Inside `dvc exp run` (queued or not), fail before any work when git has no identity: DVC
    commits each experiment with `user.name`/`user.email` from git's config (or the
    GIT_AUTHOR_*/GIT_COMMITTER_* variables) and, without them, fails only after the whole
    pipeline has run ("Git user name and email must be configured"). Raises GitIdentityError."""
    import os
    import subprocess

    from pipeline.lib.config.compose import in_dvc_experiment

    if not in_dvc_experiment():
        return
    missing = []
    for key, env in (("user.name", "NAME"), ("user.email", "EMAIL")):
        if all(os.environ.get(f"GIT_{who}_{env}") for who in ("AUTHOR", "COMMITTER")):
            continue
        try:
            found = subprocess.run(
                ["git", "config", "--get", key], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return  # no git to ask: DVC will say it
        if not found.stdout.strip():
            missing.append(key)
    if missing:
        raise GitIdentityError(
            f"dvc exp run commits each experiment to git, and git has no {' and no '.join(missing)}: "
            'set them once (`git config --global user.name "Your Name"` and `git config --global '
            "user.email you@example.com`), then rerun `dvc exp run`"
        )
