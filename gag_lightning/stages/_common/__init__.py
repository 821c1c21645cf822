"""What every stage's runner and LightningModule share: Trainer and logger building, checkpoints and resume
(``trainer``), gradient clipping that knows about sharded parameters (``clipping``), NaN/inf guards (``guards``)."""
