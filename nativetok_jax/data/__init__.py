"""Image data: decoding, cropping, and the photographs bundled with scikit-image."""
