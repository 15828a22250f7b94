"""pgmp: a PostgreSQL wire-protocol proxy and connection pooler."""

__version__ = "0.1.0"
