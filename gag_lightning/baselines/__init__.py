"""baselines components of gag-lightning."""
