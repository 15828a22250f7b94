"""Coverage-guided fuzzing of pgmp's parsers: harnesses, their runner, seed corpora and kept crash inputs."""
