"""Data: image reading (Y channel and chroma), datasets, paired transforms, bundled sample."""
