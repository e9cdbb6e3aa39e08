"""Foundation: what every layer may import (the name registry, seeds, files, private APIs, image grids, CLI flags)."""
