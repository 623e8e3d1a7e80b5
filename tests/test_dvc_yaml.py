"""`dvc.yaml` lists exactly what each stage depends on: the project modules its entry point
imports (transitively, function-level imports included, with the packages' `__init__.py` files
that importing them runs), and the conf/ files its params come from. A tool (predict, compare,
...) is never a stage dependency, so changing one reruns nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PACKAGE = "pipeline"
#: User tools: entry points no stage runs (`pipeline.params` is the `config` stage's).
TOOLS = ("predict", "compare", "registry", "ci_report", "plots_template", "crossval")


def module_file(module: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not the project's."""
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Project modules that `path` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            # `from pipeline.lib.reporting import figures`: figures is a module
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == PACKAGE and module_file(m)}


def closure(module: str) -> set[Path]:
    """Every project file that `import <module>` executes: the modules imported transitively and
    the `__init__.py` of each package on the way."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imported_modules(module_file(name), name))
    return {module_file(m).relative_to(ROOT) for m in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def entry_module(cmd: str) -> str:
    match = re.search(r"python -m (pipeline\.\w+)", cmd)
    assert match, f"stage command does not run a pipeline module: {cmd}"
    return match.group(1)


def code_deps(stage: dict) -> list[Path]:
    return [Path(d) for d in stage.get("deps", []) if str(d).startswith(f"{PACKAGE}/")]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


STAGES = sorted(stages())


@pytest.mark.parametrize("name", STAGES)
def test_every_imported_module_is_a_dependency(name):
    stage = stages()[name]
    needed = closure(entry_module(stage["cmd"]))
    deps = code_deps(stage)
    missing = sorted(str(p) for p in needed if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {name!r} misses deps: {missing}"


@pytest.mark.parametrize("name", STAGES)
def test_no_dependency_the_stage_does_not_import(name):
    stage = stages()[name]
    needed = closure(entry_module(stage["cmd"]))
    extra = []
    for dep in code_deps(stage):
        files = [ROOT / dep] if dep.suffix == ".py" else sorted((ROOT / dep).rglob("*.py"))
        extra += [
            str(f.relative_to(ROOT))
            for f in files
            if f.relative_to(ROOT) not in needed and "__pycache__" not in f.parts
        ]
    assert not extra, f"dvc.yaml stage {name!r} lists code it does not import: {extra}"


@pytest.mark.parametrize("name", STAGES)
def test_no_stage_imports_an_entry_point_or_tool(name):
    entry = entry_module(stages()[name]["cmd"])
    entries = {entry_module(s["cmd"]) for s in stages().values()} | {f"pipeline.{t}" for t in TOOLS}
    own = Path(*entry.split(".")).with_suffix(".py")
    others = sorted(
        str(p)
        for p in closure(entry)
        if p != own and p.with_suffix("").as_posix().replace("/", ".") in entries
    )
    assert not others, f"stage {name!r} imports other entry points: {others}"


def test_changing_a_tool_reruns_no_stage():
    stage_files = set().union(*(closure(entry_module(s["cmd"])) for s in stages().values()))
    for tool in TOOLS:
        own = closure(f"pipeline.{tool}") - stage_files
        assert Path(f"pipeline/{tool}.py") in own
        for name, stage in stages().items():
            hit = sorted(str(p) for p in own if covered(p, code_deps(stage)))
            assert not hit, f"stage {name!r} depends on {tool}'s code {hit}"


def test_the_closure_follows_function_level_and_aliased_imports(tmp_path):
    """The checker itself: a function-level `from pipeline.lib.reporting import figures as x`
    counts, and so do the packages' __init__ files."""
    found = closure("pipeline.train")
    assert Path("pipeline/lib/reporting/figures.py") in found
    assert Path("pipeline/lib/__init__.py") in found and Path("pipeline/__init__.py") in found
    assert Path("pipeline/predict.py") not in found


@pytest.mark.parametrize("name", [n for n in STAGES if n != "config"])
def test_a_stage_depends_on_the_conf_files_of_its_params(name):
    """An edit under conf/ makes `dvc status` list the stages whose params it feeds."""
    stage = stages()[name]
    deps = {str(d).rstrip("/") for d in stage.get("deps", [])}
    groups = {str(p).split(".")[0] for p in stage.get("params", [])}
    wanted = {"conf/config.yaml", "conf/experiment"} | {f"conf/{g}" for g in groups}
    assert wanted <= deps, f"stage {name!r} misses {sorted(wanted - deps)}"
    assert {d for d in deps if d.startswith("conf/")} <= wanted, f"stage {name!r}: extra conf deps"


def test_the_config_stage_guards_every_change_under_conf():
    config = stages()["config"]
    assert "conf" in config["deps"] and "params.yaml" in config["deps"]
    assert "pipeline.params --check" in config["cmd"]


def compact(files: set[Path]) -> list[str]:
    """`files` with every folder whose Python files are all in it written as the folder."""
    out = set(files)
    folders = sorted({p.parent for p in files}, key=lambda d: len(d.parts))
    for folder in folders:
        inside = {f.relative_to(ROOT) for f in (ROOT / folder).rglob("*.py")}
        inside = {f for f in inside if "__pycache__" not in f.parts}
        if (
            folder != Path(PACKAGE)
            and inside <= files
            and not any(o in folder.parents for o in out)
        ):
            out = {o for o in out if folder not in o.parents} | {folder}
    return sorted(str(p) for p in out)


def expected_code_deps() -> dict[str, list[str]]:
    """{stage: the project files and folders its entry point imports}: what dvc.yaml lists."""
    return {name: compact(closure(entry_module(stage["cmd"]))) for name, stage in stages().items()}


if __name__ == "__main__":  # print the code deps of each stage, to paste into dvc.yaml
    for stage_name, files in expected_code_deps().items():
        print(f"{stage_name}:")
        print("\n".join(f"      - {f}" for f in files))


#: train keys that change no stage output: where checkpoints go, whether to resume them, and
#: the cross-validation tool's fold count.
TRAIN_KEYS_WITHOUT_EFFECT = {"resume", "checkpoint_dir", "crossval_folds"}


def test_train_lists_every_train_key_that_changes_its_result():
    """A new `train.*` key in the schema must be a param of the train stage (or be named above
    as one without effect): DVC must see every change that matters."""
    from dataclasses import fields

    from pipeline.lib.config.schema import TrainConfig

    listed = {str(p).removeprefix("train.") for p in stages()["train"]["params"]}
    keys = {f.name for f in fields(TrainConfig)} - TRAIN_KEYS_WITHOUT_EFFECT
    assert keys <= listed, f"train params miss {sorted(keys - listed)}"
    assert not listed & TRAIN_KEYS_WITHOUT_EFFECT
