"""Entry point for ``python -m pgmp``."""
from pgmp.cli import main

main()
