"""Audio input: decoding, fbank, augmentation, sources and the grain pipeline."""
