"""train's own logic: the model params build, and the epoch whose weights it saves."""

from __future__ import annotations

from pipeline import losses, params


def test_model_follows_the_params() -> None:
    import keras

    from stages import train

    p = params.parse({"model": {"hidden_units": [64, 32], "activation": "tanh", "dropout": 0.2}})
    model = train.build_model(p.model, losses.head(p.train.loss))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [64, 32, 10]
    assert [layer.activation.__name__ for layer in dense] == ["tanh", "tanh", "softmax"]
    assert sum(isinstance(layer, keras.layers.Dropout) for layer in model.layers) == 2
    assert model.output_shape == (None, 10)


def test_the_tutorials_model_is_the_default() -> None:
    from stages import train

    model = train.build_model(params.Params().model, losses.head("sparse_categorical_crossentropy"))
    assert [type(layer).__name__ for layer in model.layers] == ["Flatten", "Dense", "Dense"]
    assert model.count_params() == 28 * 28 * 128 + 128 + 128 * 10 + 10


def test_the_saved_epoch_is_the_one_early_stopping_restored_else_the_last() -> None:
    import keras

    from stages import train

    history = {"loss": [0.9, 0.5, 0.6], "val_loss": [0.8, 0.7, 0.75]}
    assert train.saved_epoch(history, None) == 2
    stopper = keras.callbacks.EarlyStopping(restore_best_weights=True)
    assert train.saved_epoch(history, stopper) == 2  # it never saw an epoch: no weights to restore
    stopper.best_weights, stopper.best_epoch = [], 1
    assert train.saved_epoch(history, stopper) == 1
    assert train.saved_epoch(history, keras.callbacks.EarlyStopping(restore_best_weights=False)) == 2


def test_one_head_decides_the_trained_and_the_shipped_output() -> None:
    """losses.head: what the last layer is trained as, and what the shipped model outputs."""
    assert losses.head("sparse_categorical_crossentropy") == losses.Head("softmax", False, "softmax")
    assert losses.head("binary_crossentropy", from_logits=True) == losses.Head("linear", True, "sigmoid")
    assert losses.head("mean_squared_error", "linear") == losses.Head("linear", False, "linear")
    assert losses.head("categorical_hinge") == losses.Head("linear", False, "linear")
    for loss, spec in losses.LOSSES.items():
        for requested in ("auto", *spec.activations):
            wiring = losses.head(loss, requested)
            assert wiring.activation == wiring.output in spec.activations and not wiring.from_logits
        if spec.from_logits:  # on logits the shipped model ends in the loss's own probabilities
            assert losses.head(loss, from_logits=True).output == spec.default_activation
