"""Rollout engine: plans, counter-based noise and batched sampling of trajectories."""
