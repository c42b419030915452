"""LightningDataModules for extreme multi-label datasets (raw text, sparse BoW, LF) and the shipped real sets."""
