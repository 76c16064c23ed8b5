"""eetool: early exits for the checkpoints people already have.

Importing this package is cheap: torch is imported only by the modules that need it,
so ``eetool --help`` and tab completion stay fast.
"""

__version__ = "0.1.0"
