"""Guest images: built from Debian packages with mmdebstrap, packed as one initramfs."""
