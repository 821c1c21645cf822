"""eval components of gag-lightning."""
