"""LightningModules: SFTModule (SFT, ISAAC) and PreferenceModule (DPO, ADPO)."""
