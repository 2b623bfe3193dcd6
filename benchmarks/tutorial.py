"""The tutorial's training script, fixed only so it runs on Keras 3: the baseline of `training.py`.

Flatten -> Dense(128, relu) -> Dense(10, sigmoid), binary_crossentropy, Adam, batch 32, plain
`model.fit` with validation_split 0.1. The one fix: binary_crossentropy needs one-hot labels
(the tutorial passed the digits, which Keras 3 refuses). Reads data/normalized/dataset.npz in
the current folder; writes {"fit_s", "test_accuracy"} as JSON to the path in argv[2].

    python benchmarks/tutorial.py EPOCHS OUT.json
"""

import json
import sys
import time

import keras
import numpy as np

epochs, out = int(sys.argv[1]), sys.argv[2]
data = np.load("data/normalized/dataset.npz")
x_train, y_train = data["x_train"], keras.utils.to_categorical(data["y_train"], 10)
model = keras.Sequential(
    [
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="sigmoid"),
    ]
)
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
start = time.perf_counter()
model.fit(x_train, y_train, epochs=epochs, batch_size=32, validation_split=0.1, verbose=0)
fit_s = time.perf_counter() - start
predicted = model.predict(data["x_test"], verbose=0).argmax(axis=1)
accuracy = float((predicted == data["y_test"]).mean())
with open(out, "w", encoding="utf-8") as f:
    json.dump({"fit_s": fit_s, "test_accuracy": accuracy}, f)
