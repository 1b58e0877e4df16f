"""Run bnfold from a checkout: ``python cli.py ...`` is the same as ``bnfold ...``."""
import sys

from bnfold.cli import main

sys.exit(main())
