"""The memory stage (METHOD.md section 3): expert backgrounds and their compressed memories, no training loop;
its runner drives the library in ``gag_lightning/memory/``."""
