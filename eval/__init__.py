"""Segmentation metrics, synthesis quality, memorisation and the study report."""
