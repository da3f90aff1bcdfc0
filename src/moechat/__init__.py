"""moechat: train small Mixture-of-Experts chat models on OASST1 with a DVC pipeline."""

__version__ = "0.1.0"
