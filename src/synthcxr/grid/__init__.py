"""grid stage."""
