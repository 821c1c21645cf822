"""Only the memory stage's runner (``pipeline.memory``) is left here, until it moves to ``stages/memory/``.

Every other stage lives in ``gag_lightning/stages/<name>/`` (LightningModule, DataModule and runner side by side);
the modules beside this one (``keys``, ``trainer``, ``expert``) only forward the names ``pipeline.memory`` imports
to their new homes, and go with it.
"""
