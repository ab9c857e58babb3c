"""bundle-builder: build signed, content-addressed offline delivery bundles (the connected side)."""

# The builder version recorded in every manifest; one version with the collection (galaxy.yml).
__version__ = "0.2.0"
