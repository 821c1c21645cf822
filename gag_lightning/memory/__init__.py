"""memory components of gag-lightning."""
