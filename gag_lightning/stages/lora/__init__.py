"""The LoRA baseline: a peft LoRA of the base (``module``) on Stage III's records and budget (``datamodule``),
and its runner (``runner``)."""
