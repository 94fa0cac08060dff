"""Pretrained networks the project runs but never trains: InceptionV3, LPIPS, MaskGIT's VQGAN."""
