"""rsm_fast: Reward Score Matching trainer."""
__version__ = "0.1.0"
