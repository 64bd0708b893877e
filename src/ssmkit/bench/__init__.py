"""ssmkit.bench: measurements behind ``ssmkit bench`` (one module per benchmark)."""
