"""Using the trained model: digits a person would hand over, a model that stands on its own, bad input.

The tests' trained project (the committed params, 10 epochs on the bundled sample; tests/harness.py,
built once per test run) serves the module, in one copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import images
from pipeline import losses, optimizers, params, serving
from pipeline.errors import StageError
from tests.digits import (
    TWISTS,
    alpha_only,
    animated,
    floating,
    oriented,
    page,
    pencil_scan,
    png_rgb16,
    render,
    sixteen_bit,
)
from tests.harness import ENV, ROOT, run, trained_project, write_params

PYTHON = sys.executable


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after download, normalize, train and evaluate with the default params."""
    return trained_project(tmp_path_factory.mktemp("trained") / "p")


def raw_test_split(project: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.load(project / "data/raw/dataset.npz")
    return raw["x_test"], raw["y_test"]


def predict_json(project: Path, files: list[Path], *extra: str) -> dict:
    proc = run([PYTHON, "-m", "commands.predict", "--json", *extra, *map(str, files)], project)
    return json.loads(proc.stdout)


@pytest.mark.pipeline(seconds=3)
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


@pytest.mark.pipeline(seconds=3)
def test_untouched_28x28_originals_give_exactly_the_pipelines_outputs(trained: Path, tmp_path: Path) -> None:
    x, _ = raw_test_split(trained)
    files = []
    for i in range(50):
        Image.fromarray(x[i]).save(tmp_path / f"orig{i}.png")
        files.append(tmp_path / f"orig{i}.png")
    result = predict_json(trained, files)
    model, _ = serving.load(trained / "models")
    expected = model.predict(x[:50])
    got = np.array([p["outputs"] for p in result["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [p["digit"] for p in result["predictions"]] == expected.argmax(axis=1).tolist()


@pytest.mark.pipeline(seconds=3)
def test_the_saved_model_needs_nothing_but_keras(trained: Path, tmp_path: Path) -> None:
    """A user's script: no project on the path, raw uint8 images in, probabilities out."""
    x, _ = raw_test_split(trained)
    np.save(tmp_path / "x.npy", x[:100])
    script = textwrap.dedent(f"""
        import json, sys
        import keras, numpy as np
        model = keras.saving.load_model({str(trained / "models/model.keras")!r}, safe_mode=True)
        probabilities = model.predict(np.load("x.npy"), verbose=0)
        assert not [n for n in sys.modules if n.split(".")[0] in ("stages", "pipeline", "commands")]
        print(json.dumps(probabilities.tolist()))
    """)
    proc = run([PYTHON, "-c", script], tmp_path)
    standalone = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert standalone.shape == (100, 10)
    np.testing.assert_allclose(standalone.sum(axis=1), 1, atol=1e-5)
    model, _ = serving.load(trained / "models")
    np.testing.assert_allclose(standalone, model.predict(x[:100]), atol=1e-6)


@pytest.mark.pipeline(seconds=3)
def test_the_savedmodel_serves_the_same_probabilities(trained: Path) -> None:
    import tensorflow as tf

    x, _ = raw_test_split(trained)
    served = tf.saved_model.load(str(trained / "models/saved_model"))
    model, _ = serving.load(trained / "models")
    np.testing.assert_allclose(served.serve(tf.constant(x[:64])).numpy(), model.predict(x[:64]), atol=1e-6)
    assert "serving_default" in served.signatures


@pytest.mark.pipeline(seconds=3)
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


@pytest.mark.pipeline(seconds=3)
def test_show_draws_the_input_what_the_model_saw_and_its_outputs(trained: Path, tmp_path: Path) -> None:
    x, _ = raw_test_split(trained)
    files = [render(x[i], tmp_path / f"d{i}.png", np.random.default_rng(i)) for i in range(3)]
    proc = run([PYTHON, "-m", "commands.predict", *map(str, files), "--show", str(tmp_path / "seen.png")], trained)
    assert len(proc.stdout.strip().splitlines()) == 3 and "probabilities: " in proc.stdout
    with Image.open(tmp_path / "seen.png") as picture:
        assert picture.size[0] > 600 and picture.size[1] > 400
        assert np.asarray(picture.convert("L")).std() > 20  # something was drawn


@pytest.mark.pipeline(seconds=3)
def test_bad_inputs_are_one_line_each_and_exit_2(trained: Path, tmp_path: Path) -> None:
    good = render(raw_test_split(trained)[0][0], tmp_path / "good.png", np.random.default_rng(0))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("L", (300, 200), 240).save(tmp_path / "blank.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # endless
    bad = ["empty.png", "notes.png", "blank.png", "missing.png", "pipe.png", "zero.png"]
    proc = run([PYTHON, "-m", "commands.predict", str(good), *(str(tmp_path / b) for b in bad)], trained, check=False)
    assert proc.returncode == 2
    assert proc.stdout.startswith(f"{good}: ")  # the good file is still read
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert [line.split(":")[1].strip() for line in lines] == [str(tmp_path / b) for b in bad]
    assert lines[0].endswith("an empty file; give PNG, JPEG, BMP, GIF, TIFF or WebP files")
    assert "not a regular file (a FIFO or a device)" in lines[4] and "not a regular file" in lines[5]
    assert "Traceback" not in proc.stderr

    (tmp_path / "file.txt").write_text("")
    for show, said in [
        (tmp_path / "out.txt", "give a picture file name ending in .png"),
        (tmp_path, "is a folder; give a file in it"),
        (tmp_path / "file.txt" / "seen.png", "file.txt is a file, not a folder"),
    ]:
        proc = run([PYTHON, "-m", "commands.predict", str(good), "--show", str(show)], trained, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --show {show}") and said in proc.stderr
        assert "previous outputs" not in proc.stderr  # predict writes no pipeline output

    missing_model = run([PYTHON, "-m", "commands.predict", str(good), "--model", str(tmp_path)], trained, check=False)
    assert missing_model.returncode == 2
    assert missing_model.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'model.tflite'} not found; train a model first (dvc repro), or fetch one (dvc pull)"
    )


@pytest.mark.pipeline(seconds=3)
def test_names_that_are_not_utf8_or_were_split_at_a_space_still_get_their_predictions(
    trained: Path, tmp_path: Path
) -> None:
    good = render(raw_test_split(trained)[0][0], tmp_path / "good.png", np.random.default_rng(0))
    latin1 = tmp_path / os.fsdecode(b"caf\xe9 \xa91998\n.png")  # an old camera's Latin-1 name (and a newline)
    spaced = tmp_path / "my digit.png"
    shutil.copy(good, latin1)
    shutil.copy(good, spaced)
    seen = tmp_path / "seen.png"
    args = [str(latin1), str(good), *str(spaced).split(" "), "--show", str(seen)]  # as `make predict IMG=...` split it
    proc = run([PYTHON, "-m", "commands.predict", *args], trained, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{tmp_path}/caf\\xe9 \\xa91998\\n.png", str(good)]
    assert len({line.split(": ", 1)[1] for line in lines}) == 1  # the same picture, the same answer
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {spaced}: given as 2 names ({tmp_path}/my, digit.png); quote a name with spaces: "
        f"python -m commands.predict '{spaced}', or make predict IMG=\"'{spaced}'\""
    )
    with Image.open(seen) as picture:
        assert picture.size[1] > 400  # both rows drawn
    as_json = predict_json(trained, [latin1])["predictions"][0]
    assert as_json["file"] == f"{tmp_path}/caf\\xe9 \\xa91998\\n.png"


@pytest.mark.pipeline(seconds=3)
def test_a_reader_that_goes_away_ends_predict_quietly(trained: Path) -> None:
    files = [str(ROOT / "data/examples/digit-1.png")] * 400  # more than a pipe holds
    command = f"{PYTHON} -m commands.predict --json {' '.join(files)} | head -1; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", command], cwd=trained, env=ENV, capture_output=True, text=True, check=False)
    assert proc.stdout == "{\n" and proc.stderr == "" and proc.returncode == 141  # 128 + SIGPIPE, as `cat` ends


# --- images as people's devices make them: each read as the plain page ---

TWISTED_DIGITS = 40  # each twist read as its plain page: 40 of 40 (and 100 of 100) with the trained project


def plain(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    drawn.save(path)
    return path


@pytest.fixture(scope="module")
def twisted(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, list[str]]]:
    """40 test digits each drawn once, saved plain (PNG) and with every twist of tests/digits.py,
    all read by one `predict --json`: per kind, the digits read (-1: refused) and its error lines."""
    x, _ = raw_test_split(trained)
    folder = tmp_path_factory.mktemp("twisted")
    rng = np.random.default_rng(14)
    kinds = {"plain": (".png", plain), **TWISTS}
    files: dict[str, list[Path]] = {name: [] for name in kinds}
    for i in range(TWISTED_DIGITS):
        drawn = page(x[i], rng)
        for k, (name, (suffix, make)) in enumerate(kinds.items()):
            files[name].append(make(drawn, folder / f"{i}-{k}{suffix}", rng))
    everything = [str(f) for fs in files.values() for f in fs]
    proc = run([PYTHON, "-m", "commands.predict", "--json", *everything], trained, check=False)
    assert proc.returncode in (0, 2) and proc.stdout, proc.stderr[-3000:]
    read = {p["file"]: p["digit"] for p in json.loads(proc.stdout)["predictions"]}
    kind_of = {str(f): name for name, fs in files.items() for f in fs}
    errors: dict[str, list[str]] = {name: [] for name in kinds}
    for line in proc.stderr.splitlines():
        if line.startswith("error: ") and line.split(": ")[1] in kind_of:
            errors[kind_of[line.split(": ")[1]]].append(line)
    return {name: (np.array([read.get(str(f), -1) for f in fs]), errors[name]) for name, fs in files.items()}


@pytest.mark.pipeline(seconds=12)  # with the fixture: 40 pages drawn 21 ways, read by one predict
def test_every_plain_page_is_read(twisted: dict[str, tuple[np.ndarray, list[str]]]) -> None:
    digits, errors = twisted["plain"]
    assert len(digits) == TWISTED_DIGITS and (digits >= 0).all() and not errors


@pytest.mark.pipeline(seconds=0.1)
@pytest.mark.parametrize("kind", list(TWISTS))
def test_a_page_saved_as_a_device_saves_it_reads_as_the_plain_page(
    twisted: dict[str, tuple[np.ndarray, list[str]]], kind: str
) -> None:
    """Phone JPEGs in all 8 EXIF orientations, 16-bit and float files, a faint 16-bit pencil
    scan, ink only in the alpha channel, animations: at least 95% read as the plain PNG."""
    digits, errors = twisted[kind]
    agreement = float(((digits == twisted["plain"][0]) & (digits >= 0)).mean())
    assert agreement >= 0.95, (agreement, errors[:3])


# --- the MNIST-style preparation, on its own (no model) ---


def stroke(*, dark_on_light: bool = True, size: tuple[int, int] = (400, 300)) -> np.ndarray:
    """A thick 'L'-shaped stroke, off-centre, on a plain page: uint8 (height, width)."""
    drawn = np.full(size[::-1], 250 if dark_on_light else 5, dtype=np.uint8)
    ink = 20 if dark_on_light else 240
    drawn[60:220, 250:270] = ink  # vertical bar: 160 tall
    drawn[200:220, 250:330] = ink  # foot: 80 wide
    return drawn


def ink_image(path: Path, *, dark_on_light: bool, size: tuple[int, int] = (400, 300), mode: str = "L") -> Path:
    """`stroke` saved to `path` in `mode`."""
    Image.fromarray(stroke(dark_on_light=dark_on_light, size=size)).convert(mode).save(path)
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


# --- images as people's devices make them, read as a viewer shows them (no model) ---


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_as_a_viewer_shows_it(tmp_path: Path, orientation: int) -> None:
    """Pixels stored turned or mirrored (numpy, from the EXIF spec) come back upright, in every format."""
    upright = Image.fromarray(stroke())  # an L: any turn or mirror shows
    for suffix in (".png", ".tif", ".webp"):  # lossless: exactly the upright page
        path = oriented(upright, tmp_path / f"photo{suffix}", orientation)
        np.testing.assert_array_equal(images.read_gray(path), stroke(), err_msg=suffix)
    photo = images.read_gray(oriented(upright, tmp_path / "photo.jpg", orientation))
    assert photo.shape == (300, 400) and np.abs(photo - stroke()).mean() < 2  # JPEG artefacts only


def test_exif_that_cannot_be_parsed_is_ignored_as_viewers_ignore_it(tmp_path: Path) -> None:
    for suffix in (".png", ".jpg", ".webp"):
        Image.fromarray(stroke()).save(tmp_path / f"odd{suffix}", exif=b"Exif\x00\x00not a TIFF header")
        assert images.read_gray(tmp_path / f"odd{suffix}").shape == (300, 400)


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda d, p: sixteen_bit(d, p.with_suffix(".png")), "I;16"),
        (lambda d, p: sixteen_bit(d, p.with_suffix(".tif"), ">"), "I;16B"),
        (lambda d, p: png_rgb16(d, p.with_suffix(".png")), "RGB"),  # Pillow reads it as 8-bit, scaled
        (lambda d, p: floating(d, p.with_suffix(".tif"), 1.0), "F"),
        (lambda d, p: floating(d, p.with_suffix(".tif"), 255.0), "F"),
        (lambda d, p: _save(np.asarray(d, np.int32) * 257, p.with_suffix(".tif")), "I"),  # 0..65535
        (lambda d, p: _save(np.asarray(d, np.int32), p.with_suffix(".tif")), "I"),  # 0..255
    ],
    ids=["16-bit PNG", "16-bit big-endian TIFF", "16-bit RGB PNG", "float 0..1", "float 0..255", "int32 16", "int32 8"],
)
def test_any_bit_depth_or_float_range_is_scaled_not_clipped(tmp_path: Path, make: object, mode: str) -> None:
    path = make(Image.fromarray(stroke()), tmp_path / "scan")  # type: ignore[operator]
    with Image.open(path) as img:
        assert img.mode == mode  # the mode under test is the one Pillow gives
    np.testing.assert_allclose(images.read_gray(path), stroke(), atol=1e-3)
    np.testing.assert_array_equal(
        images.load(path)[1], images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    )


@pytest.mark.parametrize(
    ("dtype", "values", "expected"),
    [
        (np.float32, [0, 0.5, 1], [0, 127.5, 255]),  # largest value at most 1: 0..1
        (np.float32, [0, 1.5, 255], [0, 1.5, 255]),  # at most 255: 0..255
        (np.float32, [0, 257, 65535], [0, 1, 255]),  # at most 65535: 0..65535
        (np.float32, [0, 5e5, 1e6], [0, 127.5, 255]),  # beyond: 0 to its largest value
        (np.float32, [-0.5, 0, 1], [0, 0, 255]),  # below 0 is black
        (np.int32, [0, 100, 255], [0, 100, 255]),
        (np.int32, [0, 257, 65535], [0, 1, 255]),
        ("<u2", [0, 257, 1285], [0, 1, 5]),  # 16-bit: always 0..65535, however dark
        (">u2", [0, 257, 65535], [0, 1, 255]),
    ],
)
def test_high_bit_depths_are_scaled_by_the_range_they_use(dtype: object, values: list, expected: list) -> None:
    gray = images.gray_levels(Image.fromarray(np.array([values], dtype=dtype)))  # type: ignore[call-overload]
    assert gray.dtype == np.float32
    np.testing.assert_allclose(gray, [expected], rtol=1e-6, atol=1e-4)


def test_nan_or_infinite_values_are_a_clear_error(tmp_path: Path) -> None:
    values = stroke().astype(np.float32)
    values[0, 0] = np.nan
    _save(values, tmp_path / "nan.tif")
    with pytest.raises(
        images.ImageError, match=r"nan.tif: cannot read the image \(its values include NaN or infinity\)"
    ):
        images.load(tmp_path / "nan.tif")


def test_a_faint_16_bit_pencil_scan_reads_as_the_page_and_a_fainter_one_is_blank(tmp_path: Path) -> None:
    """The issue's scan (ink at 12% of full scale on 94% paper) and paler pencil; under 40 grey
    levels (16%) of contrast is blank, as in 8 bits."""
    reference = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    rng = np.random.default_rng(0)
    for pencil, paper in [(0.12, 0.94), (0.55, 0.94), (0.70, 0.90)]:
        scan = pencil_scan(Image.fromarray(stroke()), tmp_path / "scan.tif", rng, pencil, paper)
        assert np.abs(images.load(scan)[1].astype(int) - reference).max() <= 60, (pencil, paper)  # sensor noise
    faint = pencil_scan(Image.fromarray(stroke()), tmp_path / "faint.tif", rng, 0.85, 0.94)
    with pytest.raises(images.NoInkError, match="no ink found"):
        images.load(faint)


@pytest.mark.parametrize("colour", [(255, 255, 255), (255, 240, 120), (200, 200, 200), (0, 0, 128)])
def test_ink_only_in_the_alpha_channel_is_read(tmp_path: Path, colour: tuple[int, int, int]) -> None:
    """One colour for every stroke, the canvas transparent: white and pale ink vanish on white
    paper, so the opacity is the ink; dark ink reads as before."""
    reference = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    canvas = alpha_only(Image.fromarray(stroke()), tmp_path / "canvas.png", colour)
    np.testing.assert_array_equal(images.load(canvas)[1], reference)


def test_a_uniform_colour_with_the_ink_in_alpha_reads_in_every_transparent_mode(tmp_path: Path) -> None:
    reference = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    opacity = np.where(stroke() == 20, 255, 0).astype(np.uint8)  # a GIF's transparency is all or nothing
    la = np.stack([np.full_like(opacity, 255), opacity], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")  # white everywhere, canvas pixels included
    Image.fromarray(la, "LA").convert("RGBA").save(tmp_path / "web.gif")  # palette + a transparent index
    for name in ("la.png", "web.gif"):
        np.testing.assert_array_equal(images.load(tmp_path / name)[1], reference, err_msg=name)


def test_an_opaque_sheet_on_a_transparent_canvas_is_read_by_its_ink_not_its_outline(tmp_path: Path) -> None:
    reference = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    rgba = np.zeros((300, 400, 4), dtype=np.uint8)  # transparent
    rgba[20:280, 200:380] = (250, 250, 250, 255)  # a sheet of paper, opaque...
    rgba[..., :3][stroke() == 20] = 20  # ...with the stroke drawn on it
    Image.fromarray(rgba).save(tmp_path / "sheet.png")
    np.testing.assert_array_equal(images.load(tmp_path / "sheet.png")[1], reference)


def test_a_fully_transparent_image_is_blank(tmp_path: Path) -> None:
    Image.new("RGBA", (200, 200), (255, 255, 255, 0)).save(tmp_path / "clear.png")
    with pytest.raises(images.NoInkError, match="clear.png: no ink found"):
        images.load(tmp_path / "clear.png")


@pytest.mark.parametrize("suffix", [".gif", ".tif", ".webp"])
def test_the_first_frame_is_read_and_a_blank_one_is_named_as_the_cause(tmp_path: Path, suffix: str) -> None:
    reference = images.load(ink_image(tmp_path / "a.png", dark_on_light=True))[1]
    drawn = Image.fromarray(stroke())
    np.testing.assert_array_equal(images.load(animated(drawn, tmp_path / f"first{suffix}"))[1], reference)
    blank_first = animated(drawn, tmp_path / f"later{suffix}", first_blank=True)
    with pytest.raises(images.NoInkError) as exc:
        images.load(blank_first)
    assert str(exc.value) == (
        f"{blank_first}: has 3 frames; only the first is read, and it is blank (save the digit's frame on its own)"
    )


def _save(values: np.ndarray, path: Path) -> Path:
    Image.fromarray(values).save(path)
    return path


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# --- the shipped model for a loss trained on logits ---


def test_a_model_trained_on_logits_ships_probabilities(tmp_path: Path, small: dict) -> None:
    """from_logits: the output layer stays linear in training; the saved model adds the softmax."""
    import keras

    from pipeline import export
    from stages import train

    p = params.parse({"train": {"loss": "categorical_crossentropy", "from_logits": True}})
    wiring = losses.head("categorical_crossentropy", from_logits=True)
    assert (wiring.activation, wiring.output) == ("linear", "softmax")
    core = train.build_model(p.model, wiring)
    optimizer = optimizers.build(p.train.optimizer, p.train.lr_schedule)
    loss = losses.build(p.train.loss, p.train.loss_args, from_logits=True)
    core.compile(optimizer=optimizer, loss=loss, run_eagerly=True)  # eager: 8 steps need no tracing
    spec = losses.LOSSES["categorical_crossentropy"]
    core.fit(small["x_train"][:256], losses.encode_labels(small["y_train"][:256], spec), epochs=1, verbose=0)
    stats = {"method": "scale", "mean": 0.0, "std": 1.0}
    shipped = export.standalone(core, stats, p.train, wiring, optimizer)
    export.save(shipped, tmp_path / "models", serving.card("categorical_crossentropy", wiring, stats))

    model, card = serving.load(tmp_path / "models")
    assert card["output"] == {"activation": "softmax", "meaning": "probabilities", "classes": list(range(10))}
    uint8 = np.rint(small["x_test"][:32] * 255).astype(np.uint8)
    logits = core.predict(uint8.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(model.predict(uint8), keras.ops.softmax(logits).numpy(), atol=1e-5)
    keras_model = keras.saving.load_model(tmp_path / "models/model.keras", safe_mode=True)
    assert keras_model.loss.get_config()["from_logits"] is False  # its compiled loss reads probabilities
    export.save(shipped, tmp_path / "again", serving.card("categorical_crossentropy", wiring, stats))
    for name in ("model.keras", "model.tflite", "model.json"):  # same weights, same bytes
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "models" / name).read_bytes(), name


# --- a model and a card that do not belong together, a model that holds code ---------------------


def tiny_shipped(folder: Path, activation: str) -> Path:
    """An untrained uint8-in model (one Dense layer, `activation`) saved as train saves one, with a card for
    categorical crossentropy."""
    import keras

    from pipeline import export

    layers = [keras.layers.Dense(10, activation=activation)]
    model = keras.Sequential([keras.Input((28, 28), dtype="uint8"), keras.layers.Flatten(), *layers])
    model.compile(loss="categorical_crossentropy")
    stats = {"method": "scale", "mean": 0.0, "std": 1.0}
    wiring = losses.head("categorical_crossentropy")
    export.save(model, folder, serving.card("categorical_crossentropy", wiring, stats))
    return folder


def test_a_card_from_another_model_is_one_line(tmp_path: Path) -> None:
    one = tiny_shipped(tmp_path / "one", "softmax")
    two = tiny_shipped(tmp_path / "two", "sigmoid")
    (one / "model.json").write_bytes((two / "model.json").read_bytes())  # another run's card beside it
    with pytest.raises(StageError, match=r"model.json describes another model than .*model.tflite"):
        serving.load(one)


def test_a_damaged_litert_model_whose_card_matches_is_one_line(tmp_path: Path) -> None:
    """Not a flatbuffer at all (the card's sha256 made to match): LiteRT's refusal becomes one line."""
    folder = tiny_shipped(tmp_path / "models", "softmax")
    (folder / "model.tflite").write_bytes(b"not a flatbuffer")
    card = json.loads((folder / "model.json").read_text())
    card["sha256"]["model.tflite"] = hashlib.sha256(b"not a flatbuffer").hexdigest()
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(StageError, match=r"model.tflite: not a model LiteRT can read"):
        serving.load(folder)


# --- evaluate, predict and check start without TensorFlow --------------------------------------------


def imported(stderr: str) -> set[str]:
    """Top-level packages named by `python -X importtime`'s lines."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


@pytest.mark.pipeline(seconds=3)
@pytest.mark.parametrize(
    "command", [["stages.evaluate"], ["commands.predict", "one.png"], ["commands.predict", "--help"]]
)
def test_evaluate_and_predict_never_import_tensorflow_or_keras(trained: Path, command: list[str]) -> None:
    x, _ = raw_test_split(trained)
    Image.fromarray(x[0]).save(trained / "one.png")
    proc = run([PYTHON, "-X", "importtime", "-m", *command], trained)
    modules = imported(proc.stderr)
    assert command[0].split(".")[0] in modules and "numpy" in modules  # the list is real
    assert not modules & {"tensorflow", "keras", "tf_keras", "jax", "torch"}, sorted(modules)
    if command == ["stages.evaluate"]:
        assert "ai_edge_litert" in modules


@pytest.mark.pipeline(seconds=1)
def test_check_refuses_a_bad_keras_argument_in_one_line_without_importing_keras(project: Path) -> None:
    write_params(project, {"train": {"optimizer": {"name": "sgd", "momentun": 0.9}}})
    proc = run([PYTHON, "-X", "importtime", "-m", "stages.check"], project, check=False)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: params.yaml: train.optimizer.momentun: not a parameter of optimizer 'sgd'")
    assert "momentum" in lines[0]  # what is allowed
    assert not imported(proc.stderr) & {"tensorflow", "keras"}
