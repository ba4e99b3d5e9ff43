"""Training programs: compose moshi_jax parts into runs (no model code lives here)."""
