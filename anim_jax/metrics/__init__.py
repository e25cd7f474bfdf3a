"""Learned video-quality metrics (LPIPS, FVD): Flax ports of the networks, fed converted weights."""
