"""Tuning: the launch choices of the code generators and the measured
fuse-or-not decisions (`FusionConfig.min_fusion_benefit`)."""
