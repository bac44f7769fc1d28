"""The data layer: RLE masks, the catalog of a Severstal-layout folder, image reading, the
synthetic generator and the Ray Data pipelines."""
