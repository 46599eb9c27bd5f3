"""Fused RSM ops: the ZO row loss, the score-regression loss and the sampler step.

``decomposed`` states the math every backend implements (Triton on CUDA, C++ on CPU)."""
