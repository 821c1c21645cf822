"""data components of gag-lightning."""
