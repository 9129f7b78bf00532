"""``python -m bnfold``: the same command line as ``bnfold``."""

from bnfold.cli import main

if __name__ == "__main__":
    main()
