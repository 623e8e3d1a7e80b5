"""Hydra sweeps on Ray (hydra-ray-launcher, the `ray` extra): `conf/hydra/launcher/ray_cluster.yaml`.

The config targets an existing cluster (`address: auto`, or `$RAY_ADDRESS`, or `ray://host:10001`);
here the same config runs a real, local Ray instance (`address=null`: the driver starts one and
stops it at exit), so a 2-job sweep goes through Ray's scheduler and worker processes.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="needs the `ray` extra")

from tests.conftest import ROOT  # noqa: E402
from tests.test_sweeps import (  # noqa: E402
    check_best,
    data,  # noqa: F401  (a fixture, used by name)
    family,
    sweep,
)

pytestmark = pytest.mark.slow


def hydra_launcher(overrides: list[str]) -> dict:
    """`hydra.launcher` as `python -m pipeline.train -m <overrides>` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_ray_cluster_launcher_config_composes(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    node = hydra_launcher(["hydra/launcher=ray_cluster"])
    assert node["_target_"] == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert node["ray"]["init"] == {"address": "auto", "object_store_memory": None}
    assert node["ray"]["remote"] == {"num_cpus": 1}
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    assert (
        hydra_launcher(["hydra/launcher=ray_cluster"])["ray"]["init"]["address"]
        == "ray://head.example:10001"
    )
    node = hydra_launcher(
        ["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=ray://h:1"]
    )
    assert node["ray"]["init"]["address"] == "ray://h:1"


def test_two_job_sweep_on_ray(tmp_path, data, monkeypatch):  # noqa: F811  (fixture)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # local instance: no token written to ~/.ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    proc = sweep(
        tmp_path,
        data,
        "hydra/launcher=ray_cluster",
        "hydra.launcher.ray.init.address=null",
        "+hydra.launcher.ray.init.num_cpus=2",
        "train.C=0.001,0.01",
    )
    assert "Ray Launcher is launching 2 jobs" in proc.stdout + proc.stderr
    parent, children = family(tmp_path)
    assert sorted(c.data.params["train.C"] for c in children) == ["0.001", "0.01"]
    check_best(parent, children)
    for job in range(2):
        assert (tmp_path / "sweep" / str(job) / "models" / "model.keras").is_file()
