"""``python -m bnfold.cli``, as before the CLI became a package."""

from bnfold.cli import main

main()
