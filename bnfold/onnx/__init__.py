"""The ONNX adapter: an ONNX model loaded, its BN sites folded with the shared fold math, checked in
onnxruntime (optimizations off) and written, without importing TensorFlow; plus the export of a folded
TensorFlow graph through tf2onnx (:mod:`bnfold.onnx.export`), the one module allowed to import
:mod:`bnfold.tf`, since its input is a TF graph.
"""
