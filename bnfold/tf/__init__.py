"""The TensorFlow adapter: a frozen GraphDef loaded, made canonical, its BN sites recognized, folded,
pruned, checked in the confined worker and written (.pb, .pbtxt, SavedModel).

Stages, one module each: :mod:`io` (read and write), :mod:`canonical` and :mod:`switches` (constants
evaluated, training switches resolved), :mod:`recognize` (BN forms as one affine record), :mod:`fold`
(fold and prune), :mod:`verify` with :mod:`runner` (the check), :mod:`freeze` (SavedModels and
tf.functions to a frozen graph), :mod:`allowlist` and :mod:`runsafety` (what a graph may make bnfold run).
"""
