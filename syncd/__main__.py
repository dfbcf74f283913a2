"""`python -m syncd` entry point."""

from syncd.cli import main

main()
