"""The job store: one row per received photo, the source of truth for its state."""
