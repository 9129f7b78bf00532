"""TF 1.x training scripts with each BN mistake of the seeds, and their correct twins (run as a subprocess).

``disable_v2_behavior`` is process-global (graph mode, ref variables, Switch/Merge
conds: what TF 1.x wrote), so the tests run this file in a child process:
``python tests/tf1_training.py OUT_DIR``. Each case trains a few steps on random
data with ``tf.compat.v1.layers.batch_normalization`` and saves
``OUT_DIR/<case>/model.ckpt-3`` (+ ``.meta``) with ``tf.compat.v1.train.Saver``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.compat.v1.layers lives in tf_keras under Keras 3
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

v1 = tf.compat.v1
STEPS = 3


def net(x, training, momentum=0.9):  # type: ignore[no-untyped-def]
    """conv-BN-relu twice, global average, dense: the shape of the seeds' models."""
    h = v1.layers.conv2d(x, 4, 3, padding="same", use_bias=False, name="conv1")
    h = tf.nn.relu(v1.layers.batch_normalization(h, training=training, momentum=momentum, name="bn1"))
    h = v1.layers.conv2d(h, 4, 3, padding="same", use_bias=False, name="conv2")
    h = tf.nn.relu(v1.layers.batch_normalization(h, training=training, momentum=momentum, name="bn2"))
    return v1.layers.dense(tf.reduce_mean(h, [1, 2]), 2, name="fc")


def loss_of(logits, y):  # type: ignore[no-untyped-def]
    return tf.reduce_mean(tf.square(logits - y))


def save(graph: tf.Graph, train_op, feeds, out: str, case: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    with graph.as_default():
        saver = v1.train.Saver()
        os.makedirs(os.path.join(out, case), exist_ok=True)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            for _ in range(STEPS):
                batch = {t: rng.standard_normal([8, *t.shape.as_list()[1:]]) * 2 + 1 for t in feeds}
                sess.run(train_op, {**batch, "is_training:0": True})
            saver.save(sess, os.path.join(out, case, "model.ckpt"), global_step=STEPS)


def single(out: str, case: str, wired: bool = True, momentum: float = 0.9, collection: bool = False) -> None:
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = v1.placeholder(tf.float32, [None, 2], name="y")
        training = v1.placeholder(tf.bool, [], name="is_training")
        logits = tf.identity(net(x, training, momentum), name="logits")
        loss = loss_of(logits, y)
        optimizer = v1.train.AdamOptimizer(0.01)
        if wired:
            with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
                train_op = optimizer.minimize(loss)
        else:
            train_op = optimizer.minimize(loss)  # the mistake: UPDATE_OPS never run
        if collection:
            v1.add_to_collection(v1.GraphKeys.TRAIN_OP, train_op)
    save(graph, train_op, [x, y], out, case)


def towers(out: str, case: str, collect_after_all: bool, share: bool = True) -> None:
    """Two GPU towers sharing variables (AUTO_REUSE), gradients averaged, one apply (seed 004); ``share=False``: each tower its own."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = v1.placeholder(tf.float32, [None, 2], name="y")
        training = v1.placeholder(tf.bool, [], name="is_training")
        optimizer = v1.train.GradientDescentOptimizer(0.01)
        losses, update_ops = [], None
        for i, (xs, ys) in enumerate(zip(tf.split(x, 2), tf.split(y, 2), strict=True)):
            scope = v1.variable_scope(v1.get_variable_scope(), reuse=v1.AUTO_REUSE) if share else v1.variable_scope(f"tower_{i}")
            with tf.name_scope(f"tower_{i}"), scope:
                losses.append(loss_of(net(xs, training), ys))
            if i == 0 and not collect_after_all:
                update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)  # the mistake: before tower_1 exists
        if update_ops is None:
            update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        with tf.control_dependencies(update_ops):
            if share:
                grads = [optimizer.compute_gradients(loss) for loss in losses]
                averaged = [(tf.add_n([g[k][0] for g in grads]) / len(grads), grads[0][k][1]) for k in range(len(grads[0]))]
                train_op = optimizer.apply_gradients(averaged)
            else:  # a model replica per tower: one step on the summed loss
                train_op = optimizer.minimize(tf.add_n(losses))
    save(graph, train_op, [x, y], out, case)


def validation(out: str, case: str, reuse: bool) -> None:
    """A training network and a validation network (training=False); without reuse the second BN is a fresh copy."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = v1.placeholder(tf.float32, [None, 2], name="y")
        v1.placeholder_with_default(False, [], name="is_training")  # fed True by save(), unused here
        with v1.variable_scope("model"):
            logits = net(x, True)
        loss = loss_of(logits, y)
        with v1.variable_scope("model" if reuse else "valid", reuse=True if reuse else None):
            valid = net(x, False)
        tf.identity(valid, name="valid_logits")
        with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
            train_op = v1.train.AdamOptimizer(0.01).minimize(loss)
    save(graph, train_op, [x, y], out, case)


def ema_cond(out: str, case: str, decay: float) -> None:
    """The hand-written BN of seed 000's answer: batch moments, an ExponentialMovingAverage applied inside tf.cond(train_phase)."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = v1.placeholder(tf.float32, [None, 2], name="y")
        train_phase = v1.placeholder(tf.bool, [], name="is_training")
        h = v1.layers.conv2d(x, 4, 3, padding="same", use_bias=False, name="conv1")
        with v1.variable_scope("bn1"):
            beta = tf.Variable(tf.zeros([4]), name="beta")
            gamma = tf.Variable(tf.ones([4]), name="gamma")
            batch_mean, batch_var = tf.nn.moments(h, [0, 1, 2], name="moments")
            ema = v1.train.ExponentialMovingAverage(decay=decay)

            def mean_var_with_update():  # type: ignore[no-untyped-def]
                with tf.control_dependencies([ema.apply([batch_mean, batch_var])]):
                    return tf.identity(batch_mean), tf.identity(batch_var)

            mean, var = tf.cond(train_phase, mean_var_with_update, lambda: (ema.average(batch_mean), ema.average(batch_var)))
            h = tf.nn.batch_normalization(h, mean, var, beta, gamma, 1e-3)
        logits = tf.identity(v1.layers.dense(tf.reduce_mean(tf.nn.relu(h), [1, 2]), 2, name="fc"), name="logits")
        train_op = v1.train.AdamOptimizer(0.01).minimize(loss_of(logits, y))
    save(graph, train_op, [x, y], out, case)


def hostile(out: str, case: str) -> None:
    """A correct training graph whose train op and inference output also write a file (``WriteFile``): the doctor must never run it.

    Training here runs it and writes ``MARKER``; it is removed after saving, so a
    marker that reappears was written by whoever read the checkpoint.
    """
    graph = tf.Graph()
    marker = os.path.join(out, case, "MARKER")
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        y = v1.placeholder(tf.float32, [None, 2], name="y")
        training = v1.placeholder(tf.bool, [], name="is_training")
        write = tf.io.write_file(marker, "the model ran", name="write_marker")
        with tf.control_dependencies([write]):
            logits = tf.identity(net(x, training), name="logits")
        with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
            train_op = v1.train.AdamOptimizer(0.01).minimize(loss_of(logits, y))
    save(graph, train_op, [x, y], out, case)
    os.remove(marker)


def main(out: str) -> None:
    v1.disable_v2_behavior()
    single(out, "ok", collection=True)
    single(out, "not_wired", wired=False)
    single(out, "decay1", momentum=1.0)
    single(out, "decay0", momentum=0.0)
    towers(out, "towers_early", collect_after_all=False)
    towers(out, "towers_ok", collect_after_all=True)
    towers(out, "towers_apart_early", collect_after_all=False, share=False)
    towers(out, "towers_apart_ok", collect_after_all=True, share=False)
    validation(out, "valid_copy", reuse=False)
    validation(out, "valid_reuse", reuse=True)
    ema_cond(out, "ema_cond", decay=0.5)
    ema_cond(out, "ema_cond_decay1", decay=1.0)
    hostile(out, "hostile")


if __name__ == "__main__":
    main(sys.argv[1])
