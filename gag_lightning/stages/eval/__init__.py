"""The eval stage: every system answers every eval split through Lightning's predict loop (``module``: the
LightningModule that decodes one planned batch, ``datamodule``: the planned batches of record x system)."""
