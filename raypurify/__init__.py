"""raypurify: defend against unlearnable examples with rate-constrained VAEs, on Ray."""

__version__ = "0.1.0"
