"""Sans-IO PostgreSQL protocol v3: frame scanner, message codec, startup parsing."""
