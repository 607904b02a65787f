"""The sub-commands of ``dermpacs``: thin argument parsing over the stages."""
