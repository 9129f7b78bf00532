"""Run a TensorFlow graph in the confined worker: the client (:class:`IsolatedGraph`) and the worker's requests.

The worker process itself is format-blind (:mod:`bnfold.core.worker`,
:mod:`bnfold.core.serve`); this module gives it TensorFlow graphs: ``load``
imports a serialized GraphDef into a session, which the core ``run`` request
then runs by tensor names. Also here: how bnfold configures TensorFlow for a
check (:func:`runner_config`) and its answer to oneDNN's aborted runs
(:data:`ABORT_POLICY`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import IO, Any, TypeVar

import numpy as np
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

from bnfold.core import serve
from bnfold.core.protocol import decode_arrays, encode_arrays, send
from bnfold.core.worker import GraphRunError, Worker, WorkerDied, acquire, release

T = TypeVar("T")

ABORT_RETRIES = 3  # how often one process runs a graph that TensorFlow aborts (AbortedError), see ABORT_POLICY


ABORT_POLICY = """\
TensorFlow's oneDNN kernels abort a run now and then ("could not create a primitive descriptor
for the reorder primitive", AbortedError), in a process that ran many graphs; the same run then
aborts again in that process, or passes. The one answer, for bnfold and its tests alike: run it
up to ABORT_RETRIES times (TensorFlow's contract: an aborted op may be retried); if every try
aborts, run the graph in a new interpreter with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0), which has no
such kernels, and keep it there. So an abort never decides an answer: the graph's values do."""


def run_retrying_aborts(tf: Any, run: Callable[[], T]) -> T:
    """``run()``, tried again on ``AbortedError`` up to :data:`ABORT_RETRIES` times (:data:`ABORT_POLICY`)."""
    for attempt in range(ABORT_RETRIES):
        try:
            return run()
        except tf.errors.AbortedError:
            if attempt == ABORT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


class IsolatedGraph:
    """A GraphDef loaded in a worker: ``run`` fetches tensors for feeds, as a ``Session.run`` would.

    A run that TensorFlow keeps aborting moves the graph to a worker with
    oneDNN off (:data:`ABORT_POLICY`), which needs the graph's bytes again:
    ``reload`` makes them (a caller that keeps the ``GraphDef`` anyway, so
    that this object need not hold a second copy); without it the bytes are kept.
    """

    def __init__(
        self,
        graph_bytes: bytes,
        layout_pass: bool = True,
        channels_first: bool = True,
        reload: Callable[[], bytes] | None = None,
        onednn: bool = True,
        budget: str = "",
    ) -> None:
        """``layout_pass``: run as the check does (:func:`bnfold.tf.verify.runner_config`), with grappler's
        layout pass where ``channels_first`` says the graph may need it; else with TensorFlow's default options.
        ``budget``: what the graph computes (a constant), to be refused by :mod:`bnfold.core.budgets` from its
        static shapes before it runs (:class:`GraphRunError` of kind ``BudgetExceeded``)."""
        self.load = {"op": LOAD, "layout_pass": layout_pass, "channels_first": channels_first, "budget": budget}
        self.reload = reload if reload is not None else (lambda: graph_bytes)
        self.worker = self._start(graph_bytes, onednn)
        self.generation = 0  # counts the moves to another worker, which lose what the old one kept (``stash``)

    def _start(self, graph_bytes: bytes, onednn: bool) -> Worker:
        worker = acquire() if onednn else Worker(onednn=False)
        try:
            worker.request(self.load, graph_bytes)
        except GraphRunError:
            release(worker)  # the worker answered: it holds no graph and serves the next one
            raise
        except BaseException:  # died, or interrupted halfway through the exchange
            worker.stop()
            raise
        return worker

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run_kept(fetches, feeds)[0]

    def run_kept(
        self,
        fetches: list[str],
        feeds: dict[str, np.ndarray],
        stored: list[tuple[str, str, int, int]] | None = None,
        stash: dict[str, str] | None = None,
    ) -> tuple[list[np.ndarray], list[dict[str, Any]] | None]:
        """:meth:`run`, with arrays that stay in the worker between runs, so they do not cross the pipe twice.

        ``stored``: (tensor, key, start, stop) feeds the tensor rows ``start:stop`` of what is kept under ``key``.
        ``stash``: tensor -> key; the tensor is computed in the same run (beside ``fetches``, which it
        may repeat) and appended (axis 0) to what is kept under ``key`` instead of being sent back; its
        shape and size are answered (the second item, in ``stash``'s order). Both are forgotten when the
        graph moves to another worker (:data:`ABORT_POLICY`; ``generation`` counts the moves): the run is
        then made without them (the tensors ``stored`` names are computed from the feeds) and the second
        item is None.
        """
        names = list(feeds)
        meta, payload = encode_arrays([feeds[n] for n in names])
        stash = stash or {}
        header: dict[str, Any] = {"op": "run", "fetches": [*fetches, *stash], "feeds": names, "arrays": meta}
        if stored:
            header["stored"] = [list(item) for item in stored]
        if stash:
            header["stash"] = [[len(fetches) + i, key] for i, key in enumerate(stash.values())]
        try:
            head, body = self.worker.request(header, payload)
        except GraphRunError as exc:
            if exc.kind != "AbortedError" or not self.worker.onednn:
                raise
            self.close()
            self.worker = self._start(self.reload(), onednn=False)
            self.generation += 1
            return self.run(fetches, feeds), None
        except WorkerDied:
            self._drop()
            raise
        return decode_arrays(head["arrays"], body), list(head.get("stashed") or [])

    def drop(self, keys: list[str]) -> None:
        """Forget what the worker keeps under ``keys``."""
        if keys and self.worker.alive:
            try:
                self.worker.request({"op": "drop", "keys": keys})
            except WorkerDied:
                self._drop()
                raise

    def _drop(self) -> None:
        self.worker.stop()

    def close(self) -> None:
        if not self.worker.alive:
            return
        try:
            self.worker.request({"op": "unload"})
        except (GraphRunError, WorkerDied):
            self._drop()
            return
        release(self.worker)


def run_without_onednn(graph_bytes: bytes, fetches: list[str], feeds: dict[str, np.ndarray], channels_first: bool = True) -> list[np.ndarray]:
    """One run in a worker with oneDNN off: the last step of :data:`ABORT_POLICY` for a caller that ran the graph itself."""
    graph = IsolatedGraph(graph_bytes, channels_first=channels_first, onednn=False)
    try:
        return graph.run(fetches, feeds)
    finally:
        graph.close()


def import_serialized(tf: Any, data: bytes) -> Any:
    """A ``tf.Graph`` of a serialized GraphDef, as ``tf.graph_util.import_graph_def(..., name="")`` makes it.

    The bytes go to TensorFlow's C API as they came over the pipe.
    ``import_graph_def`` takes a parsed ``GraphDef`` and serializes it again
    before handing it to the same C function: on ResNet50 (103 MB) the parse
    and that second serialization were 0.23 s of the 0.50 s import, and two
    more copies of the weights in this process. The importer's internals used
    here are TensorFlow's own (``importer.py``); if a TensorFlow version lacks
    them, the public route runs instead.
    """
    graph = tf.Graph()
    entry_points: tuple[Any, ...]
    try:
        from tensorflow.python.client import pywrap_tf_session as c_api
        from tensorflow.python.framework import c_api_util, importer

        entry_points = (
            c_api.TF_NewBufferFromString,
            c_api.TF_DeleteBuffer,
            c_api.TF_GraphImportGraphDefWithResults,
            c_api.TF_ImportGraphDefOptionsSetValidateColocationConstraints,
            c_api_util.ScopedTFImportGraphDefOptions,
            c_api_util.ScopedTFImportGraphDefResults,
            importer._ProcessNewOps,
            graph._mutation_lock,
            graph._c_graph.get,
        )
    except (ImportError, AttributeError):
        entry_points = ()
    if not entry_points:
        from tensorflow.core.framework import graph_pb2

        with graph.as_default():
            tf.graph_util.import_graph_def(graph_pb2.GraphDef.FromString(data), name="")
        return graph
    options = c_api_util.ScopedTFImportGraphDefOptions()
    c_api.TF_ImportGraphDefOptionsSetValidateColocationConstraints(options.options, True)
    buffer = c_api.TF_NewBufferFromString(data)
    try:
        with graph._mutation_lock():  # as importer.py: no run between creating the operations and registering them
            with graph._c_graph.get() as c_graph:
                results = c_api.TF_GraphImportGraphDefWithResults(c_graph, buffer, options.options)
            c_api_util.ScopedTFImportGraphDefResults(results)  # frees the results
            importer._ProcessNewOps(graph)
    except tf.errors.InvalidArgumentError as exc:
        raise ValueError(str(exc)) from None  # what import_graph_def raises for a graph TensorFlow rejects
    finally:
        c_api.TF_DeleteBuffer(buffer)
    return graph


def check_budget(graph: Any, what: str) -> None:
    """Refuse a graph whose static shapes (TensorFlow infers them on import, constant shape inputs
    included: a ``Fill`` of a constant size has its full shape) exceed bnfold's budgets, before it runs."""
    from bnfold.core.budgets import Tally, product_flops

    tally = Tally(what)
    for op in graph.get_operations():
        for tensor in op.outputs:
            shape = tensor.shape
            if shape.rank is not None and shape.is_fully_defined():
                tally.tensor(op.name, shape.as_list())
        if op.type in _PRODUCTS and op.outputs:
            dims = [t.shape.as_list() if t.shape.rank is not None else None for t in op.inputs]
            known = [None if d is None or None in d else d for d in dims]
            out = op.outputs[0].shape
            tally.work(op.name, product_flops(op.type, known, out.as_list() if out.rank is not None and out.is_fully_defined() else None))


_PRODUCTS = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Conv2D", "Conv3D", "DepthwiseConv2dNative",
             "Conv2DBackpropInput", "Conv3DBackpropInputV2"}  # fmt: skip


def _warm_up(tf: Any, runner_config: Any) -> None:
    """Import and run a tiny graph of bnfold's own (conv, BN, dense) before the first request.

    The first graph a worker runs pays for what TensorFlow sets up once per
    process (thread pools, oneDNN, the executor's and kernels' code paths): on
    ResNet50 the first runs of the input and folded graphs took 0.50 and
    0.36 s after no warm-up, 0.45 and 0.30 s after it. The warm-up takes
    0.06 s, while bnfold still reads the model.
    """
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        w = tf.constant(np.full((3, 3, 3, 4), 0.1, np.float32))
        y = tf.nn.conv2d(x, w, 1, "SAME")
        y = tf.compat.v1.nn.fused_batch_norm(y, tf.ones([4]), tf.zeros([4]), tf.zeros([4]), tf.ones([4]), is_training=False)[0]
        y = tf.nn.relu(y)
        y = tf.matmul(tf.reduce_mean(y, [1, 2]), tf.ones([4, 2]))
    data = graph.as_graph_def().SerializeToString()
    warm = import_serialized(tf, data)
    with tf.compat.v1.Session(graph=warm, config=runner_config(False)) as session:
        session.run(y.name, {"x:0": np.ones((2, 8, 8, 3), np.float32)})


def runner_config(layout: bool = True) -> config_pb2.ConfigProto:
    """How the check's sessions run a graph: as written, with no optimizer rewriting it.

    Grappler is off, and so is TensorFlow's classic graph optimizer (``L0``: no
    constant folding, no common-subexpression elimination): they would rewrite
    the very graphs being compared, and on ResNet50 they cost more than the run
    itself (first ``session.run`` 1.09 s with grappler's meta optimizer and
    ``L1``, 0.53 s without; peak RSS 1.95 GB -> 1.50 GB).

    ``layout`` keeps grappler's layout pass, converting NCHW to NHWC on the
    CPU: TensorFlow's CPU kernels run NCHW convolutions only through oneDNN,
    which TensorFlow turns off on CPUs without AVX-512, and the layout pass
    makes such graphs runnable everywhere. It is exact (transposes around the
    op), and both graphs of a check get it alike. A graph without a
    channels-first op (:func:`channels_first`) has nothing for it to do, so
    the meta optimizer is not started at all.
    """
    config = config_pb2.ConfigProto()
    config.graph_options.optimizer_options.opt_level = config_pb2.OptimizerOptions.L0
    rewrites = config.graph_options.rewrite_options
    if layout:
        rewrites.optimizers.append("layout")
        rewrites.cpu_layout_conversion = rewriter_config_pb2.RewriterConfig.NCHW_TO_NHWC
    else:
        rewrites.disable_meta_optimizer = True
    return config


class _Session:
    """A ``tf.compat.v1.Session`` as the worker's core runs sessions: by names, retrying aborted runs (:data:`ABORT_POLICY`)."""

    def __init__(self, tf: Any, graph: Any, config: Any) -> None:
        self.tf = tf
        self.session = tf.compat.v1.Session(graph=graph, config=config)

    def run(self, fetches: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_retrying_aborts(self.tf, functools.partial(self.session.run, fetches, feeds))  # type: ignore[no-any-return]

    def close(self) -> None:
        self.session.close()


def load(state: serve.State, head: dict[str, Any], payload: bytes, reply: IO[bytes]) -> None:
    """The worker's ``load`` request: import the serialized GraphDef, refuse it past its budget, open a session."""
    tf = state.need_tensorflow("load")
    state.close()  # the previous graph's session, if a caller skipped "unload"
    graph = import_serialized(tf, payload)
    del payload
    if head.get("budget"):
        check_budget(graph, str(head["budget"]))
    config = runner_config(bool(head.get("channels_first", True))) if head.get("layout_pass", True) else None
    state.session = _Session(tf, graph, config)
    send(reply, {"ok": True})


LOAD = f"{__name__}:load"
serve.ON_START.append(lambda tf: _warm_up(tf, runner_config))
