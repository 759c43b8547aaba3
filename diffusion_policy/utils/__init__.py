"""Small helpers with no dependency on the rest of the package (the bottom of the import graph)."""
