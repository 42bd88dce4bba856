"""Request and file decoding: raw values to model inputs (numpy only, no torch)."""
