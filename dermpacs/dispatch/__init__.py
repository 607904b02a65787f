"""Sending results to destinations: C-STORE senders and folders, with retry."""
