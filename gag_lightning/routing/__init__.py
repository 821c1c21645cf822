"""routing components of gag-lightning."""
