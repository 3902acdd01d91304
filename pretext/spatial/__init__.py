"""Tasks on the image's geometry, patches and context: rotation, jigsaw, context prediction, CPC."""
