"""Dataset sources, one module each; `registry.SOURCES` lists them."""
