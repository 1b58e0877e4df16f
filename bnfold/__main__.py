"""`python -m bnfold` is the same as `bnfold`."""
import sys

from .cli import main

sys.exit(main())
