"""The Keras model: build, features, saving, TFLite export and runner, batch prediction."""
