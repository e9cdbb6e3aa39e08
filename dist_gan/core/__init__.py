"""Foundation: what every layer may import (seeds, files, private APIs, image grids, CLI flags)."""
