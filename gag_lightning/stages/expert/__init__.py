"""Stages I and II, the expert (causal LM): DAPT on the knowledge base (``corpus``: packed blocks) and QA-SFT
(``qa``: answer-only loss), one LightningModule (``module.CausalLMModule``), one runner (``runner``)."""
