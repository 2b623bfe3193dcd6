"""The params schema: defaults, and one clear error for each class of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import params
from pipeline.errors import ParamError, StageError
from tests.harness import BIN, ROOT, run, write_params


def parse_error(raw: dict) -> ParamError:
    with pytest.raises(ParamError) as info:
        params.parse(raw)
    return info.value


def test_committed_params_file_is_valid_and_matches_the_schema_defaults() -> None:
    loaded = params.load(ROOT / "params.yaml")
    # the tutorial's learning rate is written out (Adam's own, which the schema leaves to Keras) so that
    # `dvc exp run -S train.optimizer.learning_rate=...` has a key to change; everything else is the default
    tutorial = params.OptimizerParams(name="adam", learning_rate=0.001)
    assert loaded == params.Params(train=params.TrainParams(optimizer=tutorial))
    assert params.Params().train.optimizer.kwargs == {}  # no learning rate given: the optimizer's own
    assert loaded.train.loss == "sparse_categorical_crossentropy"
    assert loaded.train.optimizer.name == "adam"
    assert loaded.train.optimizer.kwargs == {"learning_rate": 0.001}
    assert (loaded.model.hidden_units, loaded.train.epochs, loaded.train.batch_size) == ([128], 10, 32)


def test_every_schema_key_is_spelled_out_in_params_yaml() -> None:
    """Nothing hidden: each section of params.yaml names every key the schema knows."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in ("data", "normalize", "model", "train", "evaluate"):
        schema = type(getattr(params.Params(), section))
        assert set(raw[section]) == set(schema.model_fields), section


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"train": {"epoch": 3}}, "train.epoch", "did you mean 'epochs'"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"train": {"early_stopping": {"patiense": 2}}}, "train.early_stopping.patiense", "did you mean 'patience'"),
        ({"train": {"epochs": "ten"}}, "train.epochs", "expected an integer"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "expected an integer"),
        ({"train": {"from_logits": "yes"}}, "train.from_logits", "expected true or false"),
        ({"model": {"hidden_units": 128}}, "model.hidden_units", "expected a list"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer", "mapping with a 'name'"),
        ({"train": {"epochs": 0}}, "train.epochs", "must be >= 1"),
        ({"train": {"batch_size": -1}}, "train.batch_size", "must be >= 1"),
        ({"train": {"validation_split": 1.0}}, "train.validation_split", "must be < 1"),
        ({"model": {"dropout": 1.5}}, "model.dropout", "must be < 1"),
        ({"model": {"hidden_units": [64, 0]}}, "model.hidden_units[1]", "must be >= 1"),
        ({"data": {"test_fraction": 0}}, "data.test_fraction", "must be > 0"),
        ({"train": {"optimizer": {"name": "adam", "learning_rate": 0}}}, "train.optimizer.learning_rate", "> 0"),
        ({"train": {"optimizer": {"name": "adam", "learning_rate": -1e-3}}}, "train.optimizer.learning_rate", "> 0"),
        ({"data": {"source": "cifar10"}}, "data.source", "mnist_sample, mnist, fashion_mnist"),
        ({"normalize": {"method": "minmax"}}, "normalize.method", "scale, standardize"),
        ({"train": {"loss": "binary_crossentropyy"}}, "train.loss", "did you mean 'binary_crossentropy'"),
        ({"train": {"loss": "hinge"}}, "train.loss", "sparse_categorical_crossentropy"),
        ({"train": {"optimizer": {"name": "adamm"}}}, "train.optimizer.name", "did you mean 'adam'"),
        ({"train": {"lr_schedule": {"name": "cosine"}}}, "train.lr_schedule.name", "cosine_decay"),
        ({"train": {"lr_schedule": {"name": "none", "decay_steps": 5}}}, "train.lr_schedule", "name is 'none'"),
        ({"model": {"activation": "rellu"}}, "model.activation", "did you mean 'relu'"),
        ({"data": {"url": "ftp://example/mnist.npz"}}, "data.url", "http://, https:// or file://"),
        ({"data": {"sha256": "abc"}}, "data.sha256", "64 lowercase hex"),
        ({"train": {"distribute": "horovod"}}, "train.distribute", "none, mirrored, multi_worker"),
        ({"train": {"speed": {"steps_per_execution": 0}}}, "train.speed.steps_per_execution", "must be >= 1"),
        ({"train": {"speed": {"threads": -1}}}, "train.speed.threads", "must be >= 0"),
        ({"train": {"speed": {"jit_compiled": True}}}, "train.speed.jit_compiled", "did you mean 'jit_compile'"),
        ({"train": {"mixed_precision": "float16"}}, "train.mixed_precision", "expected true or false"),
    ],
)
def test_bad_values_name_the_dotted_key_and_what_is_allowed(raw: dict, key: str, fragment: str) -> None:
    error = parse_error(raw)
    assert error.key == key
    assert fragment in str(error)
    assert str(error).startswith(f"params.yaml: {key}: ")


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        # the tutorial's pitfall, made explicit: probabilities from softmax do not suit one-vs-rest BCE
        (
            {"train": {"loss": "binary_crossentropy"}, "model": {"output_activation": "softmax"}},
            "model.output_activation",
            "allowed: auto, sigmoid",
        ),
        # hinge targets are +-1 margins: a softmax output can never reach them
        (
            {"train": {"loss": "categorical_hinge"}, "model": {"output_activation": "softmax"}},
            "model.output_activation",
            "allowed: auto, linear, tanh",
        ),
        # a linear output with a probability loss and no from_logits
        ({"model": {"output_activation": "linear"}}, "model.output_activation", "from_logits: true"),
        ({"train": {"loss": "poisson", "from_logits": True}}, "train.from_logits", "cannot train on logits"),
        (
            {"train": {"from_logits": True}, "model": {"output_activation": "softmax"}},
            "model.output_activation",
            "on logits the output layer is linear",
        ),
        (
            {"train": {"validation_split": 0, "early_stopping": {"enabled": True, "monitor": "val_loss"}}},
            "train.early_stopping.monitor",
            "needs validation data",
        ),
    ],
)
def test_incompatible_combinations_are_rejected(raw: dict, key: str, fragment: str) -> None:
    error = parse_error(raw)
    assert (error.key, fragment in str(error)) == (key, True), str(error)


def test_good_combinations_are_accepted() -> None:
    p = params.parse(
        {
            "train": {
                "loss": "binary_crossentropy",
                "from_logits": True,
                "optimizer": {"name": "sgd", "learning_rate": 1e-2, "momentum": 0.9},
            },
            "model": {"output_activation": "linear"},
        }
    )
    assert p.train.optimizer.kwargs == {"learning_rate": 0.01, "momentum": 0.9}
    assert params.parse({"train": {"loss": "categorical_hinge"}, "model": {"output_activation": "tanh"}})
    assert params.parse({"data": {"source": "fashion_mnist", "sha256": {"t10k-labels-idx1-ubyte.gz": "0" * 64}}})


@pytest.mark.pipeline(seconds=1)
def test_a_stage_with_bad_params_exits_non_zero_with_one_line_and_writes_nothing(project: Path) -> None:
    """download does not read train.*, but the whole file is validated before any stage works."""
    write_params(project, {"train": {"epochs": 0}})
    proc = run([str(BIN / "python"), "-m", "stages.download"], project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params.yaml: train.epochs: must be >= 1, got 0"
    assert not (project / "data").exists()


@pytest.mark.pipeline(seconds=5)
def test_train_rejects_an_unknown_optimizer_argument_before_reading_data(project: Path) -> None:
    write_params(project, {"train": {"optimizer": {"name": "sgd", "momentun": 0.9}}})
    proc = run([str(BIN / "python"), "-m", "stages.train"], project, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: params.yaml: train.optimizer.momentun: not a parameter of optimizer 'sgd'")
    assert "momentum" in last and "nesterov" in last  # the accepted keys are listed
    assert "Traceback" not in proc.stderr
    assert not (project / "models").exists() and not (project / "metrics").exists()


@pytest.mark.pipeline(seconds=1)
def test_params_yaml_that_is_not_yaml_is_one_clear_error(project: Path) -> None:
    (project / "params.yaml").write_text("train: [unclosed\n")
    proc = run([str(BIN / "python"), "-m", "stages.normalize"], project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: params.yaml: (file): not valid YAML")


def test_the_schema_knows_exactly_the_sources_that_datasets_can_fetch() -> None:
    from pipeline import datasets

    hint = params.DataParams.model_fields["source"].annotation
    assert set(params.typing.get_args(hint)) == set(datasets.SOURCES)


def test_params_nested_too_deeply_to_read_is_one_line(tmp_path: Path) -> None:
    text = (
        (ROOT / "params.yaml").read_text().replace("loss_args: {}", "loss_args: {a: " + "[" * 5000 + "]" * 5000 + "}")
    )
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamError, match=r"\(file\): .* nests lists or mappings too deeply to read"):
        params.load(tmp_path / "params.yaml")


def test_a_model_too_large_for_this_machine_is_refused_naming_both_sizes() -> None:
    from pipeline import memory

    default = params.Params()
    assert memory.estimate(default) < 10 * 2**20  # the tutorial's model: a few MB
    huge = params.parse({"model": {"hidden_units": [65536, 65536]}})
    assert memory.estimate(huge) > 80e9  # 4.3e9 weights, gradients, Adam's two moments, the saved copy
    memory.check(default)
    with pytest.raises(ParamError, match=r"model.hidden_units: \[65536, 65536\] with adam needs at least 87.0 GB"):
        memory.check(huge)


def test_params_edited_while_a_stage_ran_are_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    p = params.load(path)
    path.write_text(path.read_text().replace("\n  epochs: 10\n", "\n  epochs: 10  # a comment\n"))  # no new value
    params.check_unchanged(p, "model", "train", path=path)
    path.write_text(path.read_text().replace("\n  epochs: 10  # a comment\n", "\n  epochs: 1\n"))
    with pytest.raises(StageError, match=r"params.yaml changed while this stage ran \(train.epochs\)"):
        params.check_unchanged(p, "model", "train", path=path)
    params.check_unchanged(p, "evaluate", path=path)  # another stage's section: not this stage's record


def test_params_yaml_is_written_as_dvc_writes_it_so_a_set_changes_one_line(tmp_path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml through DVC's own Hydra overrides: only the values set may change."""
    from dvc.utils.hydra import apply_overrides

    original = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    apply_overrides(tmp_path / "params.yaml", ["train.epochs=3", "train.optimizer.learning_rate=0.01"])
    rewritten = (tmp_path / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original.splitlines(), rewritten, strict=True) if a != b]
    values = [(a.partition("#")[0].strip(), b.partition("#")[0].strip()) for a, b in changed]
    assert values == [("learning_rate: 0.001", "learning_rate: 0.01"), ("epochs: 10", "epochs: 3")], changed
    assert [a.partition("#")[2] for a, _ in changed] == [b.partition("#")[2] for _, b in changed]  # comments kept


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("+train.epoch=20", "error: params.yaml: train.epoch: unknown key; did you mean 'epochs'?"),
        ("+model.hidden_unit=[64]", "error: params.yaml: model.hidden_unit: unknown key; did you mean 'hidden_units'?"),
        ("+train.optimizer.foo=1", "error: params.yaml: train.optimizer.foo: not a parameter of optimizer 'adam'"),
        ("+train.optimizer.clipnorm=abc", "error: params.yaml: train.optimizer.clipnorm: expected a number, got 'abc'"),
        ("train.seed=-1", "error: params.yaml: train.seed: must be >= 0, got -1"),
        ("train.from_logits=yes", "error: params.yaml: train.from_logits: expected true or false, got 'yes'"),
    ],
)
def test_a_bad_change_as_dvc_exp_run_writes_it_is_one_line_from_check(
    change: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc exp run -S CHANGE` writes params.yaml with DVC's own Hydra overrides, then runs check: a typo'd key
    added with `+`, a list, a string where a number belongs, YAML 1.2's `yes` (a string, not true). What a
    refused `dvc exp run` then leaves (nothing changed, nothing to restore) is tests/test_run_cache.py's."""
    from dvc.utils.hydra import apply_overrides

    from stages import check

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    apply_overrides(tmp_path / "params.yaml", [change])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError) as refused:
        check.main()
    assert f"error: {refused.value}".startswith(message), str(refused.value)
