"""`keras_archive`: a `.keras` archive whose bytes depend on the model only (no save date)."""

from __future__ import annotations

import json
import time
import zipfile

import numpy as np

from pipeline.lib.model.build import build_feature_extractor, build_head, compose, load_model
from pipeline.lib.model.saving import FIXED_DATE, keras_archive


def small_model(seed: int = 0):
    import keras

    extractor = build_feature_extractor(0.35, None, 32, init_seed=0)
    keras.utils.set_random_seed(seed)  # the head's initial weights
    return compose(extractor, build_head(1280, 3, 0.0, init="glorot_uniform"))


def save_model(model, path):
    path.write_bytes(keras_archive(model))


def test_the_same_model_saved_twice_gives_the_same_bytes(tmp_path):
    model = small_model()
    save_model(model, tmp_path / "a.keras")
    time.sleep(1.1)  # Keras' date_saved has a resolution of one second
    save_model(small_model(), tmp_path / "b.keras")  # built again, as a second run would
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.keras") as archive:
        assert archive.namelist() == sorted(archive.namelist())
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert json.loads(archive.read("metadata.json"))["date_saved"] == FIXED_DATE


def test_other_weights_give_another_file_that_loads_as_the_model(tmp_path):
    model, other = small_model(0), small_model(1)
    save_model(model, tmp_path / "a.keras")
    save_model(other, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() != (tmp_path / "b.keras").read_bytes()
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    loaded = load_model(tmp_path / "b.keras")
    np.testing.assert_array_equal(
        loaded.predict(images, verbose=0), other.predict(images, verbose=0)
    )


def test_a_model_saved_by_another_process_gives_the_same_bytes(tmp_path):
    """Keras writes memory addresses (`shared_object_id`) into config.json: they must not reach
    the file, or every run of train would change the DVC output `models`."""
    import subprocess
    import sys

    save_model(small_model(), tmp_path / "here.keras")
    code = (
        "import sys; sys.path.insert(0, '.'); from tests.test_saving import small_model; "
        "from pipeline.lib.model.saving import keras_archive; "
        f"open({str(tmp_path / 'there.keras')!r}, 'wb').write(keras_archive(small_model()))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "here.keras").read_bytes() == (tmp_path / "there.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "here.keras") as archive:
        config = archive.read("config.json").decode()
    assert '"shared_object_id": 1' in config  # renumbered, not an address
