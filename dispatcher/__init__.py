"""The webhook dispatcher, `python -m dispatcher`: signed delivery with retries (no torch; runs from the API image)."""
