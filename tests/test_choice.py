"""The data choice lasts (pipeline.lib.data.choice, `python -m pipeline.params --use-folder`).

Case exp-run-overrides-revert-to-synthetic: DVC's Hydra integration composes conf/ again on every
`dvc exp run` with only that command's `-S` overrides, so the choice must live in conf/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib.config.schema import validate
from pipeline.lib.data.choice import DataChoiceError, choose, current_option
from pipeline.lib.data.sources.folder import DataError
from tests.conftest import ROOT


def project(tmp: Path) -> Path:
    root = tmp / "project"
    shutil.copytree(ROOT / "conf", root / "conf")
    return root


def photos(tmp: Path) -> Path:
    for rel in ("a/1.png", "a/2.png", "b/1.png", "b/2.png"):
        (tmp / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "photos" / rel).write_bytes(b"not decoded here")
    return tmp / "photos"


def dvc_compose(root: Path, *overrides: str) -> dict:
    """What `dvc exp run -S ...` writes to params.yaml (DVC's own function, DVC's arguments)."""
    from dvc.utils.hydra import compose_and_dump

    out = root / "dvc_params.yaml"
    compose_and_dump(out, str(root / "conf"), None, "config", str(root), list(overrides))
    return yaml.safe_load(out.read_text())


def test_use_folder_lasts_for_later_experiments(tmp_path, monkeypatch):
    root = project(tmp_path)
    folder = photos(tmp_path)
    monkeypatch.chdir(root)
    message = choose(root, ["--use-folder", str(folder)])
    assert str(folder) in message and "4 image files in 2 classes" in message
    assert current_option(root) == "photos"
    for overrides in ([], ["train.C=0.1"], ["experiment=smoke"]):
        data = dvc_compose(root, *overrides)["data"]
        assert (data["source"], data["path"]) == ("folder", str(folder))
        assert data["dependency"] == str(folder)  # what DVC's prepare stage watches
        assert data["split"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    written = yaml.safe_load((root / "params.yaml").read_text())
    assert validate(written).data.path == str(folder)
    # switching back is said explicitly, and lasts as well
    choose(root, ["--use-synthetic"])
    data = dvc_compose(root, "train.C=10")["data"]
    assert data["source"] == "synthetic" and data["path"] is None
    # the folder stays selectable by name
    assert dvc_compose(root, "data=photos")["data"]["path"] == str(folder)


def test_use_folder_refuses_a_missing_folder_and_changes_nothing(tmp_path, monkeypatch):
    root = project(tmp_path)
    monkeypatch.chdir(root)
    before = (root / "conf" / "config.yaml").read_text()
    with pytest.raises(DataError, match="does not exist"):
        choose(root, ["--use-folder", str(tmp_path / "nope")])
    assert (root / "conf" / "config.yaml").read_text() == before
    assert not (root / "conf" / "data" / "photos.yaml").exists()
    with pytest.raises(DataChoiceError, match="usage"):
        choose(root, ["--use-folder"])


def test_data_path_alone_never_reaches_the_synthetic_source(tmp_path):
    """Case synthetic-wipes-photo-folder: `-S data.path=X` without data=folder is refused."""
    from pipeline.lib.config.schema import ConfigError

    root = project(tmp_path)
    values = dvc_compose(root, f"data.path={tmp_path}")
    with pytest.raises(ConfigError, match="data.source=synthetic") as info:
        validate(values)
    assert "--use-folder" in str(info.value) and "\n" not in str(info.value)


def test_choosing_again_keeps_the_settings_the_user_added(tmp_path, monkeypatch):
    """photos.yaml invites `leakage: warn` etc. below the path: a new --use-folder keeps them."""
    root = project(tmp_path)
    folder = photos(tmp_path)
    monkeypatch.chdir(root)
    choose(root, ["--use-folder", str(folder)])
    conf = root / "conf" / "data" / "photos.yaml"
    conf.write_text(conf.read_text() + "leakage: warn\nimage_size: 160\n")
    other = tmp_path / "more"
    shutil.copytree(folder, other / "photos")
    choose(root, ["--use-folder", str(other / "photos")])
    data = dvc_compose(root)["data"]
    assert data["path"] == str(other / "photos")
    assert (data["leakage"], data["image_size"]) == ("warn", 160)


def test_the_project_or_a_folder_above_it_is_refused(tmp_path, monkeypatch):
    root = project(tmp_path)
    monkeypatch.chdir(root)
    before = (root / "conf" / "config.yaml").read_text()
    for folder in (root, root.parent, Path("/")):
        with pytest.raises(DataChoiceError, match="holds this project"):
            choose(root, ["--use-folder", str(folder)])
    assert (root / "conf" / "config.yaml").read_text() == before
    assert not (root / "conf" / "data" / "photos.yaml").exists()


def test_the_new_photos_yaml_is_known_to_git_so_queued_experiments_get_it(tmp_path, monkeypatch):
    """Case exp-apply-then-repro-refused: `dvc exp run --queue` copies only the files git knows;
    an untracked conf/data/photos.yaml failed every queued job ("Could not find 'data/photos'")."""
    root = project(tmp_path)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.chdir(root)
    choose(root, ["--use-folder", str(photos(tmp_path))])
    known = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout
    assert known.split() == ["conf/data/photos.yaml"]  # intent to add: its content is not staged
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True)
    assert " A conf/data/photos.yaml" in status.stdout.decode()


def test_no_git_mark_outside_git_or_under_dvc_no_scm(tmp_path, monkeypatch):
    """Not a git repository: nothing marked and the message does not say so. A project with DVC's
    `no_scm` inside another repository (a home folder kept in git): that index is left alone."""
    root = project(tmp_path / "plain")
    monkeypatch.chdir(root)
    said = choose(root, ["--use-folder", str(photos(tmp_path))])
    assert "git add" not in said and (root / "conf" / "data" / "photos.yaml").is_file()
    outer = tmp_path / "home"
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    root = project(outer)
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    said = choose(root, ["--use-folder", str(photos(tmp_path))])
    known = subprocess.run(["git", "ls-files"], cwd=outer, capture_output=True, text=True)
    assert known.stdout == "" and "git add" not in said


FULL_CONF = """
import resource, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from pipeline.lib.data.choice import choose
resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))  # EFBIG past 40 bytes, as a full disk
choose(Path({project!r}), ["--use-folder", {photos!r}])
"""


def test_a_full_disk_under_conf_is_one_line_without_a_paths_key(tmp_path):
    """conf/ cannot move to another disk: the advice is to free space (no paths.* key to set);
    conf/config.yaml is left as it was."""
    root, folder = project(tmp_path), photos(tmp_path)
    before = (root / "conf" / "config.yaml").read_text()
    code = FULL_CONF.format(root=str(ROOT), project=str(root), photos=str(folder))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.lib.files.NoSpaceError: No space left to write "), last
    assert "free some space on that disk. The partly" in last and "paths." not in last
    assert (root / "conf" / "config.yaml").read_text() == before
