"""Admin web page, metrics and health."""
