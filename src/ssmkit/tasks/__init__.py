"""ssmkit.tasks."""
