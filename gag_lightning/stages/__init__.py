"""stages components of gag-lightning."""
