"""Tools built on the library: the demo, crutest, dsc."""
