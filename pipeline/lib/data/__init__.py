"""Images in: decoding, sources (synthetic, folder), ingest, the prepared dataset."""
