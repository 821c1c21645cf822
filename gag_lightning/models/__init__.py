"""models components of gag-lightning."""
