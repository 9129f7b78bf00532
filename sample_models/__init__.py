"""Small frozen graphs covering every BN form and linear op bnfold folds (see make_samples.py)."""
