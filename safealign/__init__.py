"""safealign: safety-alignment methods (SFT, DPO, ADPO, ISAAC) for dialogue LLMs."""

__version__ = "0.1.0"
