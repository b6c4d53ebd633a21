"""Drafters fill a step's token tree with candidates, behind one interface (``drafter.Drafter``): the Medusa
heads (``heads``), suffix decoding over the context (``suffix``), and the two in one tree (``hybrid``)."""
