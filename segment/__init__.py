"""Segmenters behind one interface: MONAI 3-D U-Net and nnU-Net v2."""
