"""The Celery app and its tasks: thin, they call dermpacs stages and hold no logic."""
