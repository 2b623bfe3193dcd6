"""Using the trained model: digits a person would hand over, a model that stands on its own, bad input.

One real training (the default params, 10 epochs on the bundled sample) serves the module.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from stages.lib import images, params, registry, serving
from tests.conftest import ROOT, run, write_params
from tests.digits import render

PYTHON = sys.executable


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after download, normalize, train and evaluate with the default params."""
    path = tmp_path_factory.mktemp("trained")
    shutil.copytree(ROOT / "stages", path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    for stage in ("download", "normalize", "train", "evaluate"):
        run([PYTHON, "-m", f"stages.{stage}"], path)
    return path


def raw_test_split(project: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.load(project / "data/raw/dataset.npz")
    return raw["x_test"], raw["y_test"]


def predict_json(project: Path, files: list[Path], *extra: str) -> dict:
    proc = run([PYTHON, "-m", "stages.predict", "--json", *extra, *map(str, files)], project)
    return json.loads(proc.stdout)


def test_digits_drawn_as_a_person_would_are_read_correctly(trained: Path, tmp_path: Path) -> None:
    """200 test digits as black ink on paper, a few hundred pixels, off-centre, a third as JPEG."""
    x, y = raw_test_split(trained)
    rng = np.random.default_rng(7)
    files = [render(x[i], tmp_path / f"digit{i}.{'jpg' if i % 3 == 0 else 'png'}", rng) for i in range(200)]
    result = predict_json(trained, files)
    assert result["output"] == "probabilities"
    predicted = np.array([p["digit"] for p in result["predictions"]])
    agreement = float((predicted == y[:200]).mean())
    assert agreement >= 0.90, agreement
    for p in result["predictions"]:
        assert sum(p["outputs"]) == pytest.approx(1, abs=1e-4) and len(p["top"]) == 3


def test_untouched_28x28_originals_give_exactly_the_pipelines_outputs(trained: Path, tmp_path: Path) -> None:
    x, _ = raw_test_split(trained)
    files = []
    for i in range(50):
        Image.fromarray(x[i]).save(tmp_path / f"orig{i}.png")
        files.append(tmp_path / f"orig{i}.png")
    result = predict_json(trained, files)
    model, _ = serving.load(trained / "models")
    expected = model.predict(x[:50], verbose=0)
    got = np.array([p["outputs"] for p in result["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [p["digit"] for p in result["predictions"]] == expected.argmax(axis=1).tolist()


def test_the_saved_model_needs_nothing_but_keras(trained: Path, tmp_path: Path) -> None:
    """A user's script: no project on the path, raw uint8 images in, probabilities out."""
    x, _ = raw_test_split(trained)
    np.save(tmp_path / "x.npy", x[:100])
    script = textwrap.dedent(f"""
        import json, sys
        import keras, numpy as np
        model = keras.saving.load_model({str(trained / "models/model.keras")!r}, safe_mode=True)
        probabilities = model.predict(np.load("x.npy"), verbose=0)
        assert not any(name == "stages" or name.startswith("stages.") for name in sys.modules)
        print(json.dumps(probabilities.tolist()))
    """)
    proc = run([PYTHON, "-c", script], tmp_path)
    standalone = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert standalone.shape == (100, 10)
    np.testing.assert_allclose(standalone.sum(axis=1), 1, atol=1e-5)
    model, _ = serving.load(trained / "models")
    np.testing.assert_allclose(standalone, model.predict(x[:100], verbose=0), atol=1e-6)


def test_the_savedmodel_serves_the_same_probabilities(trained: Path) -> None:
    import tensorflow as tf

    x, _ = raw_test_split(trained)
    served = tf.saved_model.load(str(trained / "models/saved_model"))
    model, _ = serving.load(trained / "models")
    np.testing.assert_allclose(served.serve(tf.constant(x[:64])).numpy(), model.predict(x[:64], verbose=0), atol=1e-6)
    assert "serving_default" in served.signatures


def test_a_params_edit_after_training_does_not_change_what_evaluate_reads(trained: Path) -> None:
    before = (trained / "metrics/eval.json").read_text()
    card = json.loads((trained / "models/model.json").read_text())
    assert card["loss"] == "sparse_categorical_crossentropy" and card["input"]["dtype"] == "uint8"
    write_params(trained, {"train": {"loss": "binary_crossentropy", "from_logits": True}, "normalize": {}})
    try:
        run([PYTHON, "-m", "stages.evaluate"], trained)
    finally:
        shutil.copy(ROOT / "params.yaml", trained / "params.yaml")
    assert (trained / "metrics/eval.json").read_text() == before


def test_show_draws_the_input_what_the_model_saw_and_its_outputs(trained: Path, tmp_path: Path) -> None:
    x, _ = raw_test_split(trained)
    files = [render(x[i], tmp_path / f"d{i}.png", np.random.default_rng(i)) for i in range(3)]
    proc = run([PYTHON, "-m", "stages.predict", *map(str, files), "--show", str(tmp_path / "seen.png")], trained)
    assert len(proc.stdout.strip().splitlines()) == 3 and "probabilities: " in proc.stdout
    with Image.open(tmp_path / "seen.png") as picture:
        assert picture.size[0] > 600 and picture.size[1] > 400
        assert np.asarray(picture.convert("L")).std() > 20  # something was drawn


def test_bad_inputs_are_one_line_each_and_exit_2(trained: Path, tmp_path: Path) -> None:
    good = render(raw_test_split(trained)[0][0], tmp_path / "good.png", np.random.default_rng(0))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("L", (300, 200), 240).save(tmp_path / "blank.png")
    bad = ["empty.png", "notes.png", "blank.png", "missing.png"]
    proc = run([PYTHON, "-m", "stages.predict", str(good), *(str(tmp_path / b) for b in bad)], trained, check=False)
    assert proc.returncode == 2
    assert proc.stdout.startswith(f"{good}: ")  # the good file is still read
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert [line.split(":")[1].strip() for line in lines] == [str(tmp_path / b) for b in bad]
    assert "Traceback" not in proc.stderr

    missing_model = run([PYTHON, "-m", "stages.predict", str(good), "--model", str(tmp_path)], trained, check=False)
    assert missing_model.returncode == 2
    assert missing_model.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'model.keras'} not found; train a model first (dvc repro), or fetch one (dvc pull)"
    )


# --- the MNIST-style preparation, on its own (no model) ---


def ink_image(path: Path, *, dark_on_light: bool, size: tuple[int, int] = (400, 300), mode: str = "L") -> Path:
    """A thick 'L'-shaped stroke, off-centre, on a plain page."""
    page = np.full(size[::-1], 250 if dark_on_light else 5, dtype=np.uint8)
    ink = 20 if dark_on_light else 240
    page[60:220, 250:270] = ink  # vertical bar: 160 tall
    page[200:220, 250:330] = ink  # foot: 80 wide
    Image.fromarray(page).convert(mode).save(path)
    return path


def test_the_digit_is_framed_as_mnist_was(tmp_path: Path) -> None:
    _, seen = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    assert seen.max() == 255 and seen[0].max() == 0 and seen[:, 0].max() == 0  # light ink, dark border
    rows, cols = np.flatnonzero(seen.max(axis=1) > 50), np.flatnonzero(seen.max(axis=0) > 50)
    assert rows[-1] - rows[0] + 1 in (19, 20, 21)  # the longer side (height) scaled to 20
    assert cols[-1] - cols[0] + 1 in (9, 10, 11)  # 80 / 160 of it: the aspect ratio is kept
    cy, cx = (np.indices(seen.shape) * seen).reshape(2, -1).sum(axis=1) / seen.sum()
    assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75  # centre of mass at the centre


def test_dark_on_light_light_on_dark_colour_and_transparency_give_the_same_picture(tmp_path: Path) -> None:
    reference = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    inverted = images.load(ink_image(tmp_path / "b.png", dark_on_light=False))[1]
    colour = images.load(ink_image(tmp_path / "c.jpg", dark_on_light=True, mode="RGB"))[1]
    np.testing.assert_array_equal(inverted, reference)
    assert np.abs(colour.astype(int) - reference).max() <= 40  # JPEG artefacts only
    rgba = np.zeros((300, 400, 4), dtype=np.uint8)  # black strokes on a transparent canvas
    rgba[60:220, 250:270, 3] = 255
    rgba[200:220, 250:330, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "d.png")
    np.testing.assert_array_equal(images.load(tmp_path / "d.png")[1], reference)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), "an empty file"),
        ("text.jpg", lambda p: p.write_text("hello"), "not an image Pillow can read"),
        ("cut.png", lambda p: p.write_bytes(_png_bytes()[:300]), "cannot read the image"),
        ("blank.png", lambda p: Image.new("L", (200, 200), 250).save(p), "no ink found"),
        ("noise.png", lambda p: Image.new("L", (200, 200), 128).save(p), "no ink found"),
        ("huge.png", lambda p: Image.new("1", (6000, 5000), 1).save(p), "too large"),
        ("nothing.png", lambda p: None, "no such file"),
    ],
)
def test_each_bad_image_is_a_clear_error(tmp_path: Path, name: str, make: object, message: str) -> None:
    path = tmp_path / name
    make(path)  # type: ignore[operator]
    with pytest.raises(images.ImageError, match=message) as exc:
        images.load(path)
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# --- the shipped model for a loss trained on logits ---


def test_a_model_trained_on_logits_ships_probabilities(tmp_path: Path, small: dict) -> None:
    """from_logits: the output layer stays linear in training; the saved model adds the softmax."""
    p = params.parse({"train": {"loss": "categorical_crossentropy", "from_logits": True}})
    from stages import train

    core = train.build_model(p)
    core.compile(optimizer=registry.make_optimizer(p.train), loss=registry.make_loss(p.train))
    spec = registry.LOSSES["categorical_crossentropy"]
    core.fit(small["x_train"], registry.encode_labels(small["y_train"], spec), epochs=1, verbose=0)
    stats = {"method": "scale", "mean": 0.0, "std": 1.0}
    shipped = serving.standalone(core, stats, p.train, "softmax")
    serving.save(shipped, tmp_path / "models", serving.card("categorical_crossentropy", "softmax", stats))

    model, card = serving.load(tmp_path / "models")
    assert card["output"] == {"activation": "softmax", "meaning": "probabilities", "classes": list(range(10))}
    uint8 = np.rint(small["x_test"][:32] * 255).astype(np.uint8)
    logits = core.predict(uint8.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(model.predict(uint8, verbose=0), keras.ops.softmax(logits).numpy(), atol=1e-5)
    assert model.loss.get_config()["from_logits"] is False  # its compiled loss reads probabilities
    first = (tmp_path / "models/model.keras").read_bytes()
    serving.save(shipped, tmp_path / "again", serving.card("categorical_crossentropy", "softmax", stats))
    assert (tmp_path / "again/model.keras").read_bytes() == first  # same weights, same bytes
