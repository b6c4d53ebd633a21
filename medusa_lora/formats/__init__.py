"""Heads in the layouts serving engines load: vLLM, TGI, LoRAX (``layouts``), written by ``export`` and read
back by ``import_heads``."""
