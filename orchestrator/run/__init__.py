"""One run across the process boundary: its spec, how it ended (``ending``), its folder, its worker."""
