"""``bnfold doctor``: BN misuse that makes inference differ from training, found for every format.

On top of the adapters: :mod:`graph` (frozen TF graphs, SavedModels, Keras files: the static checks),
:mod:`statistics` (reading a BN's stored statistics in each TF form, shared with recalibration),
:mod:`dynamic` (the checks that run the model on ``--data``), :mod:`training` and :mod:`training_graph`
(TF1 checkpoints and their training graphs), :mod:`onnx` (ONNX models, without TensorFlow). The finding
records and drift metrics are format-free (:mod:`bnfold.core.findings`).
"""
