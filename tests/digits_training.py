"""Small CNNs trained on scikit-learn's digits with each BN mistake users make (run as a subprocess).

``python tests/digits_training.py OUT_DIR [case ...]`` writes, per case, the model as
the user would ship it (``<case>.pb``, input ``x``, output ``logits``) and a graph
that computes the same network in training mode (``<case>_train.pb``: BN on the
batch's own statistics), plus ``digits.npz`` (the train/test split). Training is
tiny and seeded: a few seconds per case. TF1 code needs ``disable_v2_behavior``,
which is process-global, hence the subprocess. The Keras case is a separate
process mode (``--keras``) since Keras 3 needs TF2 behaviour.

The mistakes (docs/recalibrate.md):
- ``not_wired``: ``tf.compat.v1.layers.batch_normalization`` whose UPDATE_OPS never run with the train op;
- ``decay1``: update ops wired, but ``momentum=1`` (``decay=1``), so the statistics stay 0/1;
- ``valid_copy``: a validation network whose BN moving statistics are ``tf.Variable`` (which ignores
  ``reuse``), so the exported copy holds fresh, never-updated statistics;
- ``ema_cond``: a hand-written BN with an ``ExponentialMovingAverage`` under ``tf.cond`` whose ``apply`` is
  built but never made a dependency of the training branch;
- ``frozen_training``: exported with ``is_training=True`` (``FusedBatchNormV3`` in training mode);
- ``keras_momentum1``: a Keras model whose BN ``momentum=1.0`` never moved its statistics.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.compat.v1.layers lives in tf_keras under Keras 3
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

STEPS = 400
BATCH = 64
TF1_CASES = ("not_wired", "decay1", "valid_copy", "ema_cond", "frozen_training")


def digits() -> dict[str, np.ndarray]:
    """load_digits (shipped with scikit-learn), scaled to [0, 1], NHWC, a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return {"x_train": x[:cut], "y_train": y[:cut], "x_test": x[cut:], "y_test": y[cut:]}


def _tf1_net(x, training, bn):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    v1 = tf.compat.v1
    h = v1.layers.conv2d(x, 8, 3, padding="same", use_bias=False, name="conv1")
    h = tf.nn.relu(bn(h, training, "bn1"))
    h = v1.layers.conv2d(h, 16, 3, padding="same", use_bias=False, name="conv2")
    h = tf.nn.relu(bn(h, training, "bn2"))
    return v1.layers.dense(tf.reduce_mean(h, [1, 2]), 10, name="fc")


def _train_and_freeze(graph, train_op, loss, x, y, flag, data, outputs, out, case) -> None:  # type: ignore[no-untyped-def]
    """Train, then freeze ``outputs`` ({file stem: (tensor, flag value or None)}) with the trained values."""
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(1)
    with graph.as_default(), v1.Session(graph=graph) as sess:
        v1.set_random_seed(0)
        sess.run(v1.global_variables_initializer())
        n = len(data["x_train"])
        for _ in range(STEPS):
            pick = rng.integers(0, n, BATCH)
            feeds = {x: data["x_train"][pick], y: data["y_train"][pick]}
            if flag is not None:
                feeds[flag] = True
            sess.run([train_op, loss], feeds)
        os.makedirs(os.path.join(out, case), exist_ok=True)  # the TF1 checkpoint too, for recalibrate --outputs
        v1.train.Saver().save(sess, os.path.join(out, case, "model.ckpt"), global_step=STEPS)
        for stem, name in outputs.items():
            frozen = v1.graph_util.convert_variables_to_constants(sess, graph.as_graph_def(), [name])
            for node in frozen.node:  # every file's output is called logits
                if node.name == name:
                    node.name = "logits"
            with open(os.path.join(out, f"{stem}.pb"), "wb") as f:
                f.write(frozen.SerializeToString())


def _layers_bn(momentum: float):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    def bn(h, training, name):  # type: ignore[no-untyped-def]
        return tf.compat.v1.layers.batch_normalization(h, training=training, momentum=momentum, name=name)

    return bn


def tf1_case(case: str, data: dict[str, np.ndarray], out: str) -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        x = v1.placeholder(tf.float32, [None, 8, 8, 1], name="x")
        y = v1.placeholder(tf.int64, [None], name="y")
        flag = v1.placeholder(tf.bool, [], name="is_training")
        outputs = {case: "logits", f"{case}_train": "logits"}
        if case in ("not_wired", "decay1", "frozen_training"):
            logits = tf.identity(_tf1_net(x, flag, _layers_bn(1.0 if case == "decay1" else 0.9)), name="logits")
        elif case == "valid_copy":
            with v1.variable_scope("model"):
                train_logits = _tf1_net(x, True, _own_bn)
            with v1.variable_scope("model", reuse=True):
                valid = _tf1_net(x, False, _own_bn)
            tf.identity(valid, name="logits")
            tf.identity(train_logits, name="train_logits")
            outputs = {case: "logits", f"{case}_train": "train_logits"}
            logits = train_logits
        elif case == "ema_cond":
            logits = tf.identity(_tf1_net(x, flag, _ema_bn), name="logits")
        else:
            raise SystemExit(f"unknown case {case}")
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        optimizer = v1.train.AdamOptimizer(0.01)
        if case == "not_wired":
            train_op = optimizer.minimize(loss)  # the mistake: UPDATE_OPS never run
        else:
            with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
                train_op = optimizer.minimize(loss)
    if case == "frozen_training":
        # trained correctly, then exported with the training flag fixed to True
        _freeze_training_export(graph, data, out, case, train_op, loss, x, y, flag)
        return
    _train_and_freeze(graph, train_op, loss, x, y, flag, data, outputs, out, case)
    if case in ("not_wired", "decay1", "ema_cond"):  # training mode: the same graph with the flag fixed True
        _fix_flag(os.path.join(out, f"{case}_train.pb"), True)


def _fix_flag(path: str, value: bool) -> None:
    """Replace the ``is_training`` placeholder by a constant (the training-mode twin of the shipped graph)."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
    for node in graph_def.node:
        if node.name == "is_training":
            node.op = "Const"
            for key in list(node.attr):
                if key not in ("dtype",):
                    del node.attr[key]
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, tf.bool))
    with open(path, "wb") as f:
        f.write(graph_def.SerializeToString())


def _freeze_training_export(graph, data, out, case, train_op, loss, x, y, flag) -> None:  # type: ignore[no-untyped-def]
    """Train properly, then build the export graph with training=True and freeze it with the trained weights."""
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(1)
    with v1.Session(graph=graph) as sess:
        sess.run(v1.global_variables_initializer())
        n = len(data["x_train"])
        for _ in range(STEPS):
            pick = rng.integers(0, n, BATCH)
            sess.run(train_op, {x: data["x_train"][pick], y: data["y_train"][pick], flag: True})
        values = {v.op.name: sess.run(v) for v in v1.global_variables()}
    export = tf.Graph()
    with export.as_default():
        xe = v1.placeholder(tf.float32, [None, 8, 8, 1], name="x")
        tf.identity(_tf1_net(xe, True, _layers_bn(0.9)), name="logits")  # the mistake: training=True in the export
        with v1.Session(graph=export) as sess:
            for var in v1.global_variables():
                var.load(values[var.op.name], sess)
            frozen = v1.graph_util.convert_variables_to_constants(sess, export.as_graph_def(), ["logits"])
    for stem in (case, f"{case}_train"):  # the shipped graph is in training mode already
        with open(os.path.join(out, f"{stem}.pb"), "wb") as f:
            f.write(frozen.SerializeToString())


def _own_bn(h, training, name):  # type: ignore[no-untyped-def]
    """gamma/beta by get_variable (shared under reuse), moving statistics by tf.Variable (never shared: the pitfall)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    channels = h.shape[-1]
    with v1.variable_scope(name):
        gamma = v1.get_variable("gamma", [channels], initializer=v1.ones_initializer())
        beta = v1.get_variable("beta", [channels], initializer=v1.zeros_initializer())
        moving_mean = tf.Variable(tf.zeros([channels]), trainable=False, name="moving_mean")
        moving_var = tf.Variable(tf.ones([channels]), trainable=False, name="moving_variance")
        if training:
            mean, var = tf.nn.moments(h, [0, 1, 2])
            for moving, value in ((moving_mean, mean), (moving_var, var)):
                v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, v1.assign(moving, 0.9 * moving + 0.1 * value))
            return tf.nn.batch_normalization(h, mean, var, beta, gamma, 1e-3)
        return tf.nn.batch_normalization(h, moving_mean, moving_var, beta, gamma, 1e-3)


def _ema_bn(h, training, name):  # type: ignore[no-untyped-def]
    """The hand-written BN of seed 000: batch moments, an ExponentialMovingAverage whose apply is never run."""
    import tensorflow as tf

    v1 = tf.compat.v1
    channels = h.shape[-1]
    with v1.variable_scope(name):
        beta = tf.Variable(tf.zeros([channels]), name="beta")
        gamma = tf.Variable(tf.ones([channels]), name="gamma")
        batch_mean, batch_var = tf.nn.moments(h, [0, 1, 2], name="moments")
        ema = v1.train.ExponentialMovingAverage(decay=0.9)
        ema.apply([batch_mean, batch_var])  # the mistake: built, but no control dependency runs it

        mean, var = tf.cond(
            training,
            lambda: (tf.identity(batch_mean), tf.identity(batch_var)),
            lambda: (ema.average(batch_mean), ema.average(batch_var)),
        )
        return tf.nn.batch_normalization(h, mean, var, beta, gamma, 1e-3)


def keras_case(data: dict[str, np.ndarray], out: str) -> None:
    """A Keras model whose BN momentum is 1.0: fit never moves the moving statistics from 0/1."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="x"),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=1.0),
            keras.layers.ReLU(),
            keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=1.0),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data["x_train"], data["y_train"], batch_size=BATCH, epochs=10, verbose=0, shuffle=True)
    model.save(os.path.join(out, "keras_momentum1.keras"))


def main(out: str, cases: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    data = digits()
    np.savez(os.path.join(out, "digits.npz"), **data)
    if cases == ["--keras"]:
        os.environ["TF_USE_LEGACY_KERAS"] = "0"
        keras_case(data, out)
        return
    import tensorflow as tf

    tf.compat.v1.disable_v2_behavior()
    for case in cases or TF1_CASES:
        tf1_case(case, data, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
