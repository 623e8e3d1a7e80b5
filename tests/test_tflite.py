"""pipeline.lib.model.tflite.TFLiteRunner: float images in, float outputs out, whatever the
model's tensor types; on real TFLite flatbuffers converted from a tiny Keras model."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.lib.model.tflite import TFLiteRunner

SIZE = 8


@pytest.fixture(scope="module")
def tiny():
    """A tiny classifier (images 0..255 -> 3 probabilities) and its TFLite conversions."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from pipeline.lib.model.export import convert as convert_graph

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, SIZE, SIZE, 3)).astype(np.float32)

    def convert(fixed_batch: bool = False, int8: bool = False) -> bytes:
        spec = tf.TensorSpec([1 if fixed_batch else None, SIZE, SIZE, 3], tf.float32)
        fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        graph = convert_variables_to_constants_v2(fn)
        return convert_graph(graph, "int8" if int8 else "float32", images, "uint8")

    return {
        "images": images,
        "keras": np.asarray(model(images), dtype=np.float32),
        "float32": convert(),
        "fixed": convert(fixed_batch=True),
        "int8": convert(int8=True),
    }


def test_float_model_from_bytes_and_from_path_agree_with_keras(tiny, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(tiny["float32"])
    for source in (tiny["float32"], path, str(path)):
        runner = TFLiteRunner(source, num_threads=1)
        assert runner.input_shape == (1, SIZE, SIZE, 3) and runner.input_dtype == np.float32
        probs = runner(tiny["images"])
        assert probs.dtype == np.float32 and probs.shape == (10, 3)
        np.testing.assert_allclose(probs, tiny["keras"], atol=1e-5)


def test_batch_sizes_change_between_calls(tiny):
    runner = TFLiteRunner(tiny["float32"])
    np.testing.assert_allclose(runner(tiny["images"][:3]), tiny["keras"][:3], atol=1e-5)
    np.testing.assert_allclose(runner(tiny["images"][3:4]), tiny["keras"][3:4], atol=1e-5)
    np.testing.assert_allclose(runner(tiny["images"]), tiny["keras"], atol=1e-5)


def test_uint8_model_quantizes_input_and_dequantizes_output(tiny):
    runner = TFLiteRunner(tiny["int8"], num_threads=1)
    assert runner.input_dtype == np.uint8 and runner.output_dtype == np.uint8
    scale, zero_point = runner.output_quantization
    assert scale == pytest.approx(1 / 256) and zero_point == 0
    probs = runner(tiny["images"])
    assert probs.dtype == np.float32
    # dequantized probabilities (a wrong zero point or scale would not sum to 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.03)
    np.testing.assert_allclose(probs, tiny["keras"], atol=0.05)
    # uint8 pixels in (as cameras give them) = the same pixels as floats
    np.testing.assert_array_equal(runner(tiny["images"].astype(np.uint8)), probs)
    counts = runner.tensor_dtypes()
    assert counts.get("uint8", 0) >= 2 and counts.get("int8", 0) > 0 and "float32" not in counts


def test_quantize_rounds_and_clips(tiny):
    runner = TFLiteRunner(tiny["int8"])
    scale, zero_point = runner.input_quantization
    q = runner.quantize(np.array([-1e6, 0.0, 1e6], dtype=np.float32))
    assert q.dtype == np.uint8 and q.tolist() == [0, min(max(zero_point, 0), 255), 255]


def test_fixed_batch_model_runs_image_by_image(tiny):
    runner = TFLiteRunner(tiny["fixed"])
    assert runner.input_shape[0] == 1
    np.testing.assert_allclose(runner(tiny["images"]), tiny["keras"], atol=1e-5)


def test_not_a_model_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(ValueError, match="TensorFlow Lite"):
        TFLiteRunner(bad)
    with pytest.raises(ValueError, match="TensorFlow Lite"):
        TFLiteRunner(tmp_path / "missing.tflite")
