"""toto: autoregressive pre-training from videos (dVAE tokens + LLaMA-style causal transformer)."""

__version__ = "0.1.0"
