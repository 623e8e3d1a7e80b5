#!/usr/bin/env python
"""The plain "study-style" Keras script the pipeline replaces (the benchmark's baseline).

    python benchmarks/study_script.py DATA_DIR [--epochs 8]

DATA_DIR holds training/, validation/ and test/, one folder per class (the synthetic generator's
layout). image_dataset_from_directory, a frozen MobileNetV2 (ImageNet weights from
~/.keras/models: no network) + Dense(K, softmax), `fit` for 8 epochs, `evaluate` on test. Prints
one JSON line: {"test_accuracy": ..., "seconds": ...}.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("--epochs", type=int, default=8)
args = parser.parse_args()
start = time.perf_counter()
tf.keras.utils.set_random_seed(42)


def load(split, shuffle):
    return keras.utils.image_dataset_from_directory(
        os.path.join(args.data, split),
        image_size=(224, 224),
        batch_size=32,
        label_mode="categorical",
        shuffle=shuffle,
        seed=42,
    )


train, val, test = load("training", True), load("validation", False), load("test", False)
base = keras.applications.MobileNetV2(
    input_shape=(224, 224, 3), include_top=False, weights="imagenet", pooling="avg"
)
base.trainable = False
inputs = keras.Input((224, 224, 3))
x = keras.applications.mobilenet_v2.preprocess_input(inputs)
outputs = keras.layers.Dense(len(train.class_names), activation="softmax")(base(x, training=False))
model = keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(train, validation_data=val, epochs=args.epochs, verbose=0)
_, accuracy = model.evaluate(test, verbose=0)
print(json.dumps({"test_accuracy": accuracy, "seconds": time.perf_counter() - start}))
