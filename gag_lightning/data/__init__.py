"""Data shared by every stage: record readers with validation (``records``) and the resumable, seeded loaders
(``loaders``). Each stage's DataModule lives with the stage, in ``gag_lightning/stages/<name>/``."""
