"""Data: shapes world (world, render, shapes, preview, export), caption folders, shards."""
