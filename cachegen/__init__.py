"""cachegen: everything up to and including the store of lower-layer hidden states."""
