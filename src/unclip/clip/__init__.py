"""The CLIP stage: contrastive text and image towers, zero-shot classification, embeddings."""
