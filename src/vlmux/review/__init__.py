"""`vlmux review`: several models' captions of each image side by side in the browser, one decision per image kept
in a journal beside the output, and the curated set exported in any format `vlmux caption` writes."""
