"""Build tools outside the runtime packages: the tiny and full-size random-weight SDXL builders."""
