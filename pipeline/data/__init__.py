"""Data: sources, safe download and extraction, image decoding and cleaning, resizing, augmentation."""
