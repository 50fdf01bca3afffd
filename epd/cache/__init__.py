"""Block managers (driver side: who owns which block) and paged tensor helpers (worker side)."""
