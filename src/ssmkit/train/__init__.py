"""ssmkit.train."""
