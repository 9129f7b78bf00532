"""The Keras adapter: a ``.keras``/``.h5`` file read as its author saved it (config as JSON first, then
the Keras that wrote it), its BN layers folded into the layers before them, checked and saved again as
Keras, all inside the confined worker.
"""
