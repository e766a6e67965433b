"""What every floor of the package uses: atomic file writes (``io``), devices (``devices``), seeds and RNG
state (``seeds``), the version (``version``). Imports nothing from the rest of the package."""
