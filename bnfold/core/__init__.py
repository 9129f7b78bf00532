"""What every format shares, and nothing format-specific: the fold arithmetic and its records, the check
and its tolerances, results and the report, errors, files, trust, and the confined worker process.

Imports no format (import-linter contract "core" in pyproject.toml): an adapter brings the graph access,
this package the arithmetic and the rules, so one fold math serves TensorFlow, ONNX and Keras alike.
"""
