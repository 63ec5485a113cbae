"""The latent cache: what data prep writes and every other job reads. Its format, manifest, writer and
reader, and the encoders (with their fingerprints) whose latents and text conditioning it holds."""
