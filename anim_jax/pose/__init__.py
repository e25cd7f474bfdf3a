"""Pose extraction: DWPose's person detector (YOLOX) and whole-body pose network (RTMPose) in Flax NNX."""
