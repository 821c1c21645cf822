"""Stage III, GAG: the injection adapter trained against the frozen base (``module.GAGModule``) on the memory bank
(``datamodule.GAGDataModule``; ``distill``: the KL teacher's prompts, ``recon``: the reconstruction warm-up), the
token-alignment initialisation (``alignment``) and the runner (``runner``)."""
