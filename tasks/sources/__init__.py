"""REST sources that rows are looked up in, one module each."""
