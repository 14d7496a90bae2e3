"""Client and admin programs: the `sdxl` CLI (sdxl.py) and the API key tool (apikeys.py)."""
