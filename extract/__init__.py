"""Images in, embeddings out: backbones, weights, preprocessing, safe loading, manifests, the loop."""
