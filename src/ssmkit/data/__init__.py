"""ssmkit.data."""
